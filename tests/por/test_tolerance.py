"""Tolerance a reader can weigh: every segment's deviation in text and JSON, --tol-rel, ε checked without slack, and
the two log-only edits a segment tolerance alone cannot tell from a real trajectory (rayforge.por.probes)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from rayforge.cli import main
from rayforge.por import verify_por
from rayforge.por.probes import log_only_por, scale_lr
from rayforge.train.log import read_steps
from rayforge.train.run import TrainingRun
from rayforge.train.trainer import train

from helpers import tiny_config

SEGMENT_LINE = re.compile(r"^steps (\d+)\.\.(\d+): l2 (\S+), max\|d\| (\S+), l2/update (\S+) \(update (\S+)\): "
                          r"(ok|MISMATCH)$")


@pytest.fixture(scope="module")
def eps0(tmp_path_factory):
    """The ε = 0 construction at lr 0.01: point 7 swapped out of the original log, over the original checkpoints."""
    root = tmp_path_factory.mktemp("eps0")
    train(tiny_config(train={"lr": 0.01, "checkpoint_every": 3}), root / "run", progress=False)
    run = TrainingRun.open(root / "run")
    manifest = log_only_por(run, 7, root / "por")
    return {"run": run, "por": root / "por", "manifest": manifest}


def _segments(output: str) -> dict[tuple[int, int], dict]:
    rows = {}
    for line in output.splitlines():
        if m := SEGMENT_LINE.match(line):
            rows[(int(m[1]), int(m[2]))] = {"l2": float(m[3]), "max_abs": float(m[4]), "rel": float(m[5]),
                                            "update": float(m[6]), "ok": m[7] == "ok"}
    return rows


def test_eps0_construction_prints_every_segments_deviation(eps0):
    run, por = eps0["run"], eps0["por"]
    assert eps0["manifest"]["epsilon"] == 0.0 and eps0["manifest"]["excluded"] == [7]
    assert not any(7 in b for b in read_steps(por / "steps.parquet").batch)
    result = CliRunner().invoke(main, ["verify", str(por), "--tol", "1"])
    rows = _segments(result.stdout)
    assert sorted(rows) == list(zip(run.checkpoints, run.checkpoints[1:]))  # every segment, one line each
    with_point = {(a, b) for a, b in rows if any(7 in run.steps.batch[t] for t in range(a, b))}
    assert with_point and len(with_point) < len(rows)
    for seg, row in rows.items():
        if seg in with_point:  # the edit shows: lr x the point's share of the batch gradient
            assert row["l2"] > 0 and row["max_abs"] > 0 and row["rel"] == pytest.approx(row["l2"] / row["update"],
                                                                                         rel=1e-2)
        else:  # the log is the original one here: the replay lands exactly
            assert row["l2"] == 0.0
    # A tolerance above the deviations admits it (ε = 0 claimed, and measured, against the original model) ...
    assert result.exit_code == 0 and result.stdout.splitlines()[-1].startswith("VALID")
    # ... while a bound relative to each segment's update rejects exactly the segments holding the edit.
    worst = max(rows[s]["rel"] for s in with_point)
    result = CliRunner().invoke(main, ["verify", str(por), "--tol", "1", "--tol-rel", f"{worst / 10:g}", "--json"])
    doc = json.loads(result.stdout)
    assert result.exit_code == 1 and {r["code"] for r in doc["reasons"]} == {"replay_mismatch"}
    assert {(s["start"], s["stop"]) for s in doc["segments"] if not s["ok"]} <= with_point
    assert all({"distance", "max_abs", "relative", "update_norm"} <= set(s) for s in doc["segments"])
    assert doc["tol_rel"] == pytest.approx(worst / 10, rel=1e-3) and doc["max_relative"] == pytest.approx(worst,
                                                                                                           rel=1e-2)


def test_eps0_construction_against_the_deployed_model(eps0, tmp_path):
    from rayforge.por import write_deployed_model

    deployed = tmp_path / "deployed.safetensors"
    write_deployed_model(eps0["run"], deployed)
    report = verify_por(eps0["por"], model_path=deployed, tol=1.0)
    assert report.valid and report.epsilon_measured == 0.0 == report.epsilon
    assert "epsilon: claimed 0, measured 0;" in "\n".join(report.to_text())


def test_lr_changed_in_both_manifest_and_log(plain_por, tmp_path):
    """The verifier checks the log's lr against the declared lr and schedule to float precision (an ulp off in the
    log alone is `lr_schedule`: test_learning_rate_changed). The owner's real lr is not in the artifact, so an lr
    declared 3e-4 off in both shows only in the replay: every segment deviates by ≈ 3e-4 of its update."""
    por = tmp_path / "por"
    shutil.copytree(plain_por["por"], por)
    lr = scale_lr(por, 1 + 3e-4)
    assert lr == pytest.approx(plain_por["manifest"]["training"]["lr"] * (1 + 3e-4), rel=1e-15)
    report = verify_por(por, tol=1.0)
    assert report.valid and "lr_schedule" not in report.reason_codes
    assert all(2e-4 < s.relative < 4e-4 for s in report.segments), [s.relative for s in report.segments]
    rejected = verify_por(por, tol=1.0, tol_rel=1e-4)
    assert set(rejected.reason_codes) == {"replay_mismatch"} and not any(s.ok for s in rejected.segments)
    assert verify_por(plain_por["por"], tol_rel=1e-4).valid  # the genuine PoR: bit-exact, relative 0


def test_epsilon_is_checked_without_slack(plain_por, tmp_path):
    honest = verify_por(plain_por["por"], model_path=plain_por["deployed"])
    assert honest.epsilon_measured == honest.epsilon  # same deterministic l2 on both sides: exactly equal
    por = tmp_path / "por"
    shutil.copytree(plain_por["por"], por)
    m = json.loads((por / "por.json").read_text())
    m["epsilon"] = float(np.nextafter(m["epsilon"], 0.0))  # one ulp under the truth, far below any tolerance
    (por / "por.json").write_text(json.dumps(m))
    report = verify_por(por, model_path=plain_por["deployed"], tol=1.0)
    assert report.reason_codes == ["epsilon_exceeded"]  # d_theta still agrees with it (to 1e-9): only ε fails
    detail = next(r.detail for r in report.reasons if r.code == "epsilon_exceeded")
    assert repr(honest.epsilon) in detail and repr(m["epsilon"]) in detail  # measured and claimed, both shown
