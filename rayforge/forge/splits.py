"""Eq. (5) and (6) of the paper: fixed groups of λ points, and a fresh random split of the groups into κ parts at
every step, so each group lies inside one part (eq. 6) and the parts are disjoint and of equal size (eq. 5).

Nothing here is stored: the groups and every step's split are re-derived exactly from (seed, step), which is how
phase 2 (rebuild) learns which part each group fell in at each step.
"""

from __future__ import annotations

import numpy as np

from rayforge.errors import RayforgeError

GROUP_STREAM = 0x6A11  # distinct RNG streams for groups, splits and candidates of the same seed
SPLIT_STREAM = 0x5B17
SAMPLE_STREAM = 0x5A3E


def check_split_params(n: int, lam: int, kappa: int) -> int:
    """Validate λ and κ for n points; return the number of groups n/λ."""
    if lam < 1 or n % lam:
        raise RayforgeError(f"forge: lam={lam} must divide n={n}")
    groups = n // lam
    if kappa < 1 or kappa > groups:
        raise RayforgeError(f"forge: kappa={kappa} must be between 1 and the number of groups n/lam={groups}")
    return groups


def make_groups(n: int, lam: int, seed: int) -> np.ndarray:
    """A seeded partition of the n points into n/λ groups of λ; row g holds group g's members (sorted)."""
    check_split_params(n, lam, 1)
    perm = np.random.default_rng([seed, GROUP_STREAM]).permutation(n)
    return np.sort(perm.reshape(n // lam, lam), axis=1)


def point_groups(groups: np.ndarray) -> np.ndarray:
    """The inverse map: group index of every point."""
    out = np.empty(groups.size, dtype=np.int64)
    out[groups.ravel()] = np.repeat(np.arange(len(groups)), groups.shape[1])
    return out


def group_parts(num_groups: int, kappa: int, seed: int, step: int) -> np.ndarray:
    """The part (0..κ-1) of every group at `step`: a seeded random equal split of the groups.

    When κ divides n/λ every part has exactly n/κ points (eq. 5); otherwise sizes differ by at most one group.
    """
    perm = np.random.default_rng([seed, SPLIT_STREAM, step]).permutation(num_groups)
    parts = np.empty(num_groups, dtype=np.int64)
    parts[perm] = np.arange(num_groups) * kappa // num_groups
    return parts


class Splits:
    """Groups and per-step splits of one forging run: `point_parts(t)[i]` is the part of point i at step t."""

    def __init__(self, n: int, lam: int, kappa: int, seed: int):
        self.n, self.lam, self.kappa, self.seed = n, lam, kappa, seed
        self.num_groups = check_split_params(n, lam, kappa)
        self.groups = make_groups(n, lam, seed)
        self.group_of = point_groups(self.groups)

    def parts_of_groups(self, step: int) -> np.ndarray:
        return group_parts(self.num_groups, self.kappa, self.seed, step)

    def point_parts(self, step: int) -> np.ndarray:
        return self.parts_of_groups(step)[self.group_of]


def sample_points(n: int, points: int | None, seed: int) -> np.ndarray | None:
    """The paper's sampling approximation: `points` training points drawn by seed (sorted), or None for all."""
    if points is None or points >= n:
        return None
    if points < 1:
        raise RayforgeError(f"forge: points={points} must be >= 1")
    return np.sort(np.random.default_rng([seed, SAMPLE_STREAM]).choice(n, size=points, replace=False))
