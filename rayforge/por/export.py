"""Export the Proof-of-Repudiation of one training point: its group's forged log, replayed into a complete PoL.

The PoR of point x* (Sections II-III of the paper) is a valid PoL of a model θ' close to the deployed θ* on
D' = D \\ X̂, where X̂ is x*'s group (Key Idea 2: one PoR serves all λ members). The forged log comes from phase 1
(`rayforge.rebuild.forged_log`); here it is replayed sequentially through `rayforge.train.sgd`, exactly as
`rayforge.rebuild.engine.rebuild_group` and `rayforge verify` do, and its checkpoints are written at every step the
original log has one. Before the group's first appearance the two trajectories are the same, so those checkpoints
are copied from the original log.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch

from rayforge.data import point_sha256
from rayforge.errors import RayforgeError
from rayforge.por.artifact import MANIFEST, POR_FORMAT, STEPS_FILE, l2_distance, model_sha256, params_of, \
    read_manifest
from rayforge.rebuild.engine import d_theta
from rayforge.rebuild.forged_log import ForgedLogs
from rayforge.io import atomic_write_json, check_fresh_dir, save_tensors, staged_dir, write_parquet
from rayforge.train.log import check_state, ckpt_name, read_checkpoint, save_checkpoint, steps_table
from rayforge.train.replay import replay_steps
from rayforge.train.run import TrainingRun, hyper_of, new_model, set_determinism

DEPLOYED_FORMAT = "rayforge-model-1"


def _original_final(run: TrainingRun) -> dict[str, torch.Tensor]:
    """The original log's final state (θ* and its buffers), checked against the model."""
    path = run.traj_dir / ckpt_name(run.total_steps)
    tensors = read_checkpoint(path)
    model = new_model(run.cfg, run.info["shape"], torch.device("cpu"), run.num_classes)
    check_state(tensors, model, str(path), need_velocity=bool(run.cfg.train.momentum))
    return tensors


def write_deployed_model(run: TrainingRun, path: str | Path) -> str:
    """Write what a model owner deploys: the original final parameters (param/*) and buffers (buffer/*), no
    optimizer state, as safetensors (atomically). Returns its `model_sha256`, the PoR's "deployed_sha256"."""
    path = Path(path)
    tensors = _original_final(run)
    deployed = {k: v for k, v in tensors.items() if k.startswith(("param/", "buffer/"))}
    save_tensors(path, deployed, tag=DEPLOYED_FORMAT)
    return model_sha256(params_of(deployed))


def export_por(run: TrainingRun, strategy: str, point: int, out_dir: str | Path,
               device: torch.device | None = None) -> dict:
    """Write the PoR of training point `point` into `out_dir` (which must not exist or be empty); return por.json.

    The directory is built in a temporary sibling and renamed into place at the end: a failure leaves nothing.
    `device` defaults to the run's (`train.device`), like phase 2's rebuild.
    """
    previous_threads = torch.get_num_threads()
    try:
        return _export_por(run, strategy, point, Path(out_dir), device)
    finally:
        torch.set_num_threads(previous_threads)


def _export_por(run: TrainingRun, strategy: str, point, out_dir: Path, device: torch.device | None) -> dict:
    check_fresh_dir(out_dir)
    n = int(run.info["n"])
    if isinstance(point, bool) or not isinstance(point, (int, np.integer)) or not 0 <= int(point) < n:
        raise RayforgeError(f"--point must be a training-point index in [0, {n}), got {point!r}")
    point = int(point)

    logs = ForgedLogs(run, strategy)
    group = int(logs.splits.group_of[point])
    glog = logs.group_log(group)
    members = np.sort(np.asarray(glog.members, dtype=np.int64))
    forged = glog.steps(run.steps)
    for t, batch in enumerate(forged.batch):  # phase 1 guarantees this; a PoR must never rest on a bad table
        if np.isin(batch, members).any():
            raise RayforgeError(f"the forged log of group {group} uses one of its own members at step {t}; "
                                f"phase-1 output of strategy '{strategy}' is inconsistent")

    first = glog.first_step if glog.forged else run.total_steps
    return write_por(run, point, members, forged, first, out_dir, device)


