"""Trainer and training log: layout, determinism, exact replay, flips, and bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rayforge.cli import main
from rayforge.errors import MalformedArtifact, RayforgeError
from rayforge.train.log import STEPS_SCHEMA, ckpt_name, steps_table
from rayforge.io import write_parquet
from rayforge.train.replay import replay
from rayforge.train.run import TrainingRun
from rayforge.train.trainer import train


def _files(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted((run / "trajectory").iterdir())}


def test_layout_and_schema(trained_run):
    run = TrainingRun.open(trained_run)
    assert (trained_run / "config.yaml").is_file() and (trained_run / "dataset.json").is_file()
    assert pq.read_schema(trained_run / "trajectory" / "steps.parquet").remove_metadata() == STEPS_SCHEMA
    # 60 points / batch 10 = 6 steps per epoch, 2 epochs; checkpoints every 3 steps and at the end
    assert run.total_steps == 12
    assert run.checkpoints == [0, 3, 6, 9, 12]
    assert run.info["n"] == 60 and len(run.info["train_sha256"]) == 64


def test_every_point_once_per_epoch(trained_run):
    run = TrainingRun.open(trained_run)
    for epoch in range(2):
        seen = np.concatenate(run.steps.batch[epoch * 6:(epoch + 1) * 6])
        assert sorted(seen.tolist()) == list(range(60))


def test_two_trainings_give_identical_bytes(tmp_path, make_config):
    cfg = make_config(train={"momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine"}, data={"flip": True})
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_replay_reproduces_every_segment_exactly(trained_run):
    run = TrainingRun.open(trained_run)
    for start, stop in zip(run.checkpoints, run.checkpoints[1:]):
        assert replay(run, start, stop).max_abs_diff == 0.0
    assert replay(run, 0, run.total_steps).max_abs_diff == 0.0


@pytest.mark.parametrize("model,shape", [("lenet5", [1, 32, 32]), ("resnet_mini", [3, 32, 32])])
def test_replay_modified_sgd_with_flips_and_batchnorm(tmp_path, make_config, model, shape):
    cfg = make_config(model={"name": model},
                      data={"flip": True, "synthetic_train": 20, "synthetic_test": 10, "synthetic_shape": shape},
                      train={"momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine", "epochs": 2,
                             "checkpoint_every": 2, "lr": 0.01})
    train(cfg, tmp_path / "run", progress=False)
    run = TrainingRun.open(tmp_path / "run")
    assert replay(run, 2, 4).max_abs_diff == 0.0


def test_flips_are_recorded_and_applied(tmp_path, make_config):
    train(make_config(data={"flip": True}, train={"checkpoint_every": 3}), tmp_path / "run", progress=False)
    run = TrainingRun.open(tmp_path / "run")
    flips = np.concatenate(run.steps.flip)
    assert 0.3 < flips.mean() < 0.7  # drawn with p=0.5 and recorded
    # Toggle the recorded flips of one step inside the first segment: the replay must no longer match.
    toggled = [f.copy() for f in run.steps.flip]
    toggled[1] = ~toggled[1]
    write_parquet(run.traj_dir / "steps.parquet", steps_table(run.steps.batch, toggled, run.steps.lr))
    assert replay(TrainingRun.open(tmp_path / "run"), 0, 3).max_abs_diff > 0


def test_cli_train_and_replay(tmp_path, make_config):
    import yaml

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(make_config().to_dict()))
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(main, ["train", str(cfg_path), "--out", str(out), "--set", "train.checkpoint_every=4"])
    assert result.exit_code == 0, result.output
    assert "test_accuracy=" in result.output
    result = runner.invoke(main, ["replay", str(out), "--from", "0", "--to", "4"])
    assert result.exit_code == 0 and "max_abs_diff=0" in result.output


# ------------------------------------------------------------------------------------------------ bad input

def _copy(trained_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


def test_missing_step_table(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    (run / "trajectory" / "steps.parquet").unlink()
    with pytest.raises(MalformedArtifact, match="steps.parquet"):
        TrainingRun.open(run)


def test_truncated_step_table(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    path = run / "trajectory" / "steps.parquet"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MalformedArtifact, match="unreadable Parquet"):
        TrainingRun.open(run)


def test_step_row_deleted(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    path = run / "trajectory" / "steps.parquet"
    table = pq.read_table(path)
    pq.write_table(table.take([0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11]), path)  # step 3 gone
    with pytest.raises(MalformedArtifact, match="steps must run"):
        TrainingRun.open(run)


def test_index_out_of_range(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    log = TrainingRun.open(run)
    batches = [b.copy() for b in log.steps.batch]
    batches[2][0] = 60
    write_parquet(run / "trajectory" / "steps.parquet", steps_table(batches, log.steps.flip, log.steps.lr))
    with pytest.raises(MalformedArtifact, match="outside"):
        TrainingRun.open(run)


def test_missing_checkpoint(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    (run / "trajectory" / ckpt_name(3)).unlink()
    with pytest.raises(RayforgeError, match="no checkpoint at step 3"):
        replay(TrainingRun.open(run), 3, 6)
    (run / "trajectory" / ckpt_name(12)).unlink()
    with pytest.raises(MalformedArtifact, match="last step"):
        TrainingRun.open(run)


def test_truncated_checkpoint(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    path = run / "trajectory" / ckpt_name(3)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(MalformedArtifact, match="ckpt-00000003"):
        replay(TrainingRun.open(run), 3, 6)


def test_checkpoint_of_wrong_shape(trained_run, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    run = _copy(trained_run, tmp_path)
    path = run / "trajectory" / ckpt_name(3)
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.startswith("param/"))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    with pytest.raises(MalformedArtifact, match="shape"):
        replay(TrainingRun.open(run), 3, 6)


def test_changed_dataset_is_refused(trained_run, tmp_path):
    import yaml

    run = _copy(trained_run, tmp_path)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["seed"] = 4  # synthetic data is drawn from the seed: a different training set
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(RayforgeError, match="differs from the logged one"):
        replay(TrainingRun.open(run), 0, 3)


def test_unknown_model_and_config_key(tmp_path, make_config):
    with pytest.raises(RayforgeError, match="unknown model"):
        train(make_config(model={"name": "nope"}), tmp_path / "a", progress=False)
    with pytest.raises(RayforgeError, match="unknown key 'train.lrr'"):
        make_config(train={"lrr": 0.1})
    assert not (tmp_path / "a").exists()


def test_failing_run_overwrites_nothing(trained_run, tmp_path, make_config):
    before = _files(trained_run)
    with pytest.raises(RayforgeError, match="refusing to overwrite"):
        train(make_config(), trained_run, progress=False)
    assert _files(trained_run) == before


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["replay", str(tmp_path / "nope"), "--from", "0", "--to", "3"])
    assert result.exit_code != 0
    assert result.output.strip().count("\n") == 0 and result.output.startswith("error:")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  lrr: 1\n")
    result = runner.invoke(main, ["train", str(cfg), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "unknown key 'train.lrr'" in result.output
