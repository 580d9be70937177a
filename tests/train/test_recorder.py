"""`Recorder`: a hand-written loop's log replays bit for bit; every way of departing from it is one clear error."""

from __future__ import annotations

import functools
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayforge.errors import RayforgeError
from rayforge.train.recorder import Recorder
from rayforge.train.replay import replay
from rayforge.train.run import TrainingRun

DATA = {"dataset": "synthetic", "synthetic_train": 25, "synthetic_test": 10}
SGD = functools.partial(torch.optim.SGD, lr=0.1)


def recorder(run_dir, **kw):
    args = dict(model="logreg", data=DATA, optimizer=SGD, epochs=2, batch_size=10, seed=2, threads=1)
    args.update(kw)
    return Recorder(run_dir, **args)


def loop(rec, steps=None, loss=F.cross_entropy, before_step=None, scheduler=True):
    """The documented loop over `steps` steps (default: all), with hooks to break it."""
    rng = np.random.default_rng(0)
    done = 0
    for _ in range(rec.cfg.train.epochs):
        order = rng.permutation(rec.n)
        for start in range(0, rec.n, rec.cfg.train.batch_size):
            if steps is not None and done == steps:
                return
            idx = order[start:start + rec.cfg.train.batch_size]
            x, y = rec.batch(idx)
            rec.optimizer.zero_grad()
            loss(rec.model(x), y).backward()
            if before_step:
                before_step(rec)
            rec.step(idx)
            rec.optimizer.step()
            if scheduler and rec.scheduler is not None:
                rec.scheduler.step()
            done += 1


BN_MODEL = '''
from torch import nn


def bn_net(in_shape, num_classes):
    c, h, w = in_shape
    return nn.Sequential(nn.Conv2d(c, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * h * w, num_classes))
'''


@pytest.mark.parametrize("kind", ["plain", "modified", "batchnorm"])
def test_recorded_log_replays_exactly(tmp_path, monkeypatch, kind):
    kw = {}
    if kind == "modified":
        kw = dict(optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4),
                  scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=6),
                  checkpoint_every=2)
    if kind == "batchnorm":
        (tmp_path / "bn_nets.py").write_text(textwrap.dedent(BN_MODEL))
        monkeypatch.syspath_prepend(str(tmp_path))
        kw = dict(model="bn_nets:bn_net", optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.5),
                  checkpoint_every=2)
    with recorder(tmp_path / "run", **kw) as rec:
        loop(rec)
    run = TrainingRun.open(tmp_path / "run")
    assert run.total_steps == 6 and run.checkpoints == ([0, 2, 4, 6] if kw else [0, 3, 6])
    assert run.cfg.train.lr_schedule == ("cosine" if kind == "modified" else "constant")
    for a, b in zip(run.checkpoints, run.checkpoints[1:]):
        assert replay(run, a, b).exact
    # checkpoint 0 is rayforge's seeded initialisation, as `rayforge train` writes it
    from rayforge.train.run import new_model

    init = new_model(run.cfg, run.info["shape"], torch.device("cpu"), run.num_classes)
    start, _ = run.model_at(0, torch.device("cpu"))
    assert all(torch.equal(p, q) for p, q in zip(init.parameters(), start.parameters()))


def test_same_loop_as_the_trainer_gives_the_same_log(tmp_path):
    """The trainer's own plan fed through a recorder gives byte-identical checkpoints."""
    from helpers import tiny_config

    from rayforge.train.schedule import make_plan
    from rayforge.train.trainer import train

    cfg = tiny_config(data=DATA, train={"epochs": 2, "batch_size": 10, "lr": 0.1, "checkpoint_every": 3})
    train(cfg, tmp_path / "trained", progress=False)
    plan = make_plan(25, cfg.train, cfg.seed, False)
    with recorder(tmp_path / "recorded", seed=cfg.seed, checkpoint_every=3) as rec:
        for idx, flips in zip(plan.batches, plan.flips):
            x, y = rec.batch(idx, flips)
            rec.optimizer.zero_grad()
            F.cross_entropy(rec.model(x), y).backward()
            rec.step(idx, flips)
            rec.optimizer.step()
    for step in (0, 3, 6):
        name = f"trajectory/ckpt-{step:08d}.safetensors"
        assert (tmp_path / "trained" / name).read_bytes() == (tmp_path / "recorded" / name).read_bytes()


def _wrong_order(rec):
    if rec._batches:  # from the second step on: update first, then log (too late)
        rec.optimizer.step()


@pytest.mark.parametrize("break_it, match", [
    (dict(loss=lambda out, y: F.cross_entropy(out, y, reduction="sum")), "not the mean cross-entropy"),
    (dict(before_step=_wrong_order), "is not plain SGD on the logged gradient"),
    (dict(steps=4), "4 steps recorded, the declared training has 6"),
])
def test_departures_from_the_loop_fail_and_leave_nothing(tmp_path, break_it, match):
    with pytest.raises(RayforgeError, match=match):
        with recorder(tmp_path / "run") as rec:
            loop(rec, **break_it)
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.partial*"))


@pytest.mark.parametrize("kw, match", [
    (dict(optimizer=functools.partial(torch.optim.Adam, lr=0.1)), "must be torch.optim.SGD"),
    (dict(optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True)), "nesterov"),
    (dict(scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2)), "neither a constant"),
    (dict(data={**DATA, "flip": False}, flips=True), "data.flip is false"),
    (dict(batch=7), "a batch of 7 points; batch 0 of an epoch must hold 10"),
])
def test_bad_setups_are_one_line_errors(tmp_path, kw, match):
    flips, batch = kw.pop("flips", False), kw.pop("batch", None)
    with pytest.raises(RayforgeError, match=match) as info:
        with recorder(tmp_path / "run", **kw) as rec:
            if flips or batch:
                idx = np.arange(batch or 10)
                rec.batch(idx, np.ones(len(idx), bool) if flips else None)
            loop(rec)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()
