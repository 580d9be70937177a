"""Strategy `swap` and `hybrid`, and the greedy rule behind them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rayforge.forge.engine import ForgeContext, ForgeParams, forge_unit
from rayforge.forge.fastgrad import per_sample_gradients
from rayforge.forge.splits import Splits
from rayforge.forge.swap import exchange_picks, greedy_picks
from rayforge.train.run import TrainingRun
from rayforge.train.trainer import train


def _greedy(pool, points, residual, count):
    gram = (pool @ pool.T).double().numpy()
    return greedy_picks(gram, (pool @ residual).double().numpy(), float(residual @ residual), np.array(points),
                        count)


def test_greedy_picks_on_a_hand_checked_example():
    pool = torch.tensor([[1.0, 0.0], [3.0, 0.1], [0.0, 5.0], [2.0, 0.0]])
    # r = (3, 0): (3, 0.1) leaves (0, -0.1); then (1, 0) costs 1.01 against 4.01 for (2, 0) and 26.01 for (0, 5)
    picks, r_sq = _greedy(pool, [10, 11, 12, 13], torch.tensor([3.0, 0.0]), 2)
    assert picks == [1, 0] and r_sq == pytest.approx(1.01)
    # one point in two orientations (rows 0 and 1 are both point 7): never picked twice
    assert _greedy(pool, [7, 7, 12, 13], torch.tensor([4.0, 0.1]), 2)[0] == [1, 3]


def test_exchanges_fix_a_greedy_trap():
    """r = (2, 0): the greedy takes (1.9, 0.5) first (cost 0.26), then (1, 0), leaving (-0.9, -0.5); exchanging
    the first pick for (1, 0.05) leaves (0, -0.05)."""
    pool = torch.tensor([[1.9, 0.5], [1.0, 0.0], [1.0, 0.05]])
    r = torch.tensor([2.0, 0.0])
    gram, dots = (pool @ pool.T).double().numpy(), (pool @ r).double().numpy()
    greedy, g_sq = greedy_picks(gram, dots, float(r @ r), np.arange(3), 2)
    assert greedy == [0, 1] and g_sq == pytest.approx(1.06)
    picks, r_sq = exchange_picks(gram, dots, float(r @ r), np.arange(3), greedy, 10)
    assert sorted(picks) == [1, 2] and r_sq == pytest.approx(0.0025, abs=1e-6)
    left = r - pool[picks].sum(0)
    assert float(left @ left) == pytest.approx(r_sq, abs=1e-6)
    assert exchange_picks(gram, dots, float(r @ r), np.arange(3), greedy, 0)[0] == greedy  # no rounds: unchanged


def _unit(run, strategy, **kw):
    params = ForgeParams.from_config(run.cfg, strategy=strategy, kappa=3, mu=3, lam=2, threads=1, chunk=3,
                                     pool_size=20, **kw)
    ctx = ForgeContext(run, params)
    return ctx, forge_unit(ctx, 0, 3, (0, 1, 2))["columns"]


def test_swap_never_uses_its_part_and_keeps_most_of_the_rest(trained_run):
    """Exchanges may trade a kept point for a better fit, but the forged batch stays mostly B_t \\ D_k."""
    run = TrainingRun.open(trained_run)
    _, cols = _unit(run, "swap")
    splits = Splits(60, 2, 3, run.cfg.seed)
    for t, k, batch in zip(cols["step"], cols["part"], cols["batch"]):
        parts = splits.point_parts(t)
        assert not np.any(parts[batch] == k)
        original = run.steps.batch[t]
        kept = original[parts[original] != k]
        assert np.isin(kept, batch).mean() >= 0.5 and len(set(batch.tolist())) == len(batch) == len(original)


def test_residual_equals_exact_batch_gradient_difference(trained_run):
    """Without BatchNorm, (Σ picks − Σ removed)/b of per-sample gradients is the batch-gradient difference."""
    run = TrainingRun.open(trained_run)
    ctx, cols = _unit(run, "swap")
    model, _ = run.model_at(0, torch.device("cpu"))
    params = dict(model.named_parameters())
    b = len(run.steps.batch[0])
    for k, batch, flip, err in zip(cols["part"][:3], cols["batch"][:3], cols["flip"][:3], cols["grad_error"][:3]):
        original, oflip = run.steps.batch[0], run.steps.flip[0]
        removed = ~np.isin(original, batch)
        picked = ~np.isin(batch, original)
        xr, yr = ctx.data.batch(original[removed], oflip[removed])
        xp, yp = ctx.data.batch(batch[picked], flip[picked])
        diff = (per_sample_gradients(model, params, xp, yp).sum(0)
                - per_sample_gradients(model, params, xr, yr).sum(0)) / b
        assert float(torch.linalg.vector_norm(diff)) == pytest.approx(err, rel=1e-4, abs=1e-6)


def test_swap_beats_paper_and_hybrid_takes_the_better(trained_run):
    run = TrainingRun.open(trained_run)
    _, paper = _unit(run, "paper")
    _, swap = _unit(run, "swap")
    _, hybrid = _unit(run, "hybrid")
    assert np.median(swap["grad_error"]) < np.median(paper["grad_error"])
    assert np.allclose(hybrid["grad_error"], np.minimum(paper["grad_error"], swap["grad_error"]))


def test_swap_on_a_batchnorm_model_with_flips(tmp_path, make_config):
    cfg = make_config(model={"name": "resnet_mini"},
                      data={"flip": True, "synthetic_train": 24, "synthetic_test": 8, "synthetic_shape": [3, 8, 8]},
                      train={"batch_size": 6, "epochs": 1, "checkpoint_every": 2, "lr": 0.01})
    train(cfg, tmp_path / "run", progress=False)
    run = TrainingRun.open(tmp_path / "run")
    params = ForgeParams.from_config(run.cfg, strategy="swap", kappa=2, mu=2, lam=2, threads=1, chunk=2, pool_size=8)
    cols = forge_unit(ForgeContext(run, params), 0, 2, (0, 1))["columns"]
    splits = Splits(24, 2, 2, run.cfg.seed)
    for t, k, batch in zip(cols["step"], cols["part"], cols["batch"]):
        assert not np.any(splits.point_parts(t)[batch] == k)
    assert all(np.isfinite(cols["grad_error"]))


def test_swap_is_deterministic_on_ray_and_the_sample_forges_the_full_runs_rows(ray_local, trained_run, tmp_path):
    """1 vs 2 actors and a resume give the same bytes; the sampling approximation's rows equal the full run's
    (every choice is seeded per (step, part), and the adaptive pool grows per (step, round), whoever needs it)."""
    import shutil

    import pyarrow.parquet as pq

    from rayforge.forge.driver import run_forge
    from rayforge.forge.engine import forge_dir

    runs = {}
    for name in ("one", "two", "resumed", "sampled"):
        shutil.copytree(trained_run, tmp_path / name)
        runs[name] = TrainingRun.open(tmp_path / name)
    cfg = runs["one"].cfg
    params = ForgeParams.from_config(cfg, strategy="swap", kappa=3, lam=2, threads=1, pool_size=12,
                                     pool_target=0.05, pool_rounds=1)
    run_forge(tmp_path / "one", params, 1, cfg.ray, cfg.wandb, progress=False)
    run_forge(tmp_path / "two", params, 2, cfg.ray, cfg.wandb, progress=False)
    assert run_forge(tmp_path / "resumed", params, 2, cfg.ray, cfg.wandb, progress=False, max_units=2) is None
    run_forge(tmp_path / "resumed", params, 2, cfg.ray, cfg.wandb, progress=False)
    data = {n: (forge_dir(tmp_path / n, "swap") / "forged.parquet").read_bytes() for n in ("one", "two", "resumed")}
    assert data["one"] == data["two"] == data["resumed"]
    run_forge(tmp_path / "sampled", dataclasses.replace(params, points=5), 2, cfg.ray, cfg.wandb, progress=False)
    full = pq.read_table(forge_dir(tmp_path / "one", "swap") / "forged.parquet").to_pylist()
    sampled = pq.read_table(forge_dir(tmp_path / "sampled", "swap") / "forged.parquet").to_pylist()
    by_key = {(r["step"], r["part"]): r for r in full}
    assert 0 < len(sampled) < len(full)
    assert all(by_key[(r["step"], r["part"])] == r for r in sampled)


def test_swap_with_flips_on_the_hook_path(tmp_path, make_config):
    """LeNet5 (no BatchNorm) with flips: both orientations of a pool point are entries, never both used; the
    exact grad_error equals the batch-gradient difference."""
    cfg = make_config(model={"name": "lenet5"},
                      data={"flip": True, "synthetic_train": 40, "synthetic_test": 8, "synthetic_shape": [1, 32, 32]},
                      train={"batch_size": 10, "epochs": 1, "checkpoint_every": 2, "lr": 0.05})
    train(cfg, tmp_path / "run", progress=False)
    run = TrainingRun.open(tmp_path / "run")
    params = ForgeParams.from_config(run.cfg, strategy="swap", kappa=2, lam=2, threads=1, pool_size=8)
    ctx = ForgeContext(run, params)
    cols = forge_unit(ctx, 0, 2, (0, 1))["columns"]
    assert ctx.reuse_step  # LeNet5 takes the hook path: the training step's factors are reused
    splits = Splits(40, 2, 2, run.cfg.seed)
    model, _ = run.model_at(0, torch.device("cpu"))
    for t, k, batch, flip, err in zip(cols["step"], cols["part"], cols["batch"], cols["flip"], cols["grad_error"]):
        assert not np.any(splits.point_parts(t)[batch] == k) and len(set(batch.tolist())) == len(batch)
        if t == 0:
            x, y = ctx.data.batch(batch, flip)
            forged = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
            x, y = ctx.data.batch(run.steps.batch[0], run.steps.flip[0])
            original = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
            diff = torch.cat([(a - b).reshape(-1) for a, b in zip(forged, original)])
            assert float(torch.linalg.vector_norm(diff)) == pytest.approx(err, rel=1e-3, abs=1e-6)
