"""The user's own data and training loop through the whole pipeline: an image folder (train -> forge -> rebuild ->
audit -> por -> verify, on Ray through the public API) and a hand-written PyTorch loop with `Recorder` and the
user's own `module:callable` architecture (record -> replay -> forge -> rebuild -> audit -> por -> verify)."""

from __future__ import annotations

import functools
import textwrap

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from helpers import forge_in_process, rebuild_in_process, tiny_config, write_image_folder

import rayforge as rf
from rayforge.cli import main
from rayforge.data.synthetic import make_synthetic


def test_image_folder_through_the_pipeline(tmp_path, ray_local):
    train, test = make_synthetic(40, 12, [3, 6, 6], seed=4)
    labels = train.labels % 3  # three classes named 0, 1, 2
    root = write_image_folder(tmp_path / "data", (train.images.transpose(0, 2, 3, 1), labels),
                              (test.images.transpose(0, 2, 3, 1), test.labels % 3))
    cfg = tiny_config(data={"dataset": "imagefolder", "data_root": str(root), "flip": True},
                      train={"batch_size": 8, "epochs": 2, "checkpoint_every": 2}, ray={"actors": 1})
    run = tmp_path / "run"
    summary = rf.train(cfg, run, progress=False)
    assert summary["steps"] == 10
    assert rf.forge(run, kappa=2, mu=3, lam=2, progress=False)["rows"] == 20
    assert rf.rebuild(run, progress=False)["groups"] == 20
    audit = rf.audit(run, progress=False)
    assert audit["points"] == 40 and audit["evidence"]["phase1"] == audit["evidence"]["phase2"] == 40
    points = pq.read_table(run / "audit" / "points.parquet")
    assert np.isfinite(points.column("d_theta").to_numpy()).all()

    por, deployed = tmp_path / "por", tmp_path / "deployed.safetensors"
    manifest = rf.export_por(run, point=5, out_dir=por)
    from rayforge.por import write_deployed_model
    from rayforge.train.run import TrainingRun

    write_deployed_model(TrainingRun.open(run), deployed)
    report = rf.verify_por(por, data_root=root, model=deployed)
    assert report.valid, report.reasons
    assert manifest["dataset"]["config"]["dataset"] == "imagefolder"
    # without the data the verifier cannot check anything: one clear error (exit 2: unusable input, not refuted)
    (tmp_path / "elsewhere").mkdir()
    result = CliRunner().invoke(main, ["verify", str(por), "--data-root", str(tmp_path / "elsewhere")])
    assert result.exit_code == 2 and "dataset 'imagefolder' not found" in result.output


OWN_MODEL = '''
from torch import nn


def small_cnn(in_shape, num_classes):
    c, h, w = in_shape
    return nn.Sequential(nn.Conv2d(c, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * h * w, num_classes))
'''


def test_recorded_own_loop_through_the_pipeline(tmp_path, monkeypatch):
    (tmp_path / "own_nets.py").write_text(textwrap.dedent(OWN_MODEL))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    rec = rf.Recorder(run, model="own_nets:small_cnn",
                      data={"dataset": "synthetic", "synthetic_train": 30, "synthetic_test": 10, "flip": True},
                      optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
                      scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=9),
                      epochs=3, batch_size=10, seed=1, checkpoint_every=2, threads=1)
    rng = np.random.default_rng(0)
    with rec:  # a plain PyTorch loop: the user's batches, flips, loss, optimizer and scheduler
        for _ in range(3):
            order = rng.permutation(rec.n)
            for start in range(0, rec.n, 10):
                idx, flips = order[start:start + 10], rng.random(10) < 0.5
                x, y = rec.batch(idx, flips)
                rec.optimizer.zero_grad()
                F.cross_entropy(rec.model(x), y).backward()
                rec.step(idx, flips)
                rec.optimizer.step()
                rec.scheduler.step()

    runner = CliRunner()
    for a, b in ((0, 2), (6, 8), (8, 9)):
        result = runner.invoke(main, ["replay", str(run), "--from", str(a), "--to", str(b)])
        assert result.exit_code == 0 and "max_abs_diff=0" in result.output, result.output
    forge_in_process(run, kappa=2, mu=3, lam=1)
    rebuild_in_process(run)
    audit = rf.audit(run, use_ray=False, progress=False)
    assert audit["points"] == 30 and audit["evidence"]["phase2"] == 30

    por = tmp_path / "por"
    manifest = rf.export_por(run, point=4, out_dir=por)
    assert manifest["training"]["model"] == "own_nets:small_cnn" and manifest["training"]["lr_schedule"] == "cosine"
    result = runner.invoke(main, ["verify", str(por)])
    assert result.exit_code == 2 and "--trust-model-code" in result.output
    result = runner.invoke(main, ["verify", str(por), "--trust-model-code"])
    assert result.exit_code == 0 and "VALID" in result.output and "note: built the model" in result.output
