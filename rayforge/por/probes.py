"""Probes of what a segment tolerance rules out: deliberately invalid PoRs, built without forging anything.

`log_only_por` is the ε = 0 construction: the original log with the point swapped out of its batches, over the
*original* checkpoints, claiming ε = 0 against the original model. No trajectory trained without the point exists
behind it: each segment's replay lands about lr x (the point's share of the batch gradients) away from the next
stored checkpoint, and at a small lr that can be under an absolute tolerance. `scale_lr` declares another learning
rate in both the manifest and the log of a PoR, keeping its checkpoints. The README ("What a segment tolerance rules
out") measures both with `benchmarks/tolerance.py`; the verifier reports every segment's deviation so a reader can
weigh them, and `tol_rel` bounds them relative to the segment's update.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from rayforge.config import TrainConfig
from rayforge.io import atomic_write_json, check_fresh_dir, staged_dir, write_parquet
from rayforge.por.artifact import MANIFEST, STEPS_FILE, params_of, parse_manifest
from rayforge.por.export import por_manifest
from rayforge.train.log import ckpt_name, read_checkpoint, read_steps, steps_table
from rayforge.train.run import TrainingRun
from rayforge.train.schedule import learning_rates


def _without(batch: np.ndarray, point: int) -> np.ndarray:
    """`batch` with `point` replaced by the lowest index neither in the batch nor the point."""
    if point not in batch:
        return batch
    taken = set(batch.tolist()) | {point}
    substitute = next(i for i in range(len(taken) + 1) if i not in taken)
    return np.where(batch == point, substitute, batch)


def log_only_por(run: TrainingRun, point: int, out_dir: str | Path) -> dict:
    """Write the ε = 0 construction for `point` into `out_dir` (absent or empty); return its por.json."""
    out_dir = Path(out_dir)
    check_fresh_dir(out_dir)
    theta_star = params_of(read_checkpoint(run.traj_dir / ckpt_name(run.total_steps)))
    batches = [_without(np.asarray(b), point) for b in run.steps.batch]
    with staged_dir(out_dir) as tmp_dir:
        for c in run.checkpoints:
            shutil.copyfile(run.traj_dir / ckpt_name(c), tmp_dir / ckpt_name(c))
        write_parquet(tmp_dir / STEPS_FILE, steps_table(batches, run.steps.flip, run.steps.lr))
        manifest = por_manifest(run, run.load_dataset(), point, [point], theta_star, theta_star)
        atomic_write_json(tmp_dir / MANIFEST, manifest)
    return manifest


def scale_lr(por_dir: str | Path, factor: float) -> float:
    """Declare lr x `factor` in `por_dir`'s manifest and rewrite its log's learning rates to that schedule, keeping
    the checkpoints; return the new lr."""
    por_dir = Path(por_dir)
    raw = json.loads((por_dir / MANIFEST).read_text())
    raw["training"]["lr"] *= factor
    training = parse_manifest(raw).training
    steps = read_steps(por_dir / STEPS_FILE)
    lrs = learning_rates(TrainConfig(lr=training.lr, lr_schedule=training.lr_schedule), len(steps))
    write_parquet(por_dir / STEPS_FILE, steps_table(steps.batch, steps.flip, lrs))
    atomic_write_json(por_dir / MANIFEST, raw)
    return training.lr
