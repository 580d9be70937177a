"""The training plan: which points, which flips and which learning rate at every step, fixed before step 0.

Batches come from a seeded permutation per epoch (every point exactly once per epoch); flip flags from a seeded
generator per epoch. Nothing is drawn from hidden RNG state during training, so the plan is the log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rayforge.config import TrainConfig


@dataclass(frozen=True)
class StepPlan:
    batches: list[np.ndarray]  # int32 indices into the run's training set, one array per step
    flips: list[np.ndarray]  # bool, same shapes
    lrs: np.ndarray  # float64, one per step

    @property
    def total_steps(self) -> int:
        return len(self.batches)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def learning_rates(train: TrainConfig, total_steps: int) -> np.ndarray:
    """Constant, or cosine annealing from lr to 0 over all steps (torch's CosineAnnealingLR, eta_min=0, stepped once
    per SGD step with T_max = total steps)."""
    t = np.arange(total_steps, dtype=np.float64)
    if train.lr_schedule == "cosine":
        return train.lr * (1.0 + np.cos(np.pi * t / total_steps)) / 2.0
    return np.full(total_steps, train.lr, dtype=np.float64)


def make_plan(n: int, train: TrainConfig, seed: int, flip: bool) -> StepPlan:
    batches, flips = [], []
    for epoch in range(train.epochs):
        rng = np.random.default_rng([seed, 0x5A17, epoch])  # independent stream per epoch
        order = rng.permutation(n).astype(np.int32)
        flip_flags = rng.random(n) < 0.5 if flip else np.zeros(n, dtype=bool)
        for start in range(0, n, train.batch_size):
            batches.append(order[start:start + train.batch_size])
            flips.append(flip_flags[start:start + train.batch_size])
    return StepPlan(batches, flips, learning_rates(train, len(batches)))


def checkpoint_steps(total_steps: int, every: int) -> list[int]:
    """Steps whose state (before that step runs) is checkpointed: 0, every `every` steps, and the end."""
    return sorted(set(range(0, total_steps, every)) | {total_steps})
