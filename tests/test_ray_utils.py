"""Ray at the edge: a private local session unless a cluster is named, fast failure on an unreachable one, what
actors request, where workers compute, and run paths inside Ray jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rayforge.config import RayConfig
from rayforge.errors import RayforgeError
from rayforge.ray_utils import named_address, pool_size, ray_session, resolve_run_path

ROOT = Path(__file__).resolve().parent.parent


def _dead_port() -> int:
    import socket

    with socket.socket() as s:  # a port nothing listens on (bound, then released)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_named_address_comes_from_config_then_environment(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert named_address(RayConfig()) is None
    assert named_address(RayConfig(address="local")) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert named_address(RayConfig()) == "10.0.0.1:6379"
    assert named_address(RayConfig(address="10.0.0.2:6379")) == "10.0.0.2:6379"


def test_unreachable_cluster_fails_within_seconds_with_one_line(monkeypatch):
    import ray

    import rayforge.ray_utils

    monkeypatch.setattr(rayforge.ray_utils, "PROBE_TIMEOUT_S", 1.0)
    assert not ray.is_initialized()
    for address in (f"127.0.0.1:{_dead_port()}", f"ray://127.0.0.1:{_dead_port()}"):
        start = time.perf_counter()
        with pytest.raises(RayforgeError, match="does not answer within") as info:
            with ray_session(RayConfig(address=address)):
                pass
        assert time.perf_counter() - start < 15 and "\n" not in str(info.value)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_dead_port()}")
    with pytest.raises(RayforgeError, match=r"RAY_ADDRESS"):
        with ray_session(RayConfig()):
            pass
    assert not ray.is_initialized()


def test_stale_bootstrap_file_is_ignored_unless_named(tmp_path):
    """A head that died leaves Ray's bootstrap file behind: a bare `ray.init()` would retry its GCS forever. Without
    an address we start a private Ray; `address: auto` (which reads the file) is refused within seconds."""
    ray_tmp = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    (Path(ray_tmp) / "ray").mkdir()
    (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_dead_port()}")
    script = (
        "import functools, sys, time\n"
        "import ray._private.services as services\n"
        # Ray's "auto" falls back to any live Ray found by a process scan: other Ray instances on the machine
        # (another test run, a job) must not stand in for the dead head this test is about.
        "services.find_gcs_addresses = functools.lru_cache(maxsize=None)(lambda: [])\n"
        "from rayforge.config import RayConfig\n"
        "from rayforge.errors import RayforgeError\n"
        "from rayforge.ray_utils import ray_session\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    with ray_session(RayConfig(address='auto')):\n"
        "        print('attached')\n"
        "except RayforgeError as exc:\n"
        "    print('refused', round(time.perf_counter() - t, 1), exc)\n"
        "with ray_session(RayConfig()) as ray:\n"
        "    print('private', ray.get(ray.put(41)) + 1)\n")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr[-2000:]
    assert lines[0].startswith("refused") and float(lines[0].split()[1]) < 15, lines
    assert lines[1] == "private 42", lines


def test_cli_with_a_dead_ray_address_exits_with_one_line(trained_run):
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{_dead_port()}"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "rayforge.cli", "forge", str(trained_run), "--mu", "2"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1 and time.perf_counter() - start < 60
    errors = [ln for ln in out.stderr.splitlines() if ln.strip() and "it/s" not in ln and "unit/s" not in ln]
    assert len(errors) == 1 and errors[0].startswith("error: ray: the Ray cluster at"), out.stderr[-2000:]


def test_gpu_request_is_kept_for_a_named_cluster_and_dropped_on_a_local_cpu_ray(ray_local, monkeypatch, capsys):
    from rayforge.ray_utils import actor_options

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = RayConfig(num_gpus_per_actor=1, num_cpus_per_actor=1)
    assert actor_options(cfg) == {"num_cpus": 1, "num_gpus": 0}
    assert actor_options(cfg) == {"num_cpus": 1, "num_gpus": 0}
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warned == ["rayforge: warning: ray.num_gpus_per_actor=1 but this local Ray has no GPU: running on CPU"]
    # A named cluster may have no GPU node up yet: the request must stay, so its autoscaler sees it.
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert actor_options(cfg) == {"num_cpus": 1, "num_gpus": 1}
    assert actor_options(RayConfig(num_gpus_per_actor=0)) == {"num_cpus": 1.0, "num_gpus": 0}


def test_a_cpu_worker_asks_for_the_threads_it_computes_with(ray_local, monkeypatch):
    from rayforge.ray_utils import actor_options

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = RayConfig(num_cpus_per_actor=1, num_gpus_per_actor=0)
    assert actor_options(cfg, threads=1) == {"num_cpus": 1, "num_gpus": 0}
    options = actor_options(cfg, threads=2)  # a log trained with 2 threads: one actor per 2 CPUs
    assert options == {"num_cpus": 2, "num_gpus": 0}
    assert pool_size("auto", options, 10) == 1
    with pytest.raises(RayforgeError, match="trained with 3 torch threads.*largest node has 2 CPUs"):
        actor_options(cfg, threads=3)  # would wait forever for a node that does not exist
    # A GPU worker computes on its GPU: it keeps its CPU request (a named cluster keeps the GPU one).
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert actor_options(RayConfig(num_cpus_per_actor=1, num_gpus_per_actor=1), threads=8) == \
        {"num_cpus": 1, "num_gpus": 1}


def test_auto_pool_follows_the_cluster_and_the_work(ray_local):
    assert pool_size("auto", {"num_cpus": 1, "num_gpus": 0}, 10) == 2  # 2 CPUs
    assert pool_size("auto", {"num_cpus": 1, "num_gpus": 0}, 1) == 1  # capped by the work
    assert pool_size("auto", {"num_cpus": 1, "num_gpus": 1}, 10) == 1  # no GPU up: one pending actor
    assert pool_size(5, {"num_cpus": 1, "num_gpus": 0}, 3) == 3


def test_run_paths_inside_a_ray_job(monkeypatch, tmp_path):
    monkeypatch.delenv("RAYFORGE_SUBMIT_DIR", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_run_path("runs/a") == tmp_path / "runs" / "a"
    assert resolve_run_path("/abs/run") == Path("/abs/run")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # as Ray's job supervisor sets it
    with pytest.raises(RayforgeError, match="relative path inside a Ray job"):
        resolve_run_path("runs/a")
    assert resolve_run_path("/abs/run") == Path("/abs/run")
    monkeypatch.setenv("RAYFORGE_SUBMIT_DIR", "/home/me/project")
    assert resolve_run_path("runs/a") == Path("/home/me/project/runs/a")
    monkeypatch.setenv("RAYFORGE_SUBMIT_DIR", "relative")
    with pytest.raises(RayforgeError, match="absolute"):
        resolve_run_path("runs/a")


def test_cli_refuses_a_relative_out_inside_a_ray_job(tmp_path, make_config):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(make_config().to_dict()))
    env = {**os.environ, "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}
    env.pop("RAYFORGE_SUBMIT_DIR", None)
    out = subprocess.run([sys.executable, "-m", "rayforge.cli", "train", str(path), "--out", "runs/x"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "relative path inside a Ray job" in out.stderr
    assert not (tmp_path / "runs").exists()
    # An absolute one is fine, and the job's driver does not train: a Ray task does.
    out = subprocess.run([sys.executable, "-m", "rayforge.cli", "train", str(path), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert [p["units"] for p in summary["placement"]] == [1]
