"""Phase 1 on Ray: the driver hands (checkpoint segment, parts) units to forging actors and writes their results.

Actors each hold the log, the training tensors and a model once (one GPU each on a cluster), restore θ from the
log's checkpoints and step the original trajectory themselves, so no weights travel per step (scheduling, bounded
in-flight work and dead-actor replacement: rayforge.stage). The driver alone writes: each finished unit goes to its
own file at once (atomic), so a stopped run (Ctrl-C, killed driver or actor) loses at most the units in flight, a
rerun skips finished units, and the merged `forged.parquet` is byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from rayforge.config import RayConfig, WandbConfig
from rayforge.forge.engine import (ForgeContext, ForgeParams, forge_dir, forge_unit, merge_units, needed_parts,
                                   plan_units, prepare_output, read_unit, unit_path, unit_table)
from rayforge.forge.splits import Splits
from rayforge.stage import run_units
from rayforge.tracking import MetricLogger
from rayforge.io import atomic_write_json, write_parquet
from rayforge.train.run import TrainingRun


class ForgeWorker:
    """A forging actor (wrapped with ray.remote by the driver): opens the run once, then forges units."""

    def __init__(self, run_dir: str, params: dict):
        self.ctx = ForgeContext(TrainingRun.open(run_dir), ForgeParams(**params))

    def forge(self, start: int, stop: int, parts: tuple) -> dict:
        return forge_unit(self.ctx, start, stop, parts)


def _finish(out: Path, run: TrainingRun, params: ForgeParams, units, wall: float, evals: float,
            wandb_cfg: WandbConfig) -> dict:
    table = merge_units(out, units)
    err = table.column("grad_error").to_numpy()
    norm = table.column("grad_norm").to_numpy()
    rel = err / np.maximum(norm, 1e-30)
    steps = table.column("step").to_numpy()
    train_wall = _train_wall(run)
    summary = {
        "strategy": params.strategy, "rows": len(table), "steps": int(run.total_steps),
        "grad_evals": round(float(evals), 2), "grad_evals_per_step": evals / run.total_steps,
        "forge_wall_s": wall, "candidates_per_s": evals / wall if wall else None,
        "train_wall_s": train_wall, "forge_over_train": wall / train_wall if train_wall else None,
        "rel_error_median": float(np.median(rel)), "rel_error_p90": float(np.quantile(rel, 0.9)),
        "grad_error_median": float(np.median(err)),
    }
    with MetricLogger(run.run_dir, f"forge-{params.strategy}", wandb_cfg, params.to_json(),
                      run_name=run.cfg.name) as logger:
        for t in np.unique(steps):  # per-step forging error over parts, in step order (independent of scheduling)
            at = steps == t
            logger.log({"forge/grad_error_mean": float(err[at].mean()), "forge/grad_error_max": float(err[at].max()),
                        "forge/rel_error_mean": float(rel[at].mean()), "forge/rel_error_max": float(rel[at].max())},
                       step=int(t))
        logger.summary(summary)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _train_wall(run: TrainingRun) -> float | None:
    path = run.run_dir / "train_summary.json"
    return json.loads(path.read_text()).get("train_wall_s") if path.is_file() else None


def run_forge(run_dir: str | Path, params: ForgeParams, actors: int, ray_cfg: RayConfig, wandb_cfg: WandbConfig,
              progress: bool = True, max_units: int | None = None,
              on_unit: Callable[[tuple], None] | None = None) -> dict | None:
    """Forge every (segment, part) unit not yet on disk; merge when all are done. `max_units` stops early
    (as a Ctrl-C would) and returns None; `on_unit` is called after each unit is saved."""
    run = TrainingRun.open(run_dir)
    params.validate(int(run.info["n"]), max(len(b) for b in run.steps.batch))
    run.load_dataset()  # fail here, once and clearly, if the data differs from the log's (not in every actor)
    out = forge_dir(run.run_dir, params.strategy)
    prepare_output(out, params)
    splits = Splits(int(run.info["n"]), params.lam, params.kappa, params.seed)
    units = plan_units(run.checkpoints, params.kappa, needed_parts(splits, run.steps, params.points),
                       params.parts_per_unit)
    todo = [u for u in units if read_unit(unit_path(out, u)) is None]
    progress_path = out / "progress.json"  # gradient evaluations per unit and driver time, summed over resumes
    record = _read_progress(progress_path)
    evals, elapsed_before = record["evals"], record["elapsed_s"]
    start_time = time.perf_counter()
    totals = {"rel": 0.0, "rows": 0, "evals": 0, "steps": 0}

    def save(unit, result) -> None:
        # Record first, then the unit: a kill in between only redoes the unit, whose count is the same.
        evals[f"{unit[0]}:{unit[2][0]}"] = result["grad_evals"]
        atomic_write_json(progress_path, {"evals": evals,
                                          "elapsed_s": elapsed_before + time.perf_counter() - start_time})
        write_parquet(unit_path(out, unit), unit_table(result["columns"]))
        cols = result["columns"]
        rel = np.asarray(cols["grad_error"]) / np.maximum(np.asarray(cols["grad_norm"]), 1e-30)
        totals["rel"] += float(rel.sum())
        totals["rows"] += len(rel)
        totals["evals"] += result["grad_evals"]
        totals["steps"] += unit[1] - unit[0]
        if on_unit:
            on_unit(unit)

    def postfix(result, elapsed: float) -> dict:
        return {"steps": totals["steps"], "cand_per_s": f"{totals['evals'] / elapsed:.0f}",
                "rel_err": f"{totals['rel'] / max(totals['rows'], 1):.3f}"}

    ran = run_units(todo, ForgeWorker, (str(run.run_dir), params.to_json()), "forge", ray_cfg, actors, save,
                    f"forge[{params.strategy}]", len(units), progress, max_units, postfix)
    if ran < len(todo):
        return None  # stopped early: progress is on disk, a rerun resumes
    wall = elapsed_before + time.perf_counter() - start_time
    return _finish(out, run, params, units, wall, sum(evals.values()), wandb_cfg)


def _read_progress(path: Path) -> dict:
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        record = {}
    return {"evals": dict(record.get("evals", {})), "elapsed_s": float(record.get("elapsed_s", 0.0))}