def por_manifest(run: TrainingRun, ds, point: int, members, final: dict[str, torch.Tensor],
                 theta_star: dict[str, torch.Tensor]) -> dict:
    """por.json of the PoR of `point` (excluding `members`) whose final parameters are `final`, about the deployed
    `theta_star`."""
    epsilon = l2_distance(final, theta_star)
    if not math.isfinite(epsilon):
        raise RayforgeError(f"the forged model of point {point} has non-finite parameters")
    data_cfg = run.cfg.to_dict()["data"]
    data_cfg["data_root"] = None  # a path on the owner's machine means nothing to a verifier
    t = run.cfg.train
    return {
        "format": POR_FORMAT,
        "point": point,
        "point_sha256": point_sha256(ds.train, point),
        "excluded": [int(m) for m in members],
        "deployed_sha256": model_sha256(theta_star),
        "dataset": {"config": data_cfg, "seed": int(run.cfg.seed), "n": int(run.info["n"]),
                    "train_sha256": run.info["train_sha256"]},
        "training": {"model": run.cfg.model.name, "in_shape": [int(d) for d in run.info["shape"]],
                     "batch_size": t.batch_size, "momentum": float(t.momentum),
                     "weight_decay": float(t.weight_decay), "lr": float(t.lr), "lr_schedule": t.lr_schedule,
                     "epochs": t.epochs, "threads": t.threads, "flip": bool(run.cfg.data.flip)},
        "checkpoints": [int(c) for c in run.checkpoints],
        "epsilon": epsilon,
        "d_theta": d_theta(final, theta_star),
    }


def write_por(run: TrainingRun, point: int, members: np.ndarray, forged, first: int, out_dir: Path,
              device: torch.device | None = None, data=None) -> dict:
    """Replay the forged log `forged` (a Steps equal to the original before step `first`) from the last checkpoint
    before `first`, and write the PoR of `point` (excluding `members`) into `out_dir`; return por.json."""
    set_determinism(run.cfg.train.threads)
    device = device or run.device()
    ds = run.load_dataset()
    data = data or run.tensor_data(ds, device)
    hyper = hyper_of(run.cfg)
    momentum = bool(run.cfg.train.momentum)
    start = max(c for c in run.checkpoints if c <= first)
    original_final = _original_final(run)
    theta_star = params_of(original_final)

    with staged_dir(out_dir) as tmp_dir:
        # Up to `start` the forged trajectory is the original one: its checkpoints, checked, byte for byte.
        template = new_model(run.cfg, run.info["shape"], torch.device("cpu"), run.num_classes)
        for c in (c for c in run.checkpoints if c <= start):
            src = run.traj_dir / ckpt_name(c)
            check_state(read_checkpoint(src), template, str(src), need_velocity=momentum)
            shutil.copyfile(src, tmp_dir / ckpt_name(c))
        model, velocity = run.model_at(start, device)
        later = [c for c in run.checkpoints if c > start]
        for a, b in zip([start] + later, later):
            replay_steps(model, velocity, data, forged, a, b, hyper)
            save_checkpoint(tmp_dir / ckpt_name(b), model, velocity if momentum else None, b)
        final = {k: v.detach().to("cpu") for k, v in model.named_parameters()}
        write_parquet(tmp_dir / STEPS_FILE, steps_table(forged.batch, forged.flip, forged.lr))
        manifest = por_manifest(run, ds, point, members, final, theta_star)
        atomic_write_json(tmp_dir / MANIFEST, manifest)
        read_manifest(tmp_dir)  # what we write must pass the verifier's own schema check
    return manifest
