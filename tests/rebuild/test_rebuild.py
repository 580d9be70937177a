"""Phase 2: forged logs per group, rebuilt models (sequential and batched), the Ray stage."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rayforge.rebuild.driver import RebuildParams, rebuild_dir, run_rebuild
from rayforge.rebuild.engine import RebuildContext, d_theta, rebuild_group, rebuild_groups_batched
from rayforge.rebuild.forged_log import ForgedLogs
from rayforge.train.replay import replay_steps
from rayforge.train.run import TrainingRun


def test_group_log_replaces_exactly_the_batches_holding_a_member(forged_run):
    run = TrainingRun.open(forged_run)
    logs = ForgedLogs(run, "paper")
    assert logs.num_groups == 30
    for g in (0, 7, 29):
        glog = logs.group_log(g)
        steps = glog.steps(run.steps)
        for t in range(run.total_steps):
            holds = np.isin(run.steps.batch[t], glog.members).any()
            assert (t in glog.forged) == holds
            assert not np.isin(steps.batch[t], glog.members).any()  # the forged log never uses the group
            part = logs.splits.point_parts(t)[glog.members[0]]
            if holds:
                batch, flips = logs.table.get(t, part)
                assert np.array_equal(steps.batch[t], batch) and np.array_equal(steps.flip[t], flips)
        assert glog.first_step == int(min(glog.forged))


def test_rebuilt_model_equals_plain_replay_of_forged_log(forged_run):
    run = TrainingRun.open(forged_run)
    ctx = RebuildContext(run, "paper", threads=1)
    result = rebuild_group(ctx, 5)
    glog = ctx.logs.group_log(5)
    model, velocity = run.model_at(0, ctx.device)  # from θ₀, not from the checkpoint before the first step
    replay_steps(model, velocity, ctx.data, glog.steps(run.steps), 0, run.total_steps, ctx.hyper)
    for (_, a), (_, b) in zip(result.model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b)
    assert result.row["d_theta"] == d_theta(dict(model.named_parameters()), ctx.theta_star) > 0
    assert result.row["forged_steps"] == len(glog.forged) >= 1


def test_batched_replay_matches_sequential(forged_run):
    run = TrainingRun.open(forged_run)
    ctx = RebuildContext(run, "paper", threads=1)
    groups = [3, 4, 5, 6]
    sequential = [rebuild_group(ctx, g) for g in groups]
    batched = rebuild_groups_batched(ctx, groups)
    for s, b in zip(sequential, batched):
        assert b.row["d_theta"] == pytest.approx(s.row["d_theta"], rel=1e-4)
        for (_, p), (_, q) in zip(s.model.named_parameters(), b.model.named_parameters()):
            assert torch.allclose(p, q, atol=1e-6)


def test_missing_phase1_output_is_refused(trained_run, tmp_path):
    from rayforge.errors import RayforgeError

    shutil.copytree(trained_run, tmp_path / "run")
    with pytest.raises(RayforgeError, match="run `rayforge forge` first"):
        ForgedLogs(TrainingRun.open(tmp_path / "run"), "paper")


def test_ray_stage_is_deterministic_resumable_and_feeds_a_consumer(ray_local, forged_run, tmp_path):
    def member_counter():  # a stand-in consumer (attack scoring plugs in the same way); local, so Ray ships it
        return lambda group, members, model: {"group": group, "members": len(members)}

    runs = {}
    for name in ("one", "two", "resumed"):
        shutil.copytree(forged_run, tmp_path / name)
        runs[name] = TrainingRun.open(tmp_path / name)
    cfg = runs["one"].cfg
    params = RebuildParams(groups_per_unit=4)
    consumed = {}
    summary = run_rebuild(tmp_path / "one", params, 1, cfg.ray, cfg.wandb, save_models=2, progress=False,
                          consumer_factory=member_counter, on_consumed=consumed.__setitem__)
    assert summary["groups"] == 30
    run_rebuild(tmp_path / "two", params, 2, cfg.ray, cfg.wandb, progress=False)
    assert run_rebuild(tmp_path / "resumed", params, 2, cfg.ray, cfg.wandb, progress=False, max_units=3) is None
    run_rebuild(tmp_path / "resumed", params, 2, cfg.ray, cfg.wandb, progress=False)
    data = {name: (rebuild_dir(tmp_path / name, "paper") / "distances.parquet").read_bytes() for name in runs}
    assert data["one"] == data["two"] == data["resumed"]
    table = pq.read_table(rebuild_dir(tmp_path / "one", "paper") / "distances.parquet")
    assert table.column("group").to_pylist() == list(range(30))
    assert sorted(p.name for p in (rebuild_dir(tmp_path / "one", "paper") / "models").iterdir()) == \
        ["group-00000000.safetensors", "group-00000001.safetensors"]
    # every forged model reached the consumer once, with its members
    outputs = [o for first in sorted(consumed) for o in consumed[first]]
    assert [o["group"] for o in outputs] == list(range(30)) and all(o["members"] == 2 for o in outputs)



def test_sampling_approximation_forges_only_what_the_sample_needs(forged_run, tmp_path):
    from helpers import forge_in_process

    shutil.copytree(forged_run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "forge")
    forge_in_process(tmp_path / "run", points=4)
    sampled = TrainingRun.open(tmp_path / "run")
    logs = ForgedLogs(sampled, "paper")
    assert 1 <= len(logs.groups) <= 4
    rows = pq.read_table(tmp_path / "run" / "forge" / "paper" / "forged.parquet").num_rows
    assert rows < sampled.total_steps * 2
    full = RebuildContext(TrainingRun.open(forged_run), "paper", threads=1)
    part = RebuildContext(sampled, "paper", threads=1)
    for g in logs.groups:  # rows are seeded per (step, part): the sample's models equal the full run's
        a, b = rebuild_group(part, int(g)).row, rebuild_group(full, int(g)).row
        assert a["d_theta"] == b["d_theta"] and a["forged_steps"] == b["forged_steps"]
    other = next(g for g in range(30) if g not in set(logs.groups.tolist()))
    from rayforge.errors import RayforgeError

    with pytest.raises(RayforgeError, match="did not forge"):
        rebuild_group(part, other)
