"""The verifier under mistaken input: thread counts, an unreadable --model or --data-root, and what the text output
says was not checked. Nothing here may be read as a refuted proof (exit 1) or start a replay first."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from click.testing import CliRunner

import rayforge.por.verify as verify_module
from rayforge.cli import main
from rayforge.errors import MalformedArtifact, UnusableInput
from rayforge.por import verify_por
from rayforge.por.verify import local_cores, replay_threads


def _with_threads(por: dict, tmp_path, threads) -> str:
    dst = tmp_path / "por"
    shutil.copytree(por["por"], dst)
    manifest = json.loads((dst / "por.json").read_text())
    manifest["training"]["threads"] = threads
    (dst / "por.json").write_text(json.dumps(manifest))
    return str(dst)


@pytest.fixture
def replay_spy(monkeypatch):
    """Records the torch thread count of every replayed segment."""
    seen = []
    original = verify_module.replay_steps

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(verify_module, "replay_steps", spy)
    return seen


@pytest.fixture
def no_replay(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a replay started")

    monkeypatch.setattr(verify_module, "replay_steps", forbidden)


def test_threads_are_capped_at_local_cores_with_one_warning(plain_por, tmp_path, replay_spy):
    por = _with_threads(plain_por, tmp_path, 256)
    warnings = []
    report = verify_por(por, warn=warnings.append)
    cores = local_cores()
    assert report.valid and report.threads == min(256, cores) and report.trained_threads == 256
    assert replay_spy and set(replay_spy) == {min(256, cores)}  # never 256 threads on a machine without them
    assert len(warnings) == 1 and "\n" not in warnings[0] and "256" in warnings[0]


def test_explicit_threads_win_and_the_pors_own_count_warns_nothing(plain_por, tmp_path, replay_spy):
    warnings = []
    report = verify_por(_with_threads(plain_por, tmp_path, 256), threads=1, warn=warnings.append)
    assert report.threads == 1 and set(replay_spy) == {1} and "--threads" in warnings[0]
    warnings.clear()
    assert verify_por(plain_por["por"], warn=warnings.append).threads == 1 and warnings == []  # trained with 1


def test_replay_threads_rule(monkeypatch):
    monkeypatch.setattr(verify_module, "local_cores", lambda: 2)
    assert replay_threads(256, None)[0] == 2 and "capped at the 2 local cores" in replay_threads(256, None)[1]
    assert replay_threads(1, None) == (1, None)
    assert replay_threads(None, None) == (None, None)  # not recorded: torch's default, nothing to compare with
    assert replay_threads(2, 8)[0] == 8


def test_a_256_thread_por_verifies_on_the_command_line(plain_por, tmp_path):
    result = CliRunner().invoke(main, ["verify", _with_threads(plain_por, tmp_path, 256)])
    assert result.exit_code == 0, result.output
    assert "the PoR was trained with 256" in result.stderr
    assert f"with {min(256, local_cores())} thread(s)" in result.stdout.splitlines()[-1]


def test_a_typo_in_model_exits_2_at_once(plain_por, tmp_path, no_replay):
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["verify", str(plain_por["por"]), "--model", "/nonexistent.safetensors"])
    assert time.perf_counter() - start < 5
    assert result.exit_code == 2 and result.output.startswith("error:") and result.output.count("\n") == 1
    assert "/nonexistent.safetensors" in result.output
    not_safetensors = tmp_path / "model.pt"
    not_safetensors.write_bytes(b"\x80\x04 a pickle, never loaded")
    with pytest.raises(MalformedArtifact, match="safetensors"):
        verify_por(plain_por["por"], model_path=not_safetensors)


def test_an_unreadable_data_root_exits_2_before_any_replay(plain_por, tmp_path, no_replay):
    result = CliRunner().invoke(main, ["verify", str(plain_por["por"]), "--data-root", "/nonexistent"])
    assert result.exit_code == 2 and "--data-root '/nonexistent' is not a readable directory" in result.output
    (tmp_path / "file").write_text("")
    with pytest.raises(UnusableInput, match="not a readable directory"):
        verify_por(plain_por["por"], data_root=tmp_path / "file")


def test_no_fallback_from_an_explicit_data_root(mnist_por, tmp_path, monkeypatch, no_replay):
    # The dataset is where $RAYFORGE_DATA points, but the verifier named another place: that place only.
    monkeypatch.setenv("RAYFORGE_DATA", str(mnist_por["data_root"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["verify", str(mnist_por["por"]), "--data-root", str(empty)])
    assert result.exit_code == 2, result.output  # a missing dataset is unusable input, not a refuted proof
    assert "not found" in result.output and "no fallback" in result.output and result.output.count("\n") == 1


def test_bad_options_are_unusable_input_not_invalid(plain_por):
    for kwargs in ({"steps": "topq:0"}, {"tol": -1.0}, {"tol_rel": float("nan")}, {"threads": 0}, {"seed": -1}):
        with pytest.raises(UnusableInput):
            verify_por(plain_por["por"], **kwargs)


def test_without_model_the_first_line_names_what_was_not_checked(plain_por):
    runner = CliRunner()
    lines = runner.invoke(main, ["verify", str(plain_por["por"])]).stdout.splitlines()
    assert lines[0].startswith("NOT CHECKED (no --model): epsilon, d_theta, deployed model")
    assert lines[-1].startswith("VALID")
    doc = json.loads(runner.invoke(main, ["verify", str(plain_por["por"]), "--json"]).stdout)
    assert doc["unchecked"] == ["epsilon", "d_theta", "deployed model"] and doc["epsilon_measured"] is None
    lines = runner.invoke(main, ["verify", str(plain_por["por"]), "--model", str(plain_por["deployed"])]
                          ).stdout.splitlines()
    assert not any("NOT CHECKED" in line for line in lines)
    eps = plain_por["manifest"]["epsilon"]
    assert any(line.startswith(f"epsilon: claimed {eps:.9g}, measured {eps:.9g};") for line in lines)
