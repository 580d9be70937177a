"""The main job: every stage of the pipeline on Ray, in order: train, forge (phase 1), attack (phase 2: rebuild
with every forged model scored by the MI attacks), report. Each stage resumes from what is on disk."""

from __future__ import annotations

from pathlib import Path

from rayforge.config import Config, config_from_dict
from rayforge.forge.driver import run_forge
from rayforge.forge.engine import ForgeParams, forge_dir
from rayforge.ray_utils import ray_session, resources
from rayforge.io import check_fresh_dir
from rayforge.train.trainer import train


def _train_remote(cfg_dict: dict, out_dir: str) -> dict:
    return train(config_from_dict(cfg_dict), out_dir, progress=True)


def attack_stage(run_dir, cfg: Config, strategy: str, points: int | None, actors: int, save_models: int = 0) -> dict:
    """Phase 1 if its output is missing (resuming it if partial), then shadows, attacks and phase 2."""
    from rayforge.attacks.driver import run_attack

    if not (forge_dir(run_dir, strategy) / "forged.parquet").is_file():
        run_forge(run_dir, ForgeParams.from_config(cfg, strategy=strategy, points=points), actors, cfg.ray, cfg.wandb)
    return run_attack(run_dir, strategy, actors, cfg.ray, cfg.wandb, save_models=save_models)


def run_pipeline(cfg: Config, out_dir: str | Path) -> dict:
    from rayforge.report.render import write_report

    out_dir = Path(out_dir).resolve()
    check_fresh_dir(out_dir)  # fail before starting Ray
    with ray_session(cfg.ray) as ray:
        # Training is one sequential SGD run: a single task placed where the config says (a GPU on a cluster).
        task = ray.remote(_train_remote).options(**resources(cfg.ray), max_retries=0)
        summary = ray.get(task.remote(cfg.to_dict(), str(out_dir)))
        forge_params = ForgeParams.from_config(cfg)
        forged = run_forge(out_dir, forge_params, cfg.ray.actors, cfg.ray, cfg.wandb)
        attacked = attack_stage(out_dir, cfg, forge_params.strategy, cfg.forge.points, cfg.ray.actors)
    metrics = write_report(out_dir, forge_params.strategy)
    return {"train": summary, "forge": forged, "attack": attacked, "report": metrics}
