"""The main job on local Ray, and the `ray job submit` entrypoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rayforge.train.replay import replay
from rayforge.train.run import TrainingRun

ROOT = Path(__file__).resolve().parent.parent


def test_rayforge_run_end_to_end_on_local_ray(ray_local, tmp_path, make_config):
    import json

    import yaml
    from click.testing import CliRunner

    from rayforge.cli import main

    # threads unset: the run must log the thread count it used (1 in a Ray worker) so replay is exact here
    cfg = make_config(train={"threads": None}, forge={"kappa": 2, "mu": 4, "lam": 2}, data={"flip": True})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "c_diff=" in result.output
    run = TrainingRun.open(tmp_path / "run")
    assert replay(run, 0, run.checkpoints[1]).exact
    assert (tmp_path / "run" / "forge" / "paper" / "forged.parquet").is_file()
    metrics = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())
    assert set(metrics["attacks"]) == {"lira", "enhanced", "enhanced_ref", "xent", "mentr", "mida"}  # flips: mida
    control = json.loads((tmp_path / "run" / "attack" / "control.json").read_text())
    assert set(control["attacks"]) == set(metrics["attacks"])
    for name, c in control["attacks"].items():
        assert c["target_auc"] == metrics["attacks"][name]["auc"]
        assert c["auc"] is None or 0 <= c["auc"] <= 1
    for m in metrics["attacks"].values():
        assert {"auc", "tpr_at_0.1_fpr", "c_diff", "c_common", "c_validation", "s_median"} <= set(m)
        assert all(0 <= m[k] <= 100 for k in ("c_diff", "c_common", "c_validation"))
    assert metrics["d_theta"]["median"] > 0 and metrics["setting"]["evaluated_points"] == 60
    assert {"mean", "stderr", "original"} <= set(metrics["uniformity_l1"])
    assert metrics["uniformity_l1"]["original"] == 0.0  # every point exactly once per epoch
    for name in ("tables.md", "fig3_d_theta.png", "fig4_score_differences.png", "roc.png"):
        assert (tmp_path / "run" / "report" / name).stat().st_size > 0


def test_job_entrypoints_are_the_cli():
    for job in ("run.py", "train.py"):
        out = subprocess.run([sys.executable, str(ROOT / "jobs" / job), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "--out" in out.stdout
