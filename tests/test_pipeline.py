"""The main job on local Ray, and the `ray job submit` entrypoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rayforge.pipeline import run_pipeline
from rayforge.train.replay import replay
from rayforge.train.run import TrainingRun

ROOT = Path(__file__).resolve().parent.parent


def test_run_pipeline_on_local_ray(ray_local, tmp_path, make_config):
    # threads unset: the run must log the thread count it used (1 in a Ray worker) so replay is exact here
    result = run_pipeline(make_config(train={"threads": None}), tmp_path / "run")
    assert 0.0 <= result["train"]["test_accuracy"] <= 1.0
    run = TrainingRun.open(tmp_path / "run")
    assert replay(run, 0, run.checkpoints[1]).exact
    assert result["forge"]["rows"] == run.total_steps * 2  # every (step, part) forged, kappa=2
    assert (tmp_path / "run" / "forge" / "paper" / "forged.parquet").is_file()
    assert result["rebuild"]["groups"] == 60 and result["rebuild"]["d_theta_median"] > 0  # lam=1


def test_job_entrypoints_are_the_cli():
    for job in ("run.py", "train.py"):
        out = subprocess.run([sys.executable, str(ROOT / "jobs" / job), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "--out" in out.stdout
