"""Phase 1 on Ray: the driver streams the original trajectory to forging actors and writes what they return.

Units are (step window, parts) (`plan_units`). The driver alone reads the run directory: each actor receives, once,
the run with its training tensor (one `ray.put`), and per unit θ at the window start, through the object store. A
window that starts on a checkpoint gets the checkpoint; the other windows of a checkpoint segment get the states a
helper call (`ForgeWorker.trajectory`, one per segment, on any actor) stepped the original log to, so κ × windows
units can run at once, not one per segment. The helpers re-walk about one training in all, so when the pool is
known (a number of actors, or "auto" on a private local Ray) and whole segments give every actor
SEGMENT_UNITS_PER_ACTOR units, the units are whole segments and nothing is re-walked; the cut is recorded in
`progress.json` on the first call, so a resume with another pool finds its units. Units are handed out as actors
free up (bounded in flight per actor: rayforge.stage), and only while their θ is needed does the driver hold it.

The driver alone writes: each finished unit goes to its own file at once (atomic) and its forging error to the
stage's metrics (live, per (step, part)), so a stopped run (Ctrl-C, killed driver or actor) loses at most the units in
flight, a rerun skips finished units, and the merged `forged.parquet` is byte-identical to an uninterrupted run's,
for any number of actors and any window length.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from rayforge.config import RayConfig, WandbConfig
from rayforge.forge.engine import (ForgeContext, ForgeParams, auto_window, forge_dir, forge_unit, merge_units,
                                   needed_parts, original_states, plan_units, prepare_output, read_unit, unit_path,
                                   unit_table)
from rayforge.forge.splits import Splits
from rayforge.io import atomic_write_json, write_parquet
from rayforge.ray_utils import actor_options, named_address, pool_size, ray_session
from rayforge.stage import StageWorker, Unit, run_units
from rayforge.tracking import MetricLogger
from rayforge.train.run import TrainingRun


class ForgeWorker(StageWorker):
    """A forging actor (wrapped with ray.remote by the stage): holds the run and its tensors once, then forges."""

    def __init__(self, run: TrainingRun, params: dict):
        self.ctx = ForgeContext(run, ForgeParams(**params))

    def forge(self, start: int, stop: int, parts: tuple, state: dict, end_state: dict | None) -> dict:
        return forge_unit(self.ctx, start, stop, parts, state, end_state)

    def trajectory(self, start: int, at: list[int], state: dict) -> list[dict]:
        return original_states(self.ctx, start, at, state)


class _Segment:
    """One checkpoint segment's units still to do, and the states they need (held only while they are needed)."""

    def __init__(self, start: int, stop: int, units: list[tuple]):
        self.start, self.stop = start, stop
        self.queue = collections.deque(units)
        self.left = len(units)  # not yet finished
        self.states: dict[int, object] = {}  # step -> object ref of the state there
        # windows inside the segment wait for the trajectory call: "needed", then "running", then "ready"
        self.trajectory = "needed" if any(u[0] != start for u in units) else "ready"


