"""PoR export: layout, the point never in the forged log, bit-identity with phase 2's rebuild, atomic output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rayforge.errors import RayforgeError
from rayforge.por import POR_FORMAT, export_por, model_sha256, params_of, read_manifest, write_deployed_model
from rayforge.rebuild.engine import RebuildContext, rebuild_group
from rayforge.rebuild.forged_log import ForgedLogs
from rayforge.train.log import ckpt_name, read_steps
from rayforge.train.run import TrainingRun


def test_layout_and_manifest(plain_por):
    run = TrainingRun.open(plain_por["run_dir"])
    por = plain_por["por"]
    m = json.loads((por / "por.json").read_text())
    assert sorted(p.name for p in por.iterdir()) == sorted(
        ["por.json", "steps.parquet"] + [ckpt_name(c) for c in m["checkpoints"]])
    assert m["format"] == POR_FORMAT and m["point"] == 7 and 7 in m["excluded"] and len(m["excluded"]) == 2
    assert set(run.checkpoints) < set(m["checkpoints"])  # the log's, and the top-Q windows (test_topq_windows)
    assert m["dataset"]["n"] == 60 and m["dataset"]["train_sha256"] == run.info["train_sha256"]
    assert m["dataset"]["config"]["data_root"] is None
    assert m["training"]["threads"] == 1 and m["training"]["model"] == "logreg"
    assert read_manifest(por).point == 7
    # θ₀ and every checkpoint before the group's first forged step are the original files, byte for byte
    first = ForgedLogs(run, "paper").group_log(int(ForgedLogs(run, "paper").splits.group_of[7])).first_step
    for c in run.checkpoints:
        if c <= first:
            assert (por / ckpt_name(c)).read_bytes() == (run.traj_dir / ckpt_name(c)).read_bytes()


def test_por_never_contains_the_point_or_its_group(plain_por, modified_por):
    for por in (plain_por, modified_por):
        m = por["manifest"]
        steps = read_steps(por["por"] / "steps.parquet")
        used = np.concatenate(steps.batch)
        assert not np.isin(used, m["excluded"]).any()
        # ... while the original log trains on each of them once per epoch
        original = np.concatenate(TrainingRun.open(por["run_dir"]).steps.batch)
        assert all((original == x).sum() == 2 for x in m["excluded"])


def test_rebuilt_model_equals_the_por_final_checkpoint_bit_for_bit(plain_por, modified_por):
    for por in (plain_por, modified_por):
        run = TrainingRun.open(por["run_dir"])
        ctx = RebuildContext(run, "paper", threads=run.cfg.train.threads)
        group = int(ctx.logs.splits.group_of[por["manifest"]["point"]])
        rebuilt = rebuild_group(ctx, group)
        final = load_file(str(por["por"] / ckpt_name(run.total_steps)))
        for name, p in rebuilt.model.named_parameters():
            assert torch.equal(p.detach().cpu(), final[f"param/{name}"]), name
        assert rebuilt.row["d_theta"] == por["manifest"]["d_theta"]


def test_epsilon_d_theta_and_deployed_hash(plain_por):
    run = TrainingRun.open(plain_por["run_dir"])
    m = plain_por["manifest"]
    original = params_of(load_file(str(run.traj_dir / ckpt_name(run.total_steps))))
    forged = params_of(load_file(str(plain_por["por"] / ckpt_name(run.total_steps))))
    sq = sum(float(((forged[k].double() - original[k].double()) ** 2).sum()) for k in original)
    assert m["epsilon"] == pytest.approx(sq ** 0.5, rel=1e-12) and m["epsilon"] > 0
    assert m["d_theta"] == pytest.approx(sq / sum(v.numel() for v in original.values()), rel=1e-12)
    deployed = load_file(str(plain_por["deployed"]))
    assert set(deployed) == {k for k in load_file(str(run.traj_dir / ckpt_name(0))) if not k.startswith("velocity/")}
    assert model_sha256(params_of(deployed)) == m["deployed_sha256"] == model_sha256(original)


def test_modified_sgd_checkpoints_carry_velocity(modified_por):
    final = load_file(str(modified_por["por"] / ckpt_name(modified_por["manifest"]["checkpoints"][-1])))
    assert any(k.startswith("velocity/") for k in final)
    assert modified_por["manifest"]["training"]["lr_schedule"] == "cosine"
    assert modified_por["manifest"]["training"]["flip"] is True


def test_model_sha256_is_canonical():
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
    assert model_sha256(a) == model_sha256(dict(reversed(list(a.items()))))
    assert model_sha256(a) != model_sha256({**a, "w": a["w"].reshape(3, 2)})  # shape counts
    assert model_sha256(a) != model_sha256({**a, "w": a["w"].double()})  # dtype counts
    assert model_sha256(a) != model_sha256({"wb": a["w"], "": a["b"]})  # names are length-delimited
    assert model_sha256({"w": a["w"].t()}) == model_sha256({"w": a["w"].t().contiguous()})


def test_refuses_non_empty_out_dir_and_bad_point(plain_por, tmp_path):
    run = TrainingRun.open(plain_por["run_dir"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(RayforgeError, match="not empty"):
        export_por(run, "paper", 0, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep"
    for bad in (-1, 60, True):
        with pytest.raises(RayforgeError, match="point"):
            export_por(run, "paper", bad, tmp_path / "p")
    with pytest.raises(RayforgeError, match="phase-1 output"):
        export_por(run, "magic", 0, tmp_path / "p")
    assert not (tmp_path / "p").exists()
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    assert export_por(run, "paper", 0, tmp_path / "empty")["point"] == 0


def test_failure_leaves_nothing(plain_por, tmp_path, monkeypatch):
    import rayforge.por.export as export

    def boom(*args, **kwargs):
        raise OSError("disk full (test)")

    monkeypatch.setattr(export, "write_parquet", boom)
    with pytest.raises(OSError, match="disk full"):
        export_por(TrainingRun.open(plain_por["run_dir"]), "paper", 5, tmp_path / "por")
    assert list(tmp_path.iterdir()) == []


def test_deployed_model_is_written_atomically(plain_por, tmp_path):
    run = TrainingRun.open(plain_por["run_dir"])
    digest = write_deployed_model(run, tmp_path / "model.safetensors")
    assert digest == plain_por["manifest"]["deployed_sha256"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
