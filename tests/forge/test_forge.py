"""Phase 1: the paper's Algorithm 2/3 and Algorithm 1, checked against brute force; determinism and resume on Ray."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayforge.errors import RayforgeError
from rayforge.forge.algorithm1 import forge_point_naive
from rayforge.forge.algorithm2 import candidate_rng, draw_candidates
from rayforge.forge.driver import run_forge
from rayforge.forge.engine import (ForgeContext, ForgeParams, auto_window, forge_dir, forge_unit, plan_units,
                                   read_forged)
from rayforge.forge.splits import Splits
from rayforge.train.replay import replay_steps
from rayforge.train.run import TrainingRun
from rayforge.train.trainer import train


def _params(run: TrainingRun, **kw) -> ForgeParams:
    return ForgeParams.from_config(run.cfg, threads=1, chunk=3, **kw)


def _brute_force_check(run: TrainingRun, params: ForgeParams, table, steps_to_check):
    """Recompute every candidate of the checked (step, part)s with single `.backward()` calls and compare."""
    ctx = ForgeContext(run, params)
    splits = Splits(int(run.info["n"]), params.lam, params.kappa, params.seed)
    rows = {(s, p): i for i, (s, p) in enumerate(zip(table.column("step").to_pylist(),
                                                     table.column("part").to_pylist()))}
    for t in steps_to_check:
        start = max(c for c in run.checkpoints if c <= t)
        model, velocity = run.model_at(start, ctx.device)
        replay_steps(model, velocity, ctx.data, run.steps, start, t, ctx.hyper)
        buffers = {k: v.clone() for k, v in model.named_buffers()}

        def batch_grad(idx, flips):
            model.zero_grad()
            x, y = ctx.data.batch(idx, flips)
            F.cross_entropy(model(x), y).backward()
            for k, v in model.named_buffers():  # gradients only: undo the running-statistics update
                v.copy_(buffers[k])
            return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()

        target = batch_grad(run.steps.batch[t], run.steps.flip[t])
        point_parts = splits.point_parts(t)
        for k in range(params.kappa):
            allowed = np.flatnonzero(point_parts != k)
            idx, flips = draw_candidates(candidate_rng(params.seed, t, k), allowed, params.mu,
                                         len(run.steps.batch[t]), run.cfg.data.flip)
            errors = [float(torch.linalg.vector_norm(batch_grad(i, f) - target)) for i, f in zip(idx, flips)]
            best = int(np.argmin(errors))
            row = rows[(t, k)]
            assert table.column("batch")[row].as_py() == idx[best].tolist()
            assert table.column("flip")[row].as_py() == flips[best].tolist()
            assert table.column("grad_error")[row].as_py() == pytest.approx(errors[best], rel=1e-4, abs=1e-6)
            assert not np.isin(idx[best], np.flatnonzero(point_parts == k)).any()


def _forge_local(run: TrainingRun, params: ForgeParams, window: int | None = None):
    """Phase 1 in-process; with `window`, windows inside a segment start from `original_states`, as on Ray."""
    import pyarrow as pa

    from rayforge.forge.engine import original_states, unit_table

    ctx = ForgeContext(run, params)
    tables = []
    for a, b in zip(run.checkpoints, run.checkpoints[1:]):
        units = plan_units([a, b], params.kappa, window=window)
        inner = sorted({u[0] for u in units if u[0] != a})
        states = dict(zip(inner, original_states(ctx, a, inner))) if inner else {}
        tables += [unit_table(forge_unit(ctx, w, stop, parts, states.get(w))["columns"]) for w, stop, parts in units]
    return pa.concat_tables(tables).sort_by([("step", "ascending"), ("part", "ascending")])


def test_stored_candidate_is_the_brute_force_argmin(trained_run):
    run = TrainingRun.open(trained_run)
    params = _params(run, kappa=2, mu=5)
    table = _forge_local(run, params)
    assert len(table) == run.total_steps * 2
    _brute_force_check(run, params, table, steps_to_check=[0, 4, 11])
    assert _forge_local(run, params, window=1).equals(table)  # two windows inside each segment


def test_batchnorm_model_with_flips_and_modified_sgd(tmp_path, make_config):
    cfg = make_config(model={"name": "resnet_mini"},
                      data={"flip": True, "synthetic_train": 24, "synthetic_test": 8, "synthetic_shape": [3, 8, 8]},
                      train={"batch_size": 6, "epochs": 1, "momentum": 0.9, "weight_decay": 5e-4,
                             "lr_schedule": "cosine", "lr": 0.01, "checkpoint_every": 2})
    train(cfg, tmp_path / "run", progress=False)
    run = TrainingRun.open(tmp_path / "run")
    params = _params(run, kappa=2, mu=3, lam=2)
    table = _forge_local(run, params)
    _brute_force_check(run, params, table, steps_to_check=[1, 3])
    assert any(any(f) for f in table.column("flip").to_pylist())  # candidates drew flips
    # Windows inside a checkpoint segment continue the same replay bit for bit (BatchNorm buffers, momentum).
    assert _forge_local(run, params, window=1).equals(table)


def test_no_forged_batch_contains_its_part(trained_run):
    run = TrainingRun.open(trained_run)
    params = _params(run, kappa=3, mu=2, lam=2)
    table = _forge_local(run, params)
    splits = Splits(60, 2, 3, params.seed)
    for t, k, batch in zip(table.column("step").to_pylist(), table.column("part").to_pylist(),
                           table.column("batch").to_pylist()):
        assert not np.any(splits.point_parts(t)[batch] == k)


def test_algorithm1_never_uses_the_point(trained_run):
    run = TrainingRun.open(trained_run)
    for point in (0, 17, 59):
        result = forge_point_naive(run, point, mu=6, seed=0, steps=range(2, 8))
        assert result["columns"]["step"] == list(range(2, 8))
        assert all(point not in b for b in result["columns"]["batch"])
        assert result["grad_evals"] == 6 * 6 + 8  # μ per forged step + the replayed original steps


def test_bad_parameters(trained_run, make_config):
    run = TrainingRun.open(trained_run)
    cfg = run.cfg
    with pytest.raises(RayforgeError, match="kappa"):
        run_forge(trained_run, _params(run, kappa=61), 1, cfg.ray, cfg.wandb, progress=False)
    with pytest.raises(RayforgeError, match="must divide"):
        run_forge(trained_run, _params(run, lam=7), 1, cfg.ray, cfg.wandb, progress=False)
    with pytest.raises(RayforgeError, match="mu"):
        run_forge(trained_run, ForgeParams(**{**_params(run).to_json(), "mu": 0}), 1, cfg.ray, cfg.wandb,
                  progress=False)
    with pytest.raises(RayforgeError, match="unknown strategy"):
        run_forge(trained_run, _params(run, strategy="magic"), 1, cfg.ray, cfg.wandb, progress=False)


def test_incomplete_log_is_refused(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")
    (tmp_path / "run" / "trajectory" / "steps.parquet").unlink()
    cfg = TrainingRun.open(trained_run).cfg
    with pytest.raises(RayforgeError, match="incomplete training log"):
        run_forge(tmp_path / "run", _params(TrainingRun.open(trained_run)), 1, cfg.ray, cfg.wandb, progress=False)


def test_log_that_does_not_replay_is_refused(trained_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from rayforge.train.log import ckpt_name

    shutil.copytree(trained_run, tmp_path / "run")
    path = tmp_path / "run" / "trajectory" / ckpt_name(3)
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.startswith("param/"))
    tensors[key] = tensors[key] + 0.01
    save_file(tensors, str(path))
    run = TrainingRun.open(tmp_path / "run")
    with pytest.raises(RayforgeError, match="does not replay"):
        forge_unit(ForgeContext(run, _params(run, kappa=2, mu=2)), 0, 3, 0)


# ------------------------------------------------------------------------------------------------ on Ray

def _forged_bytes(run_dir, strategy="paper"):
    return (forge_dir(run_dir, strategy) / "forged.parquet").read_bytes()


def test_one_and_two_actors_and_resume_give_identical_bytes(ray_local, trained_run, tmp_path):
    runs = {}
    for name in ("one", "two", "resumed"):
        shutil.copytree(trained_run, tmp_path / name)
        runs[name] = TrainingRun.open(tmp_path / name)
    cfg = runs["one"].cfg
    params = _params(runs["one"], kappa=2, mu=3)
    summary = run_forge(tmp_path / "one", params, 1, cfg.ray, cfg.wandb, progress=False)
    run_forge(tmp_path / "two", params, 2, cfg.ray, cfg.wandb, progress=False)
    assert _forged_bytes(tmp_path / "one") == _forged_bytes(tmp_path / "two")
    # Stopped after 3 units (as by Ctrl-C), then resumed: same bytes, and only the rest was computed.
    assert run_forge(tmp_path / "resumed", params, 2, cfg.ray, cfg.wandb, progress=False, max_units=3) is None
    done_units = []
    run_forge(tmp_path / "resumed", params, 2, cfg.ray, cfg.wandb, progress=False, on_unit=done_units.append)
    assert len(done_units) == len(plan_units(runs["one"].checkpoints, 2, window=auto_window(12))) - 3
    assert _forged_bytes(tmp_path / "resumed") == _forged_bytes(tmp_path / "one")
    table = read_forged(forge_dir(tmp_path / "one", "paper") / "forged.parquet", kappa=2, n_points=60)
    assert len(table) == 24 and summary["grad_evals"] == 24 * 3 + 12  # μ per (step, part) + one replay per step
    # The same bytes as the plain (Ray-free) functions produce.
    local = _forge_local(runs["one"], params)
    assert local.equals(table)


def test_whole_segments_when_they_feed_the_pool_and_the_cut_is_kept_on_resume(ray_local, trained_run, tmp_path):
    """One actor and enough segments: units are whole checkpoint segments (nothing re-walked), the bytes are the
    windowed run's; a resume with more actors keeps the recorded cut."""
    for name in ("windows", "segments"):
        shutil.copytree(trained_run, tmp_path / name)
    run = TrainingRun.open(tmp_path / "windows")
    cfg, segments = run.cfg, len(run.checkpoints) - 1
    assert segments >= 2
    params = _params(run, kappa=2, mu=3)
    each = dataclasses.replace(params, parts_per_unit=1)  # 2 units per segment: >= 4 for one actor
    windowed = run_forge(tmp_path / "windows", dataclasses.replace(each, window=1), 1, cfg.ray, cfg.wandb,
                         progress=False)
    assert windowed["trajectory_steps"] > 0 and windowed["window"] == 1
    assert run_forge(tmp_path / "segments", each, 1, cfg.ray, cfg.wandb, progress=False, max_units=1) is None
    whole = run_forge(tmp_path / "segments", each, 2, cfg.ray, cfg.wandb, progress=False)  # resumed, 2 actors
    assert whole["window"] == "segment" and whole["trajectory_steps"] == 0 and whole["units"] == 2 * segments
    assert _forged_bytes(tmp_path / "segments") == _forged_bytes(tmp_path / "windows")