class ForgeSchedule:
    """The units of phase 1, segment by segment in output order, each handed out once its θ is available."""

    def __init__(self, ray, run: TrainingRun, units: list[tuple], on_trajectory_steps: Callable[[int], None]):
        self.ray, self.run, self.on_steps = ray, run, on_trajectory_steps
        self.bounds = run.checkpoints
        by_segment = collections.defaultdict(list)
        for u in units:
            by_segment[self._segment_start(u[0])].append(u)
        self.segments = [_Segment(a, b, by_segment[a]) for a, b in zip(self.bounds, self.bounds[1:])
                         if by_segment[a]]
        self.by_start = {seg.start: seg for seg in self.segments}
        self.requeued: collections.deque[Unit] = collections.deque()
        self.first = 0  # segments before this one have handed out all their units

    def _segment_start(self, step: int) -> int:
        return self.bounds[bisect.bisect_right(self.bounds, step) - 1]

    def _segment(self, step: int) -> _Segment:
        return self.by_start[self._segment_start(step)]

    def _state(self, seg: _Segment, step: int):
        """The object ref of the state at `step` in `seg`: a checkpoint is read (driver) and put on first need."""
        if step not in seg.states:
            seg.states[step] = self.ray.put(self.run.checkpoint(step))
        return seg.states[step]

    def _trajectory_unit(self, seg: _Segment) -> Unit:
        at = sorted({u[0] for u in seg.queue if u[0] != seg.start})
        seg.trajectory = "running"

        def done(states: list[dict]) -> None:
            seg.states.update({step: self.ray.put(s) for step, s in zip(at, states)})
            seg.trajectory = "ready"
            self.on_steps(at[-1] - seg.start)

        return Unit(("trajectory", seg.start), "trajectory", lambda: (seg.start, at, self._state(seg, seg.start)),
                    counts=False, done=done)

    def _forge_unit(self, seg: _Segment, unit: tuple) -> Unit:
        start, stop = unit[0], unit[1]
        return Unit(unit, "forge", lambda: (start, stop, unit[2], self._state(seg, start),
                                            self._state(seg, stop) if stop == seg.stop else None))

    def next_ready(self) -> Unit | None:
        if self.requeued:
            return self.requeued.popleft()
        while self.first < len(self.segments) and not self.segments[self.first].queue:
            self.first += 1
        for seg in self.segments[self.first:]:
            if seg.trajectory == "needed":
                return self._trajectory_unit(seg)
            if seg.queue and (seg.trajectory == "ready" or seg.queue[0][0] == seg.start):
                return self._forge_unit(seg, seg.queue.popleft())
        return None

    def requeue(self, unit: Unit) -> None:
        if unit.key[0] == "trajectory":
            self._segment(unit.key[1]).trajectory = "needed"
        else:
            self.requeued.appendleft(unit)

    def counted(self) -> int:
        return sum(s.left for s in self.segments)

    def finished(self, unit: tuple) -> None:
        """A unit landed: drop its segment's states once nothing there needs them."""
        seg = self._segment(unit[0])
        seg.left -= 1
        if seg.left == 0:
            seg.states.clear()


def _finish(out: Path, run: TrainingRun, params: ForgeParams, units, wall: float, record: dict,
            stage: dict) -> dict:
    table = merge_units(out, units)
    err = table.column("grad_error").to_numpy()
    rel = err / np.maximum(table.column("grad_norm").to_numpy(), 1e-30)
    evals = sum(record["evals"].get(_evals_key(u), 0.0) for u in units)  # this cut's units only
    train_wall = _train_wall(run)
    return {
        "strategy": params.strategy, "rows": len(table), "steps": int(run.total_steps),
        "grad_evals": round(float(evals), 2), "grad_evals_per_step": evals / run.total_steps,
        "trajectory_steps": record["trajectory_steps"], "window": record["window"] or "segment",
        "units": len(units), "forge_wall_s": wall, "candidates_per_s": evals / wall if wall else None,
        "train_wall_s": train_wall, "forge_over_train": wall / train_wall if train_wall else None,
        "rel_error_median": float(np.median(rel)), "rel_error_p90": float(np.quantile(rel, 0.9)),
        "grad_error_median": float(np.median(err)), **stage,
    }


def _train_wall(run: TrainingRun) -> float | None:
    path = run.run_dir / "train_summary.json"
    return json.loads(path.read_text()).get("train_wall_s") if path.is_file() else None


