"""Slow checks on real data: the main job on a multi-node Ray cluster (scripts/cluster_check.py), and a BatchNorm log
forged by actors granted fewer CPUs than training used threads. Run with `python -m pytest -m slow tests/test_cluster.py`
(needs RAYFORGE_DATA with MNIST and CIFAR-10)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("RAYFORGE_DATA"), reason="needs RAYFORGE_DATA")]


def test_main_job_on_a_multi_node_cluster_places_gpu_work_on_workers_and_matches_a_local_run(tmp_path):
    out = subprocess.run([sys.executable, "scripts/cluster_check.py", "--work", str(tmp_path / "work")], cwd=ROOT,
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0 and "cluster check: passed" in out.stdout, out.stdout[-4000:] + out.stderr[-4000:]
    assert "0 differ" in out.stdout


def test_batchnorm_log_forges_with_actors_of_one_cpu(tmp_path):
    """The log records 2 threads; each forging actor asks Ray for 1 CPU. Before workers computed with the log's
    thread count, this stopped with "the log does not replay ... 0.000136 (max abs)"."""
    run = tmp_path / "R"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    train = ["train", "configs/cifar10_resnet_mini.yaml", "--out", str(run), "--set", "data.subset=400",
             "--set", "train.epochs=3", "--set", "train.checkpoint_every=4", "--set", "ray.num_gpus_per_actor=0",
             "--set", "train.threads=2"]
    for args in (train, ["forge", str(run), "--mu", "2", "--points", "1", "--actors", "1"]):
        out = subprocess.run([sys.executable, "-m", "rayforge.cli", *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=3600)
        assert out.returncode == 0, out.stderr[-3000:]
    assert "forged" in out.stdout
