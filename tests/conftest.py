"""Shared fixtures: W&B off, a private cache dir, tiny configs, and one module-scoped local Ray."""

from __future__ import annotations

import os

import pytest

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RAYFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def tiny_config(**sections):
    """A config small enough to train in well under a second: synthetic data, logreg, 2 epochs."""
    from rayforge.config import config_from_dict

    raw = {
        "name": "tiny",
        "seed": 3,
        "data": {"dataset": "synthetic", "synthetic_train": 60, "synthetic_test": 40, "synthetic_shape": [1, 8, 8]},
        "model": {"name": "logreg"},
        "train": {"epochs": 2, "batch_size": 10, "lr": 0.1, "threads": 1, "device": "cpu"},
        "forge": {"kappa": 2, "mu": 4, "lam": 1},
        "attack": {"shadows": 4},
        "ray": {"actors": 2},
        "wandb": {"mode": "disabled"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
             logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def make_config():
    """`make_config(train={...}, model={...})` -> a tiny Config (see `tiny_config`)."""
    return tiny_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny training run per test module (logreg on synthetic data, checkpoint every 3 steps)."""
    from rayforge.train.trainer import train

    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_config(train={"checkpoint_every": 3}), out, progress=False)
    return out


def forge_in_process(run_dir, kappa=2, mu=3, lam=2, strategy="paper", points=None):
    """Phase 1 with the plain functions (no Ray), written where `rayforge forge` writes it."""
    import pyarrow as pa

    from rayforge.forge.engine import (ForgeContext, ForgeParams, forge_dir, forge_unit, plan_units,
                                       prepare_output, unit_table)
    from rayforge.train.log import write_parquet
    from rayforge.train.run import TrainingRun

    run = TrainingRun.open(run_dir)
    params = ForgeParams.from_config(run.cfg, strategy=strategy, kappa=kappa, mu=mu, lam=lam, threads=1, chunk=3,
                                     points=points)
    ctx = ForgeContext(run, params)
    tables = [unit_table(forge_unit(ctx, a, b, k)["columns"])
              for a, b, k in plan_units(run.checkpoints, kappa, ctx.needed)]
    out = forge_dir(run_dir, strategy)
    prepare_output(out, params)
    table = pa.concat_tables(tables).sort_by([("step", "ascending"), ("part", "ascending")])
    write_parquet(out / "forged.parquet", table)
    return params


@pytest.fixture(scope="module")
def forged_run(trained_run, tmp_path_factory):
    """The tiny run with phase 1 done in-process (kappa=2, mu=3, lam=2: 30 groups)."""
    import shutil

    dst = tmp_path_factory.mktemp("forged") / "run"
    shutil.copytree(trained_run, dst)
    forge_in_process(dst)
    return dst
