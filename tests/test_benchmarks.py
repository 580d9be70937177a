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


# ---------------------------------------------------------------------------------------------- benchmarks/claims.py

def _claims():
    import importlib.util

    spec = importlib.util.spec_from_file_location("claims", ROOT / "benchmarks" / "claims.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _with_stored_shadows(trained_run, tmp_path):
    """A copy of the tiny run with its shadows trained in-process and stored where `rayforge attack` stores them."""
    import shutil

    from rayforge.attacks.driver import ShadowWorker, attack_root, shadow_set, worker_population
    from rayforge.train.run import TrainingRun

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    run = TrainingRun.open(run_dir)
    worker = ShadowWorker(run)
    states = [worker.train(k) for k in range(run.cfg.attack.shadows)]
    pop, _ = worker_population(run)
    shadow_set(run, pop, states, {}).save(attack_root(run_dir) / "shadows")
    return run


def test_claims_scores_a_heldout_xstar_on_the_original_and_the_include_por(trained_run, tmp_path):
    import numpy as np

    from rayforge.api import verify_por
    from rayforge.attacks.evaluate import attack_population
    from rayforge.data import point_sha256

    claims = _claims()
    run = _with_stored_shadows(trained_run, tmp_path)
    pop, n, record = attack_population(run.load_dataset(), run.cfg)
    k = 3
    xstar = claims.heldout_point(run, k)
    assert np.array_equal(xstar.images[0], pop.images.images[n + k]) and xstar.labels[0] == pop.images.labels[n + k]
    out = tmp_path / "claims"
    rows = (claims.exclude_rows(run, [5], out)
            + claims.include_rows(run, [("heldout", k, xstar)], [], out))
    assert [(r["kind"], r.get("pick")) for r in rows] == [("exclude", None), ("include", "best"), ("include", "random")]
    include = rows[1]
    manifest = json.loads((Path(include["dir"]) / "por.json").read_text())
    assert manifest["include"]["sha256"] == point_sha256(xstar, 0) and include["H"] == run.cfg.train.epochs
    assert verify_por(include["dir"]).valid
    claims.mi_equivalence(run, rows, actors=1)
    original, _ = run.model_at(run.total_steps, torch.device("cpu"))
    attacks = claims.fitted_attacks(run, pop, 1)
    for row, point in ((rows[0], 5), (include, n + k)):
        before = claims.score_all(attacks, original, np.array([point]))
        for name, v in row["mi"].items():
            assert v["pred_original"] == bool(before[name]["pred"][0])
            assert v["score_original"] == pytest.approx(float(before[name]["score"][0]), rel=1e-4)  # float32 batches
            assert 0 <= v["common_flipped"] <= 1 and 0 <= v["validation_flipped"] <= 1
    assert "M" in claims.table(rows) or "N" in claims.table(rows)
    with pytest.raises(claims.RayforgeError, match="--heldout"):
        claims.heldout_point(run, len(pop) - n)


def test_claims_changes_splits_diff_common_and_validation():
    import numpy as np

    claims = _claims()
    n = 4  # ids 0..3 members, 4..7 held out
    before = {"a": {"pred": np.array([1, 1, 0, 1, 0, 0, 1, 0]), "score": np.zeros(8)}}
    after = {"a": {"pred": np.array([0, 1, 1, 1, 0, 1, 1, 0]), "score": np.arange(8.0)}}
    excluded = claims.changes(before, after, 0, n)["a"]  # the point itself flips; one of 3 other members does
    assert (excluded["pred_original"], excluded["pred_forged"]) == (True, False)
    assert excluded["common_flipped"] == pytest.approx(1 / 3) and excluded["validation_flipped"] == pytest.approx(1 / 4)
    assert excluded["common_score_shift_median"] == pytest.approx(2.0)
    included = claims.changes(before, after, 5, n)["a"]  # x* = id 5 flips N -> M; no other held-out point does
    assert (included["pred_original"], included["pred_forged"]) == (False, True)
    assert included["common_flipped"] == pytest.approx(2 / 4) and included["validation_flipped"] == 0
    public = claims.changes(before, after, None, n)["a"]
    assert "pred_original" not in public and public["validation_flipped"] == pytest.approx(1 / 4)
    assert claims.point_id({"kind": "include", "heldout": 2}, n, {}) == n + 2
    assert claims.point_id({"kind": "exclude", "point": 1}, n, {}) == 1
    assert "not a held-out point" in claims.point_id({"kind": "include", "test": 7}, n, {})
    assert claims.point_id({"kind": "include", "test": 7}, n, {7: n + 3}) == n + 3


# ---------------------------------------------------------------------------------------- benchmarks/rebuild_throughput.py

def test_rebuild_profile_splits_both_replays_by_operator(forged_run):
    import importlib.util

    from rayforge.rebuild.engine import RebuildContext
    from rayforge.train.run import TrainingRun

    spec = importlib.util.spec_from_file_location("rebuild_throughput", ROOT / "benchmarks" / "rebuild_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.operator_profile(RebuildContext(TrainingRun.open(forged_run), "paper", threads=1), [3, 4, 5], top=5)
    assert len(rows) == 5
    names = [r[0] for r in rows]
    assert len(set(names)) == 5
    shares = [r[2] for r in rows]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-9  # the batched replay's top operators
    for _, seq_share, bat_share, ratio in rows:
        assert 0 <= seq_share <= 1 and 0 < bat_share <= 1
        assert ratio > 0 if seq_share else ratio != ratio  # NaN for an operator the sequential replay never ran
