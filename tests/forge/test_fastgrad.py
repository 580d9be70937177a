"""Hook-based candidate and per-sample gradients (`rayforge.forge.fastgrad`) against plain `.backward()` loops,
against `CandidateGradients` (vmap), and the factory's choice of method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rayforge.data import ImageArrays
from rayforge.errors import RayforgeError
from rayforge.forge import fastgrad
from rayforge.forge.fastgrad import (GroupedGradients, UnsupportedModel, hooks_supported, make_gradient_evaluator,
                                     per_sample_gradients)
from rayforge.forge.gradients import CandidateGradients
from rayforge.models import build_model
from rayforge.train.batches import TensorData

TOL = dict(atol=1e-5, rtol=1e-4)
SHAPES = {"lenet5": (1, 32, 32), "logreg": (1, 8, 8)}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread (as forging workers run); on a shared 2-core machine two threads can be 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_params(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Parameters other than the model's own (so the evaluators must use the ones passed in)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (p.detach() + 0.1 * torch.randn(p.shape, generator=gen)).requires_grad_()
            for k, p in model.named_parameters()}


def backward_grad(model: nn.Module, params, x, y) -> torch.Tensor:
    """One plain `.backward()` of the mean cross-entropy at `params`, flattened in parameter order."""
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(params[k])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def make_case(name: str, m: int, b: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(name, SHAPES[name], 10)
    params = random_params(model, seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    xs = torch.randn(m, b, *SHAPES[name], generator=gen)
    ys = torch.randint(0, 10, (m, b), generator=gen)
    return model, params, xs, ys


def synthetic_data(n: int, shape, seed: int = 0) -> TensorData:
    rng = np.random.default_rng(seed)
    arrays = ImageArrays(rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.int64))
    return TensorData(arrays, (0.5,) * shape[0], (0.25,) * shape[0])


@pytest.mark.parametrize("name", ["lenet5", "logreg"])
def test_grouped_matches_backward_loop_and_vmap(name):
    model, params, xs, ys = make_case(name, m=5, b=24)
    got = GroupedGradients(model, chunk=5)(params, xs, ys)
    ref = torch.stack([backward_grad(model, params, xs[c], ys[c]) for c in range(len(ys))])
    assert got.shape == ref.shape == (5, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(got, CandidateGradients(model, chunk=5)(params, xs, ys), **TOL)


@pytest.mark.parametrize("name", ["lenet5", "logreg"])
def test_per_sample_matches_backward_loop(name):
    model, params, xs, ys = make_case(name, m=1, b=7)
    x, y = xs[0], ys[0]
    got = per_sample_gradients(model, params, x, y)
    ref = torch.stack([backward_grad(model, params, x[i:i + 1], y[i:i + 1]) for i in range(len(y))])
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(per_sample_gradients(model, params, x, y, chunk=3), got, atol=1e-6, rtol=0)
    # default parameters are the model's own (backward_grad loaded `params` into it); no hooks are left behind
    torch.testing.assert_close(per_sample_gradients(model, None, x, y), got, atol=1e-6, rtol=0)
    assert all(not m._forward_hooks for m in model.modules())


def test_chunking_and_evaluations_counter():
    model, params, xs, ys = make_case("lenet5", m=7, b=10)
    one = GroupedGradients(model, chunk=7)
    whole = one(params, xs, ys)
    assert one.evaluations == 7
    for chunk in (1, 3):
        ev = GroupedGradients(model, chunk=chunk)
        torch.testing.assert_close(ev(params, xs, ys), whole, atol=1e-6, rtol=0)
        assert ev.evaluations == 7


@pytest.mark.parametrize("flip", [False, True])
def test_distances_dedupe_matches_plain_and_backward(flip):
    """`distances`/`gradients` on TensorData: deduplicated samples (also split into blocks by a small budget) give
    the same gradients as plain chunks and as `.backward()` per candidate, flips included."""
    torch.manual_seed(0)
    model = build_model("lenet5", SHAPES["lenet5"], 10)
    params = random_params(model, 1)
    data = synthetic_data(150, SHAPES["lenet5"], seed=3)
    rng = np.random.default_rng(4)
    m, b = 9, 40  # 360 draws of 150 (300 with flips) samples: dedupe pays
    idx = np.stack([rng.choice(len(data), b, replace=False) for _ in range(m)])
    flips = rng.random((m, b)) < 0.5 if flip else np.zeros((m, b), dtype=bool)
    ref = torch.stack([backward_grad(model, params, *data.batch(idx[c], flips[c])) for c in range(m)])
    target = ref[0] + 0.01 * torch.randn(ref.shape[1])
    ref_dist = torch.linalg.vector_norm(ref - target, dim=1)
    plain = GroupedGradients(model, chunk=4, dedupe=False)
    plain_grads = plain.gradients(params, data, idx, flips)
    torch.testing.assert_close(plain_grads, ref, **TOL)
    # 3,390 floats of factors per LeNet5 sample: 130 samples' worth splits the candidates into blocks (with flips the
    # blocks then have too few repeats and run plain)
    for ev, passes in ((GroupedGradients(model, chunk=4), 1),
                       (GroupedGradients(model, chunk=2, dedupe_budget=130 * 3390), 0 if flip else 2)):
        calls = []
        factors = ev._factors
        ev._factors = lambda *a: calls.append(1) or factors(*a)
        torch.testing.assert_close(ev.gradients(params, data, idx, flips), plain_grads, atol=1e-6, rtol=0)
        assert len(calls) >= passes  # samples were deduplicated (in blocks for the small budget)
        torch.testing.assert_close(ev.distances(params, data, idx, flips, target), ref_dist, **TOL)
        assert ev.evaluations == 2 * m
    whole = GroupedGradients(model, chunk=m).distances(params, data, idx, flips, target)
    torch.testing.assert_close(GroupedGradients(model, chunk=1).distances(params, data, idx, flips, target), whole,
                               atol=1e-6, rtol=0)


def test_factory_picks_hooks_for_plain_models_and_vmap_for_batchnorm():
    for name in ("lenet5", "logreg"):
        model = build_model(name, SHAPES[name], 10)
        assert hooks_supported(model)
        assert type(make_gradient_evaluator(model, 4)) is GroupedGradients
        assert type(make_gradient_evaluator(model, 4, method="hooks")) is GroupedGradients
        assert type(make_gradient_evaluator(model, 4, method="vmap")) is CandidateGradients
    resnet = build_model("resnet_mini", (3, 8, 8), 10)
    assert not hooks_supported(resnet)
    assert type(make_gradient_evaluator(resnet, 4)) is CandidateGradients
    assert make_gradient_evaluator(resnet, 4).loop  # on CPU "auto" loops over candidates
    assert not make_gradient_evaluator(resnet, 4, method="vmap").loop
    with pytest.raises(UnsupportedModel, match="BatchNorm"):
        make_gradient_evaluator(resnet, 4, method="hooks")
    with pytest.raises(UnsupportedModel, match="BatchNorm"):
        per_sample_gradients(resnet, None, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(RayforgeError, match="unknown gradient method"):
        make_gradient_evaluator(resnet, 4, method="fast")


class Odd(nn.Module):
    """Conv variants (stride, dilation, 'same' and reflect padding, large outputs that take the native per-group
    kernel, a 1x1 output that takes the unfold), a Linear over extra dims, layers run twice."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)  # 12x12 out: native per-group path
        self.c2 = nn.Conv2d(4, 5, 3, stride=(2, 1), dilation=(1, 2), padding=(2, 1), bias=False)  # 7x10 from 12x12
        self.c3 = nn.Conv2d(5, 5, (2, 3), padding="same", padding_mode="reflect")
        self.c4 = nn.Conv2d(5, 3, (7, 10))  # 1x1 out: unfold path
        self.sq = nn.Linear(3, 3)  # run twice on plain vectors: per-sample outer products accumulate
        self.tok = nn.Linear(10, 4)  # over (N, 5, 10) tokens
        self.head = nn.Linear(3 + 20, 7)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        h = torch.tanh(self.c3(h))
        h = torch.tanh(self.c3(h))  # second use of c3: its gradient sums both calls
        a = self.sq(torch.tanh(self.sq(self.c4(h).flatten(1))))
        t = torch.tanh(self.tok(h.mean(2)))  # (N, 5, 10) -> (N, 5, 4)
        return self.head(torch.cat([a, t.flatten(1)], 1))


