"""The main job: every stage of the pipeline on Ray, in order: train, forge (phase 1), rebuild (phase 2)."""

from __future__ import annotations

from pathlib import Path

from rayforge.config import Config, config_from_dict
from rayforge.forge.driver import run_forge
from rayforge.forge.engine import ForgeParams
from rayforge.rebuild.driver import RebuildParams, run_rebuild
from rayforge.ray_utils import ray_session, resources
from rayforge.train.trainer import check_fresh_dir, train


def _train_remote(cfg_dict: dict, out_dir: str) -> dict:
    return train(config_from_dict(cfg_dict), out_dir, progress=True)


def run_pipeline(cfg: Config, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir).resolve()
    check_fresh_dir(out_dir)  # fail before starting Ray
    with ray_session(cfg.ray) as ray:
        # Training is one sequential SGD run: a single task placed where the config says (a GPU on a cluster).
        task = ray.remote(_train_remote).options(**resources(cfg.ray), max_retries=0)
        summary = ray.get(task.remote(cfg.to_dict(), str(out_dir)))
        forge_params = ForgeParams.from_config(cfg)
        forged = run_forge(out_dir, forge_params, cfg.ray.actors, cfg.ray, cfg.wandb)
        rebuilt = run_rebuild(out_dir, RebuildParams(strategy=forge_params.strategy, threads=forge_params.threads),
                              cfg.ray.actors, cfg.ray, cfg.wandb)
    return {"train": summary, "forge": forged, "rebuild": rebuilt}
