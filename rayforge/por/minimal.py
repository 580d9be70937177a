"""The minimal PoR of one challenged point (beyond the paper): swap out x_I itself, and nothing else.

At each step whose original batch holds x_I, x_I is replaced by one substitute chosen with the swap strategy's
greedy rule (rayforge.forge.swap) at the original θ_t: the pool point (and flip) whose per-sample gradient is closest
to x_I's. Every other sample of every batch stays. The forged log is then replayed into a PoR exactly like a group
PoR (rayforge.por.export.write_por). Cost: about one training (the original trajectory up to x_I's last
appearance, then the forged replay), with no phase-1 output needed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from rayforge.errors import RayforgeError
from rayforge.forge.swap import greedy_rows, per_sample, with_flips
from rayforge.forge.twins import Twins
from rayforge.por.export import TOPQ_WINDOWS, exclude_claim, write_por
from rayforge.train.log import Steps
from rayforge.io import check_fresh_dir
from rayforge.train.replay import walk_trajectory
from rayforge.train.run import TrainingRun, set_determinism

POOL_STREAM = 0x3141
DEFAULT_POOL = 256


def minimal_forged_log(run: TrainingRun, point: int, pool_size: int = DEFAULT_POOL, data=None) -> tuple[Steps, int]:
    """(the forged steps, the first step that differs from the original log)."""
    n = int(run.info["n"])
    appearances = [t for t, b in enumerate(run.steps.batch) if point in b]
    if not appearances:
        return run.steps, run.total_steps
    set_determinism(run.cfg.train.threads)
    device = run.device()
    dataset = run.load_dataset()
    data = data or run.tensor_data(dataset, device)
    excluded = np.zeros(n, dtype=bool)
    excluded[point] = True
    allowed = Twins(dataset.train, run.cfg.data.flip).allowed(np.flatnonzero(~excluded), excluded)
    start = max(c for c in run.checkpoints if c <= appearances[0])
    hook_model, cache = None, {}
    batches, flips = list(run.steps.batch), list(run.steps.flip)
    for t, model, _ in walk_trajectory(run, data, start, appearances[-1] + 1, device):
        if hook_model is None:  # per-sample gradients hook a copy (parameters are passed in)
            hook_model = copy.deepcopy(model)
        if t not in appearances:
            continue
        batch, flip = np.asarray(batches[t], dtype=np.int64), np.asarray(flips[t], dtype=bool)
        rng = np.random.default_rng([run.cfg.seed, POOL_STREAM, point, t])
        pool = allowed[~np.isin(allowed, batch)]
        pool = np.sort(rng.choice(pool, size=min(pool_size, len(pool)), replace=False))
        pool_idx, pool_flips = with_flips(pool, run.cfg.data.flip)
        slot = int(np.flatnonzero(batch == point)[0])
        xs, ys = data.batch(np.concatenate([[point], pool_idx]), np.concatenate([[flip[slot]], pool_flips]))
        grads = per_sample(hook_model, dict(model.named_parameters()), xs, ys, cache)
        [pick] = greedy_rows(grads[1:], pool_idx, grads[0], 1)
        batch, flip = batch.copy(), flip.copy()
        batch[slot], flip[slot] = pool_idx[pick], pool_flips[pick]
        batches[t], flips[t] = batch, flip
    return Steps(batches, flips, run.steps.lr), appearances[0]


def export_minimal_por(run: TrainingRun, point: int, out_dir: str | Path, pool_size: int = DEFAULT_POOL,
                       device: torch.device | None = None, topq_windows: int = TOPQ_WINDOWS) -> dict:
    """Write the minimal PoR of `point` into `out_dir` (must not exist or be empty); return por.json.
    `topq_windows`: see `rayforge.por.export`."""
    out_dir = Path(out_dir)
    check_fresh_dir(out_dir)
    n = int(run.info["n"])
    if isinstance(point, bool) or not isinstance(point, (int, np.integer)) or not 0 <= int(point) < n:
        raise RayforgeError(f"--point must be a training-point index in [0, {n}), got {point!r}")
    previous_threads = torch.get_num_threads()
    try:
        forged, first = minimal_forged_log(run, int(point), pool_size)
        claim = exclude_claim(run, run.load_dataset(), int(point), [int(point)])
        return write_por(run, forged, first, out_dir, claim, device=device, topq_windows=topq_windows)
    finally:
        torch.set_num_threads(previous_threads)