@pytest.mark.parametrize("unfold_growth", [fastgrad.UNFOLD_MAX_GROWTH, 1e9])
def test_conv_variants_linear_tokens_and_repeated_layers(monkeypatch, unfold_growth):
    """Both conv group-sum routes: the default mix (native kernel per group for the large outputs, unfold for the
    1x1 one) and the unfold route for every conv."""
    monkeypatch.setattr(fastgrad, "UNFOLD_MAX_GROWTH", unfold_growth)
    torch.manual_seed(0)
    model = Odd()
    params = random_params(model, 1)
    xs, ys = torch.randn(3, 6, 2, 12, 12), torch.randint(0, 7, (3, 6))
    ref = torch.stack([backward_grad(model, params, xs[c], ys[c]) for c in range(3)])
    torch.testing.assert_close(GroupedGradients(model, chunk=2)(params, xs, ys), ref, **TOL)
    x, y = xs[0], ys[0]
    ref_ps = torch.stack([backward_grad(model, params, x[i:i + 1], y[i:i + 1]) for i in range(len(y))])
    torch.testing.assert_close(per_sample_gradients(model, params, x, y), ref_ps, **TOL)


def test_unsupported_models_raise():
    cases = {
        "dropout": nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 2)),
        "holds parameters": nn.Sequential(nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 2)),
        "grouped convolution": nn.Sequential(nn.Conv2d(2, 2, 1, groups=2), nn.Flatten(), nn.Linear(8, 2)),
    }
    for reason, model in cases.items():
        assert not hooks_supported(model)
        with pytest.raises(UnsupportedModel, match=reason):
            GroupedGradients(model, 2)
        assert type(make_gradient_evaluator(model, 2)) is CandidateGradients
    for first in (True, False):  # an in-place op right after the first layer, or after a later one
        layers = [nn.Conv2d(1, 2, 1), nn.ReLU(inplace=True)] if first else [nn.Conv2d(1, 2, 1)]
        inplace = nn.Sequential(*layers, nn.Tanh(), nn.Conv2d(2, 2, 1), nn.ReLU(inplace=True), nn.Flatten(),
                                nn.Linear(8, 2))
        with pytest.raises(UnsupportedModel, match="in place"):
            GroupedGradients(inplace, 2)(dict(inplace.named_parameters()), torch.randn(1, 2, 1, 2, 2),
                                         torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.parametrize("name", ["lenet5", "odd"])
def test_sample_gradients_gram_and_combination_match_per_sample_gradients(name):
    """Ghost products (large layers) and materialised gradients (small ones) give the Gram of the per-sample
    gradients; layers run twice (Odd) contribute the Gram of their summed gradient; passes concatenate."""
    torch.manual_seed(0)
    if name == "odd":
        model = Odd()
        params = random_params(model, 1)
        x, y = torch.randn(9, 2, 12, 12), torch.randint(0, 7, (9,))
    else:
        model, params, xs, ys = make_case(name, m=1, b=9)
        x, y = xs[0], ys[0]
    ev = GroupedGradients(model, chunk=4)
    ref = per_sample_gradients(model, params, x, y)
    samples = ev.sample_gradients([ev.records(params, x[:4], y[:4], 1.0), ev.records(params, x[4:], y[4:], 1.0)],
                                  params)
    gram = samples.gram()
    torch.testing.assert_close(gram, ref @ ref.T, rtol=1e-4, atol=1e-4 * float(gram.abs().max()))
    rows, weights = torch.tensor([0, 3, 5, 8]), torch.tensor([1.0, -1.0, 2.0, 0.5])
    torch.testing.assert_close(samples.combination(rows, weights), weights @ ref[rows], **TOL)
    # Several combinations at once (a short one padded with weight 0), as swap takes all parts of a step.
    many_rows, many_w = torch.tensor([[0, 3, 5, 8], [2, 7, 0, 0]]), torch.tensor([[1.0, -1.0, 2.0, 0.5],
                                                                                 [-1.0, 1.0, 0.0, 0.0]])
    expected = torch.stack([w @ ref[r] for r, w in zip(many_rows, many_w)])
    torch.testing.assert_close(samples.combinations(many_rows, many_w), expected, **TOL)
    members = torch.tensor([[0, 3], [5, 8]])
    torch.testing.assert_close(samples.sums(members), ref[members].sum(1), **TOL)


def test_training_step_records_give_the_training_gradients_bit_for_bit():
    from rayforge.forge.fastgrad import training_step_records
    from rayforge.train.sgd import loss_and_grads

    model, params, xs, ys = make_case("lenet5", m=1, b=12)
    _, plain = loss_and_grads(model, xs[0], ys[0])
    grads, records = training_step_records(model, xs[0], ys[0])
    assert all(torch.equal(a, b) for a, b in zip(plain, grads))
    assert all(not m._forward_hooks for m in model.modules())
    ev = GroupedGradients(model, chunk=4)
    mapped_grads, mapped = ev.training_step(model, xs[0], ys[0])
    mean = ev.sample_gradients([mapped], dict(model.named_parameters())).sums(torch.arange(12)[None])[0]
    torch.testing.assert_close(mean, torch.cat([g.reshape(-1) for g in grads]), **TOL)  # D of the MEAN loss


def test_a_layer_type_registers_its_own_rule():
    """A parameterised layer type is supported once a rule is registered for it (here: a Linear subclass, which
    exact-type lookup does not match until registered)."""
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x)

    model = nn.Sequential(nn.Flatten(), Scaled(16, 3))
    assert "no registered gradient rule" in fastgrad.unsupported_reason(model)
    try:
        fastgrad.register_rule(Scaled)(fastgrad.LinearRule)
        assert hooks_supported(model)
        x, y = torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,))
        params = dict(model.named_parameters())
        ref = torch.stack([backward_grad(model, params, x[i:i + 1], y[i:i + 1]) for i in range(5)])
        torch.testing.assert_close(per_sample_gradients(model, params, x, y), ref, **TOL)
    finally:
        fastgrad.RULES.pop(Scaled, None)


def test_loop_equals_vmap_for_batchnorm_candidates():
    """The looped candidate gradients of a BatchNorm model are the vmapped ones (each candidate with its own batch
    statistics), to float rounding."""
    torch.manual_seed(0)
    model = build_model("resnet_mini", (3, 8, 8), 10)
    params = dict(model.named_parameters())
    xs, ys = torch.randn(3, 5, 3, 8, 8), torch.randint(0, 10, (3, 5))
    vmapped = CandidateGradients(model, 4)(params, xs, ys)
    looped = CandidateGradients(model, 4, loop=True)(params, xs, ys)
    torch.testing.assert_close(looped, vmapped, atol=1e-5, rtol=1e-4)
    assert float(vmapped.abs().max()) > 1e-3  # not trivially zero
    assert not torch.allclose(looped[0], looped[1])  # each candidate its own gradient
