"""The main job: every stage of the pipeline on Ray, in order: train, forge (phase 1), attack (phase 2: rebuild
with every forged model scored by the MI attacks), report. Each stage resumes from what is on disk.

The driver (a `ray job submit` entrypoint sits on the head node) only reads and writes the run directory: training
runs in one Ray task that asks for the configured resources (a GPU on a cluster) and streams the log back to the
driver as it is made, and every later stage computes in actors (rayforge.stage).
"""

from __future__ import annotations

from pathlib import Path

from rayforge.config import Config
from rayforge.data import Dataset, build_dataset
from rayforge.forge.driver import run_forge
from rayforge.forge.engine import ForgeParams, forge_dir
from rayforge.io import check_fresh_dir
from rayforge.ray_utils import actor_options, placement, ray_session, unwrap
from rayforge.train.run import TrainingRun
from rayforge.train.trainer import training_log, with_threads, write_log

STREAM_AHEAD = 4  # log records a training task may produce before the driver has written them


def _training_records(cfg_dict: dict, ds: Dataset, progress: bool):
    """The Ray task: where it runs, then the log records as training makes them."""
    from rayforge.config import config_from_dict

    yield "placement", placement()
    yield from training_log(config_from_dict(cfg_dict), ds, progress)


def train_stage(cfg: Config, out_dir: str | Path, progress: bool = True) -> dict:
    """Train on Ray: one task placed where the config says (a GPU on a cluster), computing with `train.threads`
    (default: the task's whole CPUs); the driver reads the data, ships it, and writes the log as it streams back.
    The `ray job submit` entrypoints call this (or `run_pipeline`), never the in-process trainer."""
    out_dir = Path(out_dir)
    check_fresh_dir(out_dir)  # fail before starting Ray
    with ray_session(cfg.ray) as ray:
        options = actor_options(cfg.ray, cfg.train.threads)
        cfg = with_threads(cfg, max(1, int(options["num_cpus"])))
        ds = build_dataset(cfg.data, cfg.seed)
        task = ray.remote(_training_records).options(**options, num_returns="streaming", max_retries=0,
                                                     _generator_backpressure_num_objects=STREAM_AHEAD)
        where: list[dict] = []

        def records():
            try:
                for ref in task.remote(cfg.to_dict(), ray.put(ds), progress):
                    record = ray.get(ref)
                    if record[0] == "placement":
                        where.append({**record[1], "units": 1})
                    else:
                        yield record
            except ray.exceptions.RayTaskError as exc:
                raise unwrap(exc) from None

        return write_log(records(), out_dir, {"placement": where})


def attack_stage(run_dir, cfg: Config, strategy: str, points: int | None, actors: int | str,
                 save_models: int = 0) -> dict:
    """Phase 1 if its output is missing (resuming it if partial), then shadows, attacks and phase 2."""
    from rayforge.attacks.driver import run_attack

    if not (forge_dir(run_dir, strategy) / "forged.parquet").is_file():
        run_forge(run_dir, ForgeParams.from_config(cfg, strategy=strategy, points=points), actors, cfg.ray, cfg.wandb)
    return run_attack(run_dir, strategy, actors, cfg.ray, cfg.wandb, save_models=save_models)


def run_pipeline(cfg: Config, out_dir: str | Path) -> dict:
    from rayforge.report.render import write_report

    out_dir = Path(out_dir)
    check_fresh_dir(out_dir)  # fail before starting Ray
    with ray_session(cfg.ray):
        summary = train_stage(cfg, out_dir)
        logged = TrainingRun.open(out_dir).cfg  # the config as logged (thread count resolved)
        forge_params = ForgeParams.from_config(logged)
        forged = run_forge(out_dir, forge_params, cfg.ray.actors, cfg.ray, cfg.wandb)
        attacked = attack_stage(out_dir, logged, forge_params.strategy, logged.forge.points, cfg.ray.actors)
    metrics = write_report(out_dir, forge_params.strategy)
    return {"train": summary, "forge": forged, "attack": attacked, "report": metrics}
