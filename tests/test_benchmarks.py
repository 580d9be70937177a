"""benchmarks/gpu.py: its code path runs on the CPU (`--device cpu --quick`) and prints one JSON line; without a
CUDA device it refuses in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def _run(*args):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)


def test_gpu_benchmark_dry_run_on_cpu():
    out = _run("--device", "cpu", "--quick", "--models", "2,3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["device"] == "cpu"
    for key in ("train_step_s", "phase1_paper_s_per_step", "phase1_swap_s_per_step", "phase2_sequential",
                "phase2_batched_2", "phase2_batched_3", "phase2_batched_over_sequential_3"):
        assert row[key] > 0, key
    assert row["phase1_swap_over_train"] == pytest.approx(row["phase1_swap_s_per_step"] / row["train_step_s"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_benchmark_without_a_device_says_so_in_one_line():
    out = _run()
    assert out.returncode == 1 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "no CUDA device" in out.stderr
