"""Shared fixtures: W&B off, a private cache dir, tiny configs, and one module-scoped local Ray."""

from __future__ import annotations

import os

import pytest

from helpers import forge_in_process, tiny_config  # noqa: F401  (re-exported for tests)

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RAYFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


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


@pytest.fixture(scope="module")
def forged_run(trained_run, tmp_path_factory):
    """The tiny run with phase 1 done in-process (kappa=2, mu=3, lam=2: 30 groups)."""
    import shutil

    dst = tmp_path_factory.mktemp("forged") / "run"
    shutil.copytree(trained_run, dst)
    forge_in_process(dst)
    return dst
