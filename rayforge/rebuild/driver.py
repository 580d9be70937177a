"""Phase 2 on Ray: actors rebuild the n/λ forged models, hand each to a consumer, and keep only what is asked.

Units are runs of consecutive groups. An actor rebuilds a unit's groups (one at a time, or stacked with
`method="batched"`), passes every forged model to the stage's consumer (phase-2 attack scoring plugs in here) and
returns the distance rows, the consumer's output and, for the first `save_models` groups, the model's state. Only the
driver reads and writes the run: each actor receives the forged logs (with the run and its training tensor) and θ*
once, and with each unit the checkpoints its groups start from, through the object store. The driver writes each
unit's rows as they arrive (and logs their d_θ live), so the stage resumes like phase 1 and ends with the same bytes
for any number of actors.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from rayforge.config import RayConfig, WandbConfig
from rayforge.errors import RayforgeError
from rayforge.io import atomic_write_json, read_table_if_valid, save_tensors, write_parquet
from rayforge.ray_utils import ray_session
from rayforge.rebuild.engine import (DISTANCES_SCHEMA, RebuildContext, distances_table, rebuild_unit,
                                     resolve_method, start_checkpoint)
from rayforge.rebuild.forged_log import ForgedLogs
from rayforge.stage import StageWorker, Unit, run_units
from rayforge.tracking import MetricLogger
from rayforge.train.log import state_tensors
from rayforge.train.run import TrainingRun

METHODS = ("auto", "sequential", "batched")


@dataclass(frozen=True)
class RebuildParams:
    strategy: str = "paper"
    method: str = "auto"  # per device: rayforge.rebuild.engine.DEFAULT_METHOD
    groups_per_unit: int = 4
    threads: int | None = None  # the log's thread count (set by the driver): workers compute with it

    def validate(self) -> None:
        if self.method not in METHODS:
            raise RayforgeError(f"rebuild: method must be one of {METHODS}, got '{self.method}'")
        if self.groups_per_unit < 1:
            raise RayforgeError("rebuild: groups_per_unit must be >= 1")


def rebuild_dir(run_dir: Path, strategy: str, stage: str = "rebuild") -> Path:
    return Path(run_dir) / stage / strategy


class RebuildWorker(StageWorker):
    """A rebuild actor (wrapped with ray.remote by the stage): holds the forged logs (with the run and its tensors)
    and θ*'s checkpoint once, as the driver sent them. `consumer_factory(*consumer_args)` builds, once per actor,
    the callable that receives every forged model: consumer(group, members, model) -> JSON-able dict."""

    def __init__(self, logs: ForgedLogs, final_state: dict, params: dict, save_models: int,
                 consumer_factory: Callable | None = None, *consumer_args):
        self.params = RebuildParams(**params)
        self.ctx = RebuildContext(logs.run, self.params.strategy, self.params.threads, logs=logs,
                                  final_state=final_state)
        self.save_models = save_models
        self.consumer = consumer_factory(*consumer_args) if consumer_factory else None

    def rebuild(self, first: int, last: int, starts: list[int], *states: dict) -> dict:
        """Rebuild the groups at positions first..last-1 of the stage's group list, from the checkpoints `starts`
        (their tensors: `states`)."""
        self.ctx.states = dict(zip(starts, states))
        groups = [int(g) for g in self.ctx.logs.groups[first:last]]
        results = rebuild_unit(self.ctx, groups, self.params.method)
        out: dict[str, Any] = {"rows": [r.row for r in results], "consumed": [], "models": {},
                               "model_steps": sum(r.steps for r in results),
                               "method": resolve_method(self.params.method, self.ctx.device)}
        for position, r in enumerate(results, start=first):
            g = r.row["group"]
            if self.consumer:
                out["consumed"].append(self.consumer(g, r.row["members"], r.model))
            if position < self.save_models:  # the first K groups of the stage
                out["models"][g] = state_tensors(r.model, None)
        return out


def _unit_path(out: Path, first: int) -> Path:
    return out / "units" / f"groups-{first:08d}.parquet"


def _read_unit(path: Path) -> pa.Table | None:
    return read_table_if_valid(path, DISTANCES_SCHEMA)


def run_rebuild(run_dir: str | Path, params: RebuildParams, actors: int | str, ray_cfg: RayConfig,
                wandb_cfg: WandbConfig, save_models: int = 0, progress: bool = True, max_units: int | None = None,
                consumer_factory: Callable | None = None, consumer_args: tuple = (),
                on_consumed: Callable[[int, dict], None] | None = None, stage: str = "rebuild") -> dict | None:
    """Rebuild every group not yet on disk; write `distances.parquet` (sorted by group) when all are done.
    `consumer_factory(*consumer_args)` builds each actor's consumer (object refs in `consumer_args` arrive as their
    values); `on_consumed(first_group, outputs)` receives, in the driver, what the consumer returned for a unit;
    `stage` names the output directory RUN/<stage>/<strategy> (the attack stage rebuilds with a scoring consumer)."""
    run = TrainingRun.open(run_dir)
    params = dataclasses.replace(params, threads=run.threads)  # workers compute with the log's thread count
    params.validate()
    logs = ForgedLogs(run, params.strategy)  # also validates phase 1's output
    num_groups = len(logs.groups)
    out = rebuild_dir(run.run_dir, params.strategy, stage)
    (out / "units").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    params_path = out / "params.json"
    if params_path.exists() and json.loads(params_path.read_text()) != asdict(params):
        raise RayforgeError(f"{out} holds progress made with other parameters; remove it to start over")
    atomic_write_json(params_path, asdict(params))
    units = [(g, min(g + params.groups_per_unit, num_groups)) for g in range(0, num_groups, params.groups_per_unit)]
    todo = [u for u in units if _read_unit(_unit_path(out, u[0])) is None]
    replayed = {"model_steps": 0, "method": None, "start": time.perf_counter()}

    with MetricLogger(run.run_dir, f"{stage}-{params.strategy}", wandb_cfg, asdict(params),
                      run_name=run.cfg.name) as logger, ray_session(ray_cfg) as ray:
        checkpoints: dict[int, Any] = {}  # step -> object ref, put on first need (groups start early in the log)

        def unit_args(first: int, last: int) -> tuple:
            starts = sorted({start_checkpoint(run.checkpoints, logs.first_step(int(g))) for g in logs.groups[first:last]})
            for step in starts:
                if step not in checkpoints:
                    checkpoints[step] = ray.put(run.checkpoint(step))
            return (first, last, starts, *[checkpoints[s] for s in starts])

        def save(unit, result) -> None:
            replayed["model_steps"] += result["model_steps"]
            replayed["method"] = result["method"]
            for g, tensors in result["models"].items():
                save_tensors(out / "models" / f"group-{g:08d}.safetensors", tensors)
            if on_consumed:
                on_consumed(unit[0], result["consumed"])
            write_parquet(_unit_path(out, unit[0]), distances_table(result["rows"]))  # last: marks the unit done
            for row in result["rows"]:  # live, as units land
                logger.log({f"{stage}/d_theta": row["d_theta"], f"{stage}/forged_steps": row["forged_steps"]},
                           step=int(row["group"]))

        shipped = copy.copy(logs)
        shipped.run = run.detach()
        worker_args = (ray.put(shipped), ray.put(run.checkpoint(run.total_steps)), asdict(params), save_models,
                       consumer_factory, *consumer_args)
        work = [Unit(u, "rebuild", functools.partial(unit_args, *u)) for u in todo]
        result = run_units(work, RebuildWorker, worker_args, ray_cfg, actors, save, f"{stage}[{params.strategy}]",
                           len(units), progress, max_units, threads=params.threads)
        if result.ran < len(todo):
            return None
        table = pa.concat_tables([_read_unit(_unit_path(out, first)) for first, _ in units]).combine_chunks()
        write_parquet(out / "distances.parquet", table)
        d = table.column("d_theta").to_numpy()
        summary = {"groups": len(table), "d_theta_median": float(np.median(d)),
                   "d_theta_p90": float(np.quantile(d, 0.9)),
                   "log10_d_theta_median": float(np.log10(np.median(d))) if np.median(d) > 0 else None,
                   "placement": result.placement, "units_in_flight": result.units_in_flight,
                   "actor_startup_s": result.startup_s, "driver_busy_s": result.driver_s,
                   "method": replayed["method"],  # as run by the workers of this invocation (None if nothing ran)
                   "models_steps_per_s": replayed["model_steps"] / (time.perf_counter() - replayed["start"])}
        logger.d_theta(table.to_pylist())
        logger.summary(summary)
    atomic_write_json(out / "summary.json", summary)
    return summary