def test_resume_with_other_parameters_is_refused(ray_local, trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")
    run = TrainingRun.open(tmp_path / "run")
    run_forge(tmp_path / "run", _params(run, kappa=2, mu=2), 1, run.cfg.ray, run.cfg.wandb, progress=False,
              max_units=1)
    with pytest.raises(RayforgeError, match="other parameters"):
        run_forge(tmp_path / "run", _params(run, kappa=2, mu=3), 1, run.cfg.ray, run.cfg.wandb, progress=False)


def test_killed_actor_is_replaced_and_its_unit_redone(ray_local, trained_run, tmp_path):
    import os
    import signal

    import psutil

    for name in ("ref", "killed"):
        shutil.copytree(trained_run, tmp_path / name)
    run = TrainingRun.open(tmp_path / "ref")
    params = _params(run, kappa=2, mu=2)
    run_forge(tmp_path / "ref", params, 2, run.cfg.ray, run.cfg.wandb, progress=False)
    killed = []

    def kill_one_actor(unit):
        if killed:
            return
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any("ForgeWorker" in part for part in (proc.info["cmdline"] or [])):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
                return

    run_forge(tmp_path / "killed", params, 2, run.cfg.ray, run.cfg.wandb, progress=False, on_unit=kill_one_actor)
    assert killed
    assert _forged_bytes(tmp_path / "killed") == _forged_bytes(tmp_path / "ref")


def test_content_twins_are_excluded_with_their_point():
    from rayforge.data import ImageArrays
    from rayforge.forge.twins import Twins

    images = np.random.default_rng(0).integers(0, 255, (6, 1, 4, 4), dtype=np.uint8)
    images[4] = images[1]  # an exact twin of point 1
    images[5] = images[2][..., ::-1]  # point 2 mirrored: a twin only when training uses flips
    arrays = ImageArrays(images, np.array([0, 1, 2, 3, 1, 2]))
    excluded = np.array([False, True, True, False, False, False])
    assert Twins(arrays, flip=False).allowed(np.array([0, 3, 4, 5]), excluded).tolist() == [0, 3, 5]
    assert Twins(arrays, flip=True).allowed(np.array([0, 3, 4, 5]), excluded).tolist() == [0, 3]
