"""`rayforge report` on a run attacked with two forging strategies: one metrics.json, tables side by side."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from helpers import forge_in_process


@pytest.fixture(scope="module")
def attacked_twice(ray_local, trained_run, tmp_path_factory):
    from rayforge.attacks.driver import run_attack
    from rayforge.config import RayConfig, WandbConfig

    run = tmp_path_factory.mktemp("two") / "run"
    shutil.copytree(trained_run, run)
    for strategy in ("paper", "swap"):
        forge_in_process(run, kappa=2, mu=3, lam=2, strategy=strategy)
        run_attack(run, strategy, 2, RayConfig(), WandbConfig(mode="disabled"), progress=False)
    return run


def test_report_shows_every_attacked_strategy(attacked_twice):
    from rayforge.cli import main

    result = CliRunner().invoke(main, ["report", str(attacked_twice)])
    assert result.exit_code == 0, result.output
    assert "paper: " in result.output and "swap: " in result.output
    report = attacked_twice / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["strategies"]) == {"paper", "swap"}
    assert metrics["setting"]["strategy"] == "paper"  # the config's strategy is the main one
    for name, m in metrics["strategies"].items():
        assert m["setting"]["strategy"] == name and m["setting"]["evaluated_points"] == 60  # every point, lam=2
        assert set(m["valid_por_percent"]) == {"all", "lira_enhanced"}
        assert 0 <= m["valid_por_percent"]["all"] <= m["valid_por_percent"]["lira_enhanced"] <= 100
        assert m["d_theta"]["mean"] > 0 and {"median", "p90"} <= set(m["d_theta"])
        for a in m["attacks"].values():
            for kind in ("diff", "common", "validation"):
                low, high = a[f"c_{kind}_ci"]
                assert 0 <= low <= a[f"c_{kind}"] <= high <= 100
    # the main strategy's metrics are also today's top-level keys
    assert metrics["attacks"] == metrics["strategies"]["paper"]["attacks"]
    assert metrics["strategies"]["swap"]["setting"]["pool_size"] >= 1
    tables = (report / "tables.md").read_text()
    assert "| Attack | paper | swap |" in tables
    for name in ("fig3_d_theta.png", "fig4_score_differences.png", "fig_prediction_changes.png", "roc.png"):
        assert (report / name).stat().st_size > 0

    # --strategy picks the main one
    result = CliRunner().invoke(main, ["report", str(attacked_twice), "--strategy", "swap"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["strategies"]) == {"paper", "swap"} and metrics["setting"]["strategy"] == "swap"
    assert metrics["attacks"] == metrics["strategies"]["swap"]["attacks"]
    assert "| Attack | swap | paper |" in (report / "tables.md").read_text()  # the main strategy's column first


def test_report_of_a_strategy_never_attacked_is_one_line(attacked_twice):
    from rayforge.cli import main

    result = CliRunner().invoke(main, ["report", str(attacked_twice), "--strategy", "hybrid"])
    assert result.exit_code != 0
    assert "rayforge attack" in result.output and "--strategy hybrid" in result.output
