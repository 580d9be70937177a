"""The forged log of one group (Alg. 3 lines 15-19): at step t, group g uses the forged minibatch of its part k
if any member of g is in the original batch B_t, and B_t with its own flips otherwise.

Shared by phase 2 (rebuild), the PoR export and the minimal PoR, so every consumer composes the same log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rayforge.errors import MalformedArtifact, RayforgeError
from rayforge.forge.engine import ForgeParams, forge_dir, read_forged, sampled_groups
from rayforge.forge.splits import Splits
from rayforge.train.log import Steps
from rayforge.train.run import TrainingRun


PARTS_TABLE_LIMIT = 300_000_000  # bytes of the cached split table (τ x n/λ int8)


class ForgedTable:
    """forged.parquet in memory: the batch, flips and error of every (step, part), by direct index."""

    def __init__(self, path: Path, total_steps: int, kappa: int, n_points: int, complete: bool):
        table = read_forged(path, kappa=kappa, n_points=n_points)
        if complete and len(table) != total_steps * kappa:
            raise MalformedArtifact(f"{path}: {len(table)} rows, expected every (step, part): {total_steps} x {kappa}")
        self.kappa, self.path = kappa, path
        self._keys = table.column("step").to_numpy() * kappa + table.column("part").to_numpy()  # sorted
        batch = table.column("batch").combine_chunks()
        flip = table.column("flip").combine_chunks()
        self._offsets = batch.offsets.to_numpy()
        self._batch = batch.flatten().to_numpy().astype(np.int64)
        self._flip = flip.flatten().to_numpy(zero_copy_only=False).astype(bool)
        self.grad_error = table.column("grad_error").to_numpy()
        self.grad_norm = table.column("grad_norm").to_numpy()
        if len(self._batch) and (self._batch.min() < 0 or self._batch.max() >= n_points):
            raise MalformedArtifact(f"{path}: a forged batch index is outside [0, {n_points})")

    def get(self, step: int, part: int) -> tuple[np.ndarray, np.ndarray]:
        key = step * self.kappa + part
        row = int(np.searchsorted(self._keys, key))
        if row >= len(self._keys) or self._keys[row] != key:
            raise RayforgeError(f"{self.path}: phase 1 did not forge (step {step}, part {part}); it was run for a "
                                f"sample of points that does not include this group")
        a, b = self._offsets[row], self._offsets[row + 1]
        return self._batch[a:b], self._flip[a:b]


@dataclass
class GroupLog:
    """A group's forged steps (the rest of the log is the original)."""

    group: int
    members: np.ndarray
    forged: dict[int, tuple[np.ndarray, np.ndarray]]  # step -> (batch, flips) replacing B_t

    @property
    def first_step(self) -> int:
        return min(self.forged) if self.forged else -1

    def steps(self, original: Steps) -> Steps:
        batch = [self.forged[t][0] if t in self.forged else b for t, b in enumerate(original.batch)]
        flip = [self.forged[t][1] if t in self.forged else f for t, f in enumerate(original.flip)]
        return Steps(batch, flip, original.lr)


class ForgedLogs:
    """Everything phase 2 needs from phase 1: the splits (re-derived), the forged table, and, per group, the steps
    at which one of its members is in the original batch."""

    def __init__(self, run: TrainingRun, strategy: str):
        out = forge_dir(run.run_dir, strategy)
        params_path = out / "params.json"
        if not params_path.is_file():
            raise RayforgeError(f"no phase-1 output for strategy '{strategy}' in {out}; run `rayforge forge` first")
        try:
            self.params = ForgeParams(**json.loads(params_path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise MalformedArtifact(f"{params_path}: unreadable ({exc})") from None
        self.run, self.strategy = run, strategy
        n = int(run.info["n"])
        self.splits = Splits(n, self.params.lam, self.params.kappa, self.params.seed)
        self.table = ForgedTable(out / "forged.parquet", run.total_steps, self.params.kappa, n,
                                 complete=self.params.points is None)
        self.groups = sampled_groups(self.splits, self.params.points)  # the groups phase 2 rebuilds
        # appearances: for each group, the steps whose original batch holds one of its members (CSR layout)
        step_of = np.repeat(np.arange(run.total_steps), [len(b) for b in run.steps.batch])
        group = self.splits.group_of[np.concatenate(run.steps.batch)]
        pairs = np.unique(group * run.total_steps + step_of)  # (group, step) once, sorted by group then step
        self._app_groups, self._app_steps = pairs // run.total_steps, pairs % run.total_steps
        self._app_offsets = np.searchsorted(self._app_groups, np.arange(self.splits.num_groups + 1))
        self._parts = None  # (τ, n/λ) int8 table of every step's split, built on first use when it fits

    def part(self, step: int, group: int) -> int:
        """The part group `group` fell in at `step` (re-derived from the seed, as phase 1 drew it)."""
        tau, groups = self.run.total_steps, self.num_groups
        if self._parts is None and tau * groups <= PARTS_TABLE_LIMIT and self.params.kappa < 128:
            self._parts = np.stack([self.splits.parts_of_groups(t).astype(np.int8) for t in range(tau)])
        if self._parts is not None:
            return int(self._parts[step, group])
        return int(self.splits.parts_of_groups(step)[group])

    @property
    def num_groups(self) -> int:
        return self.splits.num_groups

    def appearances(self, group: int) -> np.ndarray:
        return self._app_steps[self._app_offsets[group]:self._app_offsets[group + 1]]

    def first_step(self, group: int) -> int:
        steps = self.appearances(group)
        return int(steps[0]) if len(steps) else self.run.total_steps

    def group_log(self, group: int) -> GroupLog:
        if not 0 <= group < self.num_groups:
            raise RayforgeError(f"group {group} is outside [0, {self.num_groups})")
        forged = {}
        for t in self.appearances(group):
            forged[int(t)] = self.table.get(int(t), self.part(int(t), group))
        return GroupLog(group, self.splits.groups[group], forged)
