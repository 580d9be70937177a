"""Top-Q with one-step windows: the export adds checkpoints around each epoch's largest single-step update, topq:Q
replays only those windows, catches a forged step tampered there (and, as PoL's top-Q, only there), and a PoR
without windows verifies as before."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from rayforge.cli import main
from rayforge.io import write_parquet
from rayforge.por import SegmentCheck, params_of, verify_por
from rayforge.por.artifact import l2_distance
from rayforge.por.verify import select_segments
from rayforge.rebuild.forged_log import ForgedLogs
from rayforge.train.log import ckpt_name, read_steps, state_tensors, steps_table
from rayforge.train.replay import replay_steps
from rayforge.train.run import TrainingRun, hyper_of, set_determinism

STEPS_PER_EPOCH = 6  # the plain run: 60 points, batches of 10, 2 epochs, checkpoints every 3 steps


def _step_updates(por: dict) -> tuple[TrainingRun, dict[int, float], dict[int, dict]]:
    """Replay the PoR's log step by step from where the export starts replaying (the last checkpoint before the
    group's first forged step): every step's update ‖θ_{t+1} − θ_t‖ and every state, computed here."""
    run = TrainingRun.open(por["run_dir"])
    logs = ForgedLogs(run, "paper")
    first = logs.group_log(int(logs.splits.group_of[por["manifest"]["point"]])).first_step
    start = max(c for c in run.checkpoints if c <= first)
    steps = read_steps(por["por"] / "steps.parquet")
    threads = torch.get_num_threads()
    try:
        set_determinism(run.cfg.train.threads)
        model, velocity = run.model_at(start, torch.device("cpu"))
        data = run.tensor_data(run.load_dataset(), torch.device("cpu"))
        states, updates = {start: state_tensors(model, None)}, {}
        for t in range(start, run.total_steps):
            replay_steps(model, velocity, data, steps, t, t + 1, hyper_of(run.cfg))
            states[t + 1] = state_tensors(model, None)
            updates[t] = l2_distance(params_of(states[t + 1]), params_of(states[t]))
    finally:
        torch.set_num_threads(threads)
    return run, updates, states


def _largest_per_epoch(updates: dict[int, float], q: int) -> list[int]:
    by_epoch: dict[int, list[int]] = {}
    for t in sorted(updates):
        by_epoch.setdefault(t // STEPS_PER_EPOCH, []).append(t)
    return sorted(t for ts in by_epoch.values() for t in sorted(ts, key=lambda t: (-updates[t], t))[:q])


def test_export_adds_windows_at_the_largest_updates(plain_por, old_por):
    run, updates, states = _step_updates(plain_por)
    top = _largest_per_epoch(updates, 1)
    assert len(top) == 2  # one per epoch
    m = plain_por["manifest"]
    assert m["checkpoints"] == sorted(set(run.checkpoints) | {c for t in top for c in (t, t + 1)})
    for c in set(m["checkpoints"]) - set(run.checkpoints):  # the window checkpoints hold the trajectory's states
        stored = load_file(str(plain_por["por"] / ckpt_name(c)))
        assert all(torch.equal(stored[k], v) for k, v in states[c].items()), c
    # The windows change nothing else: same claims, the log's checkpoints byte for byte as without windows.
    assert old_por["manifest"]["checkpoints"] == run.checkpoints
    assert {k: v for k, v in m.items() if k != "checkpoints"} == \
        {k: v for k, v in old_por["manifest"].items() if k != "checkpoints"}
    for c in run.checkpoints:
        assert (plain_por["por"] / ckpt_name(c)).read_bytes() == (old_por["por"] / ckpt_name(c)).read_bytes()


def test_more_windows_from_the_cli(plain_por, tmp_path):
    por = tmp_path / "por"
    result = CliRunner().invoke(main, ["por", str(plain_por["run_dir"]), "--point", "7", "--strategy", "paper",
                                       "--out", str(por), "--topq-windows", "2"])
    assert result.exit_code == 0, result.output
    run, updates, _ = _step_updates({**plain_por, "por": por})
    windows = {c for t in _largest_per_epoch(updates, 2) for c in (t, t + 1)}
    assert json.loads((por / "por.json").read_text())["checkpoints"] == sorted(set(run.checkpoints) | windows)
    report = verify_por(por, steps="topq:2")
    assert report.valid and len(report.segments) == 4 and all(s.stop - s.start == 1 for s in report.segments)


def test_topq_replays_only_the_one_step_windows(plain_por):
    _, updates, _ = _step_updates(plain_por)
    report = verify_por(plain_por["por"], steps="topq:1", model_path=plain_por["deployed"])
    assert report.valid, [str(r) for r in report.reasons]
    assert [(s.start, s.stop) for s in report.segments] == [(t, t + 1) for t in _largest_per_epoch(updates, 1)]
    assert all(s.distance == 0.0 for s in report.segments)
    assert report.segments_total == len(plain_por["manifest"]["checkpoints"]) - 1


def _tamper_step(por: dict, tmp_path, t: int):
    """A copy of the PoR whose forged batch at step t has one sample replaced by another allowed point."""
    dst = tmp_path / f"tampered-{t}"
    shutil.copytree(por["por"], dst)
    steps = read_steps(dst / "steps.parquet")
    batch = [b.copy() for b in steps.batch]
    allowed = np.setdiff1d(np.arange(60), np.concatenate([batch[t], por["manifest"]["excluded"]]))
    batch[t][0] = allowed[0]
    write_parquet(dst / "steps.parquet", steps_table(batch, steps.flip, steps.lr))
    return dst


def test_topq_rejects_a_tampered_step_in_a_window(plain_por, tmp_path):
    _, updates, _ = _step_updates(plain_por)
    t = _largest_per_epoch(updates, 1)[1]
    report = verify_por(_tamper_step(plain_por, tmp_path, t), steps="topq:1")
    assert not report.valid and report.reason_codes == ["replay_mismatch"]
    assert [(s.start, s.stop) for s in report.segments if not s.ok] == [(t, t + 1)]
    assert all(s.stop - s.start == 1 for s in report.segments)


def test_a_tampered_step_outside_the_windows_needs_all(plain_por, tmp_path):
    # The limit of top-Q, stated in the README: only the largest-update steps are replayed.
    _, updates, _ = _step_updates(plain_por)
    windows = _largest_per_epoch(updates, 1)
    t = max(s for s in updates if s not in windows)
    por = _tamper_step(plain_por, tmp_path, t)
    assert verify_por(por, steps="topq:1").valid
    full = verify_por(por, steps="all")
    assert not full.valid and full.reason_codes == ["replay_mismatch"]
    assert [s.stop - s.start for s in full.segments if not s.ok] and all(
        s.start <= t < s.stop for s in full.segments if not s.ok)


def test_old_por_without_windows_verifies_as_before(old_por):
    for selection in ("all", "topq:1"):
        report = verify_por(old_por["por"], steps=selection, model_path=old_por["deployed"])
        assert report.valid, [str(r) for r in report.reasons]
        assert all(s.stop - s.start == 3 for s in report.segments)
    assert len(verify_por(old_por["por"], steps="topq:1").segments) == 2  # one 3-step segment per epoch


def test_topq_ranks_segments_by_update_per_step():
    # A 10-step segment moves θ more than a 1-step window in total, but less per step: the window is replayed.
    segments = [SegmentCheck(0, 10, update_norm=5.0), SegmentCheck(10, 11, update_norm=1.0),
                SegmentCheck(11, 20, update_norm=0.9)]
    assert [(s.start, s.stop) for s in select_segments(segments, "topq", 1, 20, None)] == [(10, 11)]
    assert [(s.start, s.stop) for s in select_segments(segments, "topq", 2, 20, None)] == [(0, 10), (10, 11)]
    unknown = SegmentCheck(11, 20)  # unreadable checkpoints rank first: they fail anyway
    assert select_segments(segments[:2] + [unknown], "topq", 1, 20, None) == [unknown]
