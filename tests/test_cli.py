"""The command line under mistaken input: numeric ranges, --set on every stage command, Ctrl-C. Each error is one
line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from rayforge.cli import INTERRUPTED, ActorCount, main


def _one_error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == "" and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.stderr


@pytest.mark.parametrize("args", [
    ["forge", "RUN", "--actors", "-1"], ["forge", "RUN", "--actors", "0"], ["forge", "RUN", "--actors", "two"],
    ["forge", "RUN", "--kappa", "0"], ["forge", "RUN", "--mu", "0"], ["forge", "RUN", "--lam", "-2"],
    ["forge", "RUN", "--dsub", "0"], ["forge", "RUN", "--points", "0"],
    ["rebuild", "RUN", "--actors", "0"], ["rebuild", "RUN", "--groups-per-unit", "0"],
    ["rebuild", "RUN", "--save-models", "-1"],
    ["attack", "RUN", "--points", "0"], ["attack", "RUN", "--actors", "-3"], ["attack", "RUN", "--save-models", "-1"],
    ["replay", "RUN", "--to", "3", "--from", "-1"], ["replay", "RUN", "--from", "0", "--to", "3", "--threads", "0"],
    ["por", "RUN", "--out", "X", "--point", "-1"],
    ["verify", "POR", "--tol", "-1"], ["verify", "POR", "--tol", "nan"], ["verify", "POR", "--tol", "inf"],
    ["verify", "POR", "--tol-rel", "-0.1"], ["verify", "POR", "--threads", "0"], ["verify", "POR", "--seed", "-1"],
])
def test_numeric_options_are_range_checked_in_one_line(args):
    option = [a for a in args if a.startswith("--")][-1]  # the offending option comes last
    assert f"Invalid value for '{option}'" in _one_error_line(CliRunner().invoke(main, args), 2)


def test_actors_take_a_positive_integer_or_auto():
    assert ActorCount().convert("3", None, None) == 3
    assert ActorCount().convert("auto", None, None) == "auto"  # passed on as ray.actors: the config decides


def test_set_is_on_every_stage_command_that_takes_a_config():
    with_set = {name for name, cmd in main.commands.items() if any(p.name == "overrides" for p in cmd.params)}
    assert with_set == {"train", "run", "forge", "rebuild", "attack", "report", "audit"}


def _capture(monkeypatch, module, name, result=None):
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return result

    monkeypatch.setattr(module, name, fake)
    return calls


def test_set_reaches_the_stage_and_refuses_what_the_run_fixes(trained_run, monkeypatch):
    import rayforge.forge.driver as forge_driver
    import rayforge.pipeline as pipeline
    import rayforge.report.render as render

    runner = CliRunner()
    calls = _capture(monkeypatch, forge_driver, "run_forge")
    runner.invoke(main, ["forge", str(trained_run), "--set", "forge.mu=7", "--set", "ray.actors=3", "--kappa", "4"])
    (_, params, actors, ray_cfg, _), _ = calls[0]
    assert (params.mu, params.kappa, actors, ray_cfg.actors) == (7, 4, 3, 3)
    runner.invoke(main, ["forge", str(trained_run), "--set", "ray.actors=3", "--actors", "1"])
    assert calls[1][0][2] == 1  # --actors wins over --set ray.actors
    calls = _capture(monkeypatch, pipeline, "attack_stage")
    runner.invoke(main, ["attack", str(trained_run), "--set", "forge.lam=5"])
    assert calls[0][0][1].forge.lam == 5
    calls = _capture(monkeypatch, render, "write_report")
    runner.invoke(main, ["report", str(trained_run), "--set", "wandb.project=other"])
    assert calls[0][0][2].project == "other"
    for cmd, key in (("forge", "train.lr=1"), ("rebuild", "forge.mu=3"), ("attack", "attack.shadows=4"),
                     ("report", "ray.actors=2"), ("forge", "seed=1")):
        err = _one_error_line(runner.invoke(main, [cmd, str(trained_run), "--set", key]), 1)
        assert f"--set {key.split('=')[0]}: this command can set only" in err
    err = _one_error_line(runner.invoke(main, ["forge", str(trained_run), "--set", "forge.mu=0"]), 1)
    assert "forge.mu must be >= 1" in err


def test_ctrl_c_is_exit_130_in_one_line_for_every_command(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    runner = CliRunner()
    for name, cmd in main.commands.items():
        monkeypatch.setattr(cmd, "callback", interrupted)
        args = [name] + [a for p in cmd.params if p.required for a in ([] if p.param_type_name == "argument"
                                                                       else [p.opts[0]]) + ["1"]]
        assert _one_error_line(runner.invoke(main, args), INTERRUPTED) == "error: interrupted\n", name


# ---------------------------------------------------------------------------------------------- real SIGINT

def _interrupt(args: list[str], cwd: Path, ready: bytes, delay: float = 0.0, timeout: float = 120.0) -> tuple[int,
                                                                                                        str]:
    """Run `rayforge ARGS`, send SIGINT `delay` seconds after `ready` shows on its stderr; (exit code, stderr)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    # SIGINT's default action in the child, even when the suite itself was started in the background (where the
    # shell ignores SIGINT, the ignore is inherited, and Python then installs no KeyboardInterrupt handler).
    proc = subprocess.Popen([sys.executable, "-m", "rayforge.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err, deadline = b"", time.monotonic() + timeout
    try:
        while ready not in err and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stderr], [], [], 1.0)[0]:
                err += os.read(proc.stderr.fileno(), 65536)
        assert ready in err, err.decode(errors="replace")[-2000:]
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, (err + rest).decode(errors="replace")


def _last_line(stderr: str) -> str:
    return [s for s in stderr.replace("\r", "\n").splitlines() if s.strip()][-1]


def test_sigint_during_training(tmp_path, make_config):
    cfg = make_config(train={"epochs": 5000})  # runs until interrupted
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    code, stderr = _interrupt(["train", "cfg.yaml", "--out", "run"], tmp_path, b"loss")
    assert code == INTERRUPTED and "Traceback" not in stderr and _last_line(stderr) == "error: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]  # nothing half-written


def test_sigint_during_a_ray_stage(forged_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(forged_run, run)
    shutil.rmtree(run / "forge")  # phase 1 again, with far more candidates than it can finish
    # SIGINT once Ray is up and the actor is forging (the bar shows before Ray starts)
    code, stderr = _interrupt(["forge", str(run), "--mu", "1000000", "--actors", "1"], tmp_path, b"forge[paper]",
                              delay=10.0)
    assert code == INTERRUPTED and "Traceback" not in stderr and _last_line(stderr) == "error: interrupted"
