"""Ray stages as a cluster runs them: logical GPUs, the log's thread count in every worker, placement on record,
training streamed from a Ray task, workers that never touch the run directory."""

from __future__ import annotations

import shutil

import pytest

from helpers import forge_in_process
from rayforge.config import RayConfig
from rayforge.errors import RayforgeError
from rayforge.forge.driver import ForgeWorker, run_forge
from rayforge.forge.engine import ForgeParams, forge_dir
from rayforge.stage import StageWorker, Unit, run_units
from rayforge.train.run import TrainingRun


@pytest.fixture(scope="module")
def ray_gpus():
    """A local Ray whose node declares 2 logical GPUs (no CUDA here: they must compute on CPU)."""
    import ray

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
             logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def _files(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_training_streams_from_a_gpu_task_and_equals_local_training(ray_gpus, tmp_path, make_config):
    import json

    from rayforge.pipeline import train_stage
    from rayforge.train.trainer import train

    cfg = make_config(train={"threads": None}, ray={"num_gpus_per_actor": 1, "num_cpus_per_actor": 1})
    summary = train_stage(cfg, tmp_path / "ray", progress=False)
    train(make_config(train={"threads": 1}, ray={"num_gpus_per_actor": 1, "num_cpus_per_actor": 1}),
          tmp_path / "local", progress=False)
    logged = _files(tmp_path / "ray")
    assert {k: v for k, v in logged.items() if k.startswith(("trajectory/", "config", "dataset"))} == \
        {k: v for k, v in _files(tmp_path / "local").items() if k.startswith(("trajectory/", "config", "dataset"))}
    [where] = summary["placement"]
    assert where["gpus"] and where["units"] == 1 and summary["device"] == "cpu"  # a logical GPU, no CUDA
    assert json.loads(logged["train_summary.json"])["placement"] == summary["placement"]


def test_forge_on_logical_gpus_is_byte_identical_and_placed(ray_gpus, trained_run, tmp_path):
    import json

    for name in ("gpu", "cpu"):
        shutil.copytree(trained_run, tmp_path / name)
    run = TrainingRun.open(tmp_path / "gpu")
    params = ForgeParams.from_config(run.cfg, kappa=2, mu=3, lam=2, chunk=3, parts_per_unit=1, window=1)
    ray_cfg = RayConfig(num_gpus_per_actor=1, num_cpus_per_actor=1)
    summary = run_forge(tmp_path / "gpu", params, "auto", ray_cfg, run.cfg.wandb, progress=False)
    forge_in_process(tmp_path / "cpu", kappa=2, mu=3, lam=2, parts_per_unit=1)  # parts alone: their own rounding
    assert (forge_dir(tmp_path / "gpu", "paper") / "forged.parquet").read_bytes() == \
        (forge_dir(tmp_path / "cpu", "paper") / "forged.parquet").read_bytes()
    placement = summary["placement"]  # the actors that came up (a slow starter may find the work done)
    assert 1 <= len(placement) <= 2 and all(len(p["gpus"]) == 1 for p in placement)
    assert len({g for p in placement for g in p["gpus"]}) == len(placement)  # one logical GPU each
    assert sum(p["units"] for p in placement) == summary["units"] == 24  # 12 one-step windows x 2 parts
    assert 0 < summary["units_in_flight"]["mean"] <= summary["units_in_flight"]["limit"] == 2
    assert json.loads((forge_dir(tmp_path / "gpu", "paper") / "summary.json").read_text())["placement"] == placement


def test_auto_pool_is_one_actor_per_gpu(ray_gpus):
    from rayforge.ray_utils import pool_size

    assert pool_size("auto", {"num_cpus": 1, "num_gpus": 1}, 10) == 2
    assert pool_size("auto", {"num_cpus": 1, "num_gpus": 0.5}, 10) == 4
    assert pool_size("auto", {"num_cpus": 1, "num_gpus": 1}, 1) == 1


def test_workers_compute_with_the_logs_thread_count(ray_gpus, tmp_path, make_config):
    """Training logged 2 threads; a forging actor granted 1 CPU must still compute with 2 (BatchNorm logs replay
    exactly only then)."""
    import ray

    from rayforge.train.trainer import train

    class ThreadProbe(ForgeWorker):
        def threads(self) -> int:
            import torch

            return torch.get_num_threads()

    train(make_config(train={"threads": 2}), tmp_path / "run", progress=False)
    run = TrainingRun.open(tmp_path / "run")
    got = []
    params = ForgeParams.from_config(run.cfg, mu=2).to_json()
    run_units([Unit("t", "threads")], ThreadProbe, (ray.put(run.detach()), params), RayConfig(num_cpus_per_actor=1),
              1, lambda key, result: got.append(result), "probe", 1, progress=False)
    assert got == [2]


def test_a_worker_that_refuses_to_start_stops_the_stage_with_its_line(ray_gpus):
    class Broken(StageWorker):
        def __init__(self):
            raise RayforgeError("cannot compute here")

    with pytest.raises(RayforgeError) as info:
        run_units([Unit(1, "placement")], Broken, (), RayConfig(), 1, lambda k, r: None, "probe", 1, progress=False)
    assert str(info.value) == "probe: cannot compute here"


def test_a_log_without_thread_count_is_refused(trained_run, tmp_path):
    import yaml

    shutil.copytree(trained_run, tmp_path / "run")
    path = tmp_path / "run" / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["train"]["threads"] = None
    path.write_text(yaml.safe_dump(raw))
    run = TrainingRun.open(tmp_path / "run")
    with pytest.raises(RayforgeError, match="records no thread count"):
        run_forge(tmp_path / "run", ForgeParams.from_config(run.cfg), 1, run.cfg.ray, run.cfg.wandb, progress=False)


def test_a_detached_run_cannot_read_the_run_directory(trained_run):
    import copy

    run = TrainingRun.open(trained_run)
    shipped = copy.deepcopy(run.detach())  # a copy, as a Ray worker receives it (serialised by Ray, not by us)
    assert shipped.detached and shipped.dataset is not None
    assert shipped.load_dataset() is shipped.dataset  # no file read: the driver's copy
    model, _ = shipped.model_from_state(run.checkpoint(3), run.device())
    assert model is not None
    with pytest.raises(RuntimeError, match="only the driver reads the run directory"):
        shipped.checkpoint(3)
    with pytest.raises(RuntimeError, match="only the driver"):
        shipped.model_at(0, run.device())
