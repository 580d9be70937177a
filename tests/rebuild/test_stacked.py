"""The wide model of phase 2's batched replay: K models side by side step exactly like K separate models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from rayforge.data import ImageArrays
from rayforge.models import build_model
from rayforge.rebuild.stacked import NotStackable, WideModel, check, wide_inputs, wide_loss
from rayforge.train.batches import TensorData
from rayforge.train.sgd import SGDHyper, sgd_update, train_step, zero_velocity

CASES = {"lenet5": (1, 32, 32), "resnet_mini": (3, 8, 8), "logreg": (1, 8, 8)}


def _data(shape, n=40, seed=0):
    rng = np.random.default_rng(seed)
    arrays = ImageArrays(rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.int64))
    return TensorData(arrays, (0.5,) * shape[0], (0.25,) * shape[0])


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_wide_model_steps_like_separate_models(name, memory_format):
    """Three different models (with momentum and weight decay) for three steps, on shared and own batches. In
    float64: the wide model is the same arithmetic as separate models, so they agree to rounding (~1e-15); in
    float32, BatchNorm over 8-sample batches amplifies reduction-order rounding to ~1e-4, varying with the thread
    count, which would hide a real mismatch behind a loose tolerance."""
    shape, k, b = CASES[name], 3, 8
    data = _data(shape)
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(build_model(name, shape, 10).double())
    hyper = SGDHyper(momentum=0.9, weight_decay=5e-4)
    wide = WideModel(models, memory_format).double()
    velocity = {n: torch.zeros_like(p) for n, p in wide.named_parameters()}
    separate = [copy.deepcopy(m) for m in models]
    velocities = [zero_velocity(m) for m in separate]
    rng = np.random.default_rng(1)
    for step in range(3):
        own = np.stack([rng.choice(len(data), b, replace=False) for _ in range(k)])
        idx = own if step == 1 else np.repeat(own[:1], k, axis=0)  # shared, own, shared
        flips = rng.random((k, b)) < 0.5
        flips = flips if step == 1 else np.repeat(flips[:1], k, axis=0)
        x, ys = wide_inputs(data, idx, flips, memory_format)
        x = x.double()
        assert x.shape[1] == (k * shape[0] if step == 1 else shape[0])
        wide.train()
        params = [p for _, p in wide.named_parameters()]
        grads = torch.autograd.grad(wide_loss(wide(x), ys), params)
        sgd_update(wide, grads, velocity, 0.05, hyper)
        for m, v, i, f in zip(separate, velocities, idx, flips):
            xi, yi = data.batch(i, f)
            train_step(m, v, xi.double(), yi, 0.05, hyper)
    rebuilt = [copy.deepcopy(m) for m in models]
    wide.unstack_into(rebuilt)
    for got, ref in zip(rebuilt, separate):
        for (n, a), (_, r) in zip(list(got.state_dict().items()), list(ref.state_dict().items())):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12, msg=f"{name} {n}")


class Mixer(nn.Module):
    """Mixes channels after its first layer (a channel softmax): the wide model must be refused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2 * 6 * 6, 10)

    def forward(self, x):
        return self.head(torch.softmax(self.conv(x), dim=1).flatten(1))


def test_models_that_cannot_be_stacked_are_refused():
    data = _data((1, 8, 8))
    idx, flips = np.arange(12).reshape(3, 4), np.zeros((3, 4), bool)
    mixer = Mixer()
    with pytest.raises(NotStackable, match="differ"):
        check([mixer] * 3, WideModel([mixer] * 3), data, idx, flips)
    with pytest.raises(NotStackable, match="no stacker"):
        WideModel([nn.Sequential(nn.Flatten(), nn.LayerNorm(64), nn.Linear(64, 10))] * 2)
