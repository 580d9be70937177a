"""The `ray job submit` entrypoints: `--out` that survives the job, and the runtime environment they need."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parents[2] / "jobs"
sys.path.insert(0, str(JOBS))

from entry import RAY_JOB_ENV, out_args  # noqa: E402
from runtime_env import runtime_env  # noqa: E402


def test_out_must_be_absolute_inside_a_ray_job():
    with pytest.raises(ValueError, match="absolute path on the head node"):
        out_args(["cfg.yaml", "--out", "runs/x"], in_ray_job=True)
    with pytest.raises(ValueError, match="relative"):
        out_args(["cfg.yaml", "--out=runs/x", "--set", "seed=1"], in_ray_job=True)
    assert out_args(["cfg.yaml", "--out", "/data/runs/x", "--set", "a=1"], in_ray_job=True) == \
        (["cfg.yaml", "--out", "/data/runs/x", "--set", "a=1"], Path("/data/runs/x"))
    home = Path("~").expanduser()
    assert out_args(["--out=~/runs/x", "cfg.yaml"], in_ray_job=True) == ([f"--out={home}/runs/x", "cfg.yaml"],
                                                                         home / "runs" / "x")
    assert out_args(["cfg.yaml", "--out", "runs/x"], in_ray_job=False) == (["cfg.yaml", "--out", "runs/x"],
                                                                           Path("runs/x"))


def test_relative_out_in_a_ray_job_is_one_line_and_writes_nothing(tmp_path):
    env = {**os.environ, RAY_JOB_ENV: "{}"}
    done = subprocess.run([sys.executable, str(JOBS / "train.py"), "missing.yaml", "--out", "runs/x"], cwd=tmp_path,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: --out 'runs/x' is relative")
    assert not any(tmp_path.iterdir())


def test_runtime_env_passes_wandb_settings_and_named_variables():
    environ = {"WANDB_API_KEY": "k" * 40, "WANDB_MODE": "offline", "WANDB_ENTITY": "", "RAYFORGE_DATA": "/here",
               "HOME": "/root"}
    env = runtime_env(["RAYFORGE_DATA=/home/ray/data", "WANDB_PROJECT=p=q"], environ)
    assert env["env_vars"] == {"WANDB_API_KEY": "k" * 40, "WANDB_MODE": "offline", "WANDB_PROJECT": "p=q",
                               "RAYFORGE_DATA": "/home/ray/data"}
    assert env["working_dir"] == "." and {"runs", "wandb", ".venv", ".git"} <= set(env["excludes"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        runtime_env(["RAYFORGE_DATA"], environ)
