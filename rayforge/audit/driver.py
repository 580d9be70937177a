"""`rayforge audit`: the substitution residuals of every audited (step, point) on Ray (resumable, by checkpoint
segment, like phase 1), then the per-point criterion, `RUN/audit/points.parquet`, `summary.json` and the figure.

    RUN/audit/substitution/params.json     what determines the rows (pool size, seed, threads, epochs, points)
    RUN/audit/substitution/units/*.parquet one file per finished checkpoint segment
    RUN/audit/substitution/rows.parquet    every audited (step, point), sorted by (step, point)
    RUN/audit/points.parquet, summary.json the audit (rayforge.audit.criterion)
    RUN/report/audit_least_repudiable.png  the least repudiable points' images (rayforge.audit.figure)
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from rayforge.audit.criterion import audit_points, summarize
from rayforge.audit.figure import least_repudiable_figure
from rayforge.audit.substitution import (ROWS_SCHEMA, SubstitutionContext, SubstitutionParams, rows_table,
                                         substitution_unit)
from rayforge.config import RayConfig, WandbConfig
from rayforge.errors import RayforgeError
from rayforge.forge.engine import prepare_output
from rayforge.io import atomic_write_json, read_table_if_valid, write_parquet
from rayforge.stage import StageWorker, Unit, run_units
from rayforge.tracking import MetricLogger
from rayforge.train.run import TrainingRun


class SubstitutionWorker(StageWorker):
    """An audit actor (wrapped with ray.remote by the driver): opens the run once, then computes segments.
    Unlike the forge/rebuild/attack stages' workers it reads the run directory itself (checkpoints), so on a
    cluster `rayforge audit` needs the run directory on a filesystem its workers share."""

    def __init__(self, run_dir: str, params: dict):
        self.ctx = SubstitutionContext(TrainingRun.open(run_dir), SubstitutionParams(**params))

    def rows(self, start: int, stop: int) -> pa.Table:
        return substitution_unit(self.ctx, start, stop)


def audit_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "audit"


def _unit_path(out: Path, start: int) -> Path:
    return out / "units" / f"seg-{start:08d}.parquet"


def substitution_rows(run: TrainingRun, params: SubstitutionParams, actors: int, ray_cfg: RayConfig,
                      use_ray: bool = True, progress: bool = True) -> pa.Table:
    """Every audited (step, point) row, computing only the checkpoint segments not yet on disk."""
    params.validate(run)
    out = audit_dir(run.run_dir) / "substitution"
    prepare_output(out, params, "audit with the same --pool, --epochs and --points")
    ctx = None if use_ray else SubstitutionContext(run, params)
    units = [(a, b) for a, b in zip(run.checkpoints, run.checkpoints[1:])]
    todo = [Unit(u, "rows", u) for u in units if read_table_if_valid(_unit_path(out, u[0]), ROWS_SCHEMA) is None]

    def save(unit, table) -> None:
        write_parquet(_unit_path(out, unit[0]), table)

    if use_ray:
        run_units(todo, SubstitutionWorker, (str(run.run_dir), params.to_json()), ray_cfg, actors, save, "audit",
                  len(units), progress)
    else:
        for unit in todo:
            save(unit.key, substitution_unit(ctx, *unit.key))
    tables = [read_table_if_valid(_unit_path(out, a), ROWS_SCHEMA) for a, _ in units]
    if any(t is None for t in tables):
        raise RayforgeError(f"{out}: some segments are missing; rerun `rayforge audit` to finish them")
    table = pa.concat_tables([rows_table([]), *tables]).sort_by([("step", "ascending"), ("point", "ascending")])
    write_parquet(out / "rows.parquet", table)
    return table


def run_audit(run_dir: str | Path, strategy: str | None, params: SubstitutionParams, actors: int,
              ray_cfg: RayConfig, use_ray: bool = True, progress: bool = True,
              wandb_cfg: WandbConfig | None = None) -> dict:
    """The whole audit of RUN against strategy `strategy`'s phase-1/2 and attack outputs (those present)."""
    run = TrainingRun.open(run_dir)
    strategy = strategy or run.cfg.forge.strategy
    rows = substitution_rows(run, params, actors, ray_cfg, use_ray, progress)
    points = audit_points(run, rows, strategy)
    out = audit_dir(run.run_dir)
    write_parquet(out / "points.parquet", points)
    summary = summarize(points, strategy, params)
    atomic_write_json(out / "summary.json", summary)
    figure = least_repudiable_figure(run, points, run.run_dir / "report")
    _log(run, params, points, summary, figure, wandb_cfg or run.cfg.wandb)
    return summary


def _log(run: TrainingRun, params: SubstitutionParams, points: pa.Table, summary: dict, figure: Path | None,
         wandb_cfg: WandbConfig) -> None:
    """RUN/metrics/audit.jsonl and W&B: the counts, every point's score and evidence, the figure."""
    columns = ["point", "repudiable", "score", "unmatched_influence", "self_influence", "unmatched"]
    with MetricLogger(run.run_dir, "audit", wandb_cfg, params.to_json(), run_name=run.cfg.name) as logger:
        logger.table("audit/points", columns, [list(r) for r in zip(*(points.column(c).to_pylist()
                                                                       for c in columns))], histograms=["score"])
        if figure is not None:
            logger.media({"audit/least_repudiable": figure}, {})
        logger.summary({f"audit/{k}": summary[k] for k in ("points", "repudiable", "not_repudiable",
                                                            "share_repudiable")})