def run_forge(run_dir: str | Path, params: ForgeParams, actors: int | str, ray_cfg: RayConfig,
              wandb_cfg: WandbConfig, progress: bool = True, max_units: int | None = None,
              on_unit: Callable[[tuple], None] | None = None) -> dict | None:
    """Forge every unit not yet on disk; merge when all are done. `actors`: a number or "auto". `max_units` stops
    early (as a Ctrl-C would) and returns None; `on_unit` is called after each unit is saved."""
    run = TrainingRun.open(run_dir)
    params = dataclasses.replace(params, threads=run.threads)  # workers compute with the log's thread count
    params.validate(int(run.info["n"]), max(len(b) for b in run.steps.batch))
    run.load_dataset()  # fail here, once and clearly, if the data differs from the log's (not in every actor)
    out = forge_dir(run.run_dir, params.strategy)
    prepare_output(out, params)
    splits = Splits(int(run.info["n"]), params.lam, params.kappa, params.seed)
    needed = needed_parts(splits, run.steps, params.points)
    progress_path = out / "progress.json"  # gradient evaluations per unit and driver time, summed over resumes
    record = _read_progress(progress_path)
    elapsed_before, start_time = record["elapsed_s"], time.perf_counter()
    totals = {"rel": 0.0, "rows": 0, "evals": 0, "steps": 0}

    def write_progress() -> None:
        atomic_write_json(progress_path, {**record, "elapsed_s": elapsed_before + time.perf_counter() - start_time})

    def stepped(steps: int) -> None:
        record["trajectory_steps"] += steps
        write_progress()

    with MetricLogger(run.run_dir, f"forge-{params.strategy}", wandb_cfg, params.to_json(),
                      run_name=run.cfg.name) as logger, ray_session(ray_cfg) as ray:
        if record["window"] is None:  # the cut is chosen once, so a resume finds the units it left
            record["window"] = params.window or auto_window(
                run.total_steps, len(plan_units(run.checkpoints, params.kappa, needed, params.parts_per_unit)),
                _known_pool(actors, ray_cfg, params.threads))
            write_progress()
        units = plan_units(run.checkpoints, params.kappa, needed, params.parts_per_unit, record["window"] or None)
        todo = [u for u in units if read_unit(unit_path(out, u)) is None]
        schedule = ForgeSchedule(ray, run, todo, stepped)

        def save(unit, result) -> None:
            # Record first, then the unit: a kill in between only redoes the unit, whose count is the same.
            record["evals"][_evals_key(unit)] = result["grad_evals"]
            write_progress()
            cols = result["columns"]
            write_parquet(unit_path(out, unit), unit_table(cols))
            schedule.finished(unit)
            rel = np.asarray(cols["grad_error"]) / np.maximum(np.asarray(cols["grad_norm"]), 1e-30)
            for t, k, e, r in zip(cols["step"], cols["part"], cols["grad_error"], rel):  # live, as units land
                logger.log({"forge/grad_error": float(e), "forge/rel_error": float(r), "forge/part": int(k)},
                           step=int(t))
            totals["rel"] += float(rel.sum())
            totals["rows"] += len(rel)
            totals["evals"] += result["grad_evals"]
            totals["steps"] += unit[1] - unit[0]
            if on_unit:
                on_unit(unit)

        def postfix(result, elapsed: float) -> dict:
            return {"steps": totals["steps"], "cand_per_s": f"{totals['evals'] / elapsed:.0f}",
                    "rel_err": f"{totals['rel'] / max(totals['rows'], 1):.3f}"}

        stage = run_units(schedule, ForgeWorker, (ray.put(run.detach()), params.to_json()), ray_cfg, actors, save,
                          f"forge[{params.strategy}]", len(units), progress, max_units, postfix, params.threads)
        if stage.ran < len(todo):
            return None  # stopped early: progress is on disk, a rerun resumes
        wall = elapsed_before + time.perf_counter() - start_time
        summary = _finish(out, run, params, units, wall, record,
                          {"placement": stage.placement, "units_in_flight": stage.units_in_flight,
                           "actor_startup_s": stage.startup_s, "driver_busy_s": stage.driver_s})
        logger.summary(summary)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _evals_key(unit: tuple) -> str:
    return f"{unit[0]}-{unit[1]}:{unit[2][0]}"


def _read_progress(path: Path) -> dict:
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        record = {}
    window = record.get("window")
    return {"evals": dict(record.get("evals", {})), "elapsed_s": float(record.get("elapsed_s", 0.0)),
            "trajectory_steps": int(record.get("trajectory_steps", 0)),
            "window": int(window) if isinstance(window, int) and window >= 0 else None}


def _known_pool(actors: int | str, ray_cfg: RayConfig, threads: int | None) -> int | None:
    """The number of actors the stage will run, when it is known before it starts: asked for, or "auto" on a private
    local Ray (fixed resources); None for "auto" on a named cluster, where nodes may still join."""
    if actors == "auto" and named_address(ray_cfg):
        return None
    return pool_size(actors, actor_options(ray_cfg, threads), sys.maxsize)
