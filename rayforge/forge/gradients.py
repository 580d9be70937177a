"""Batched gradients of many candidate minibatches at one θ, without a Python loop of `.backward()` calls.

`torch.func.vmap(grad(loss))` runs over a chunk of candidates at once; each candidate is a whole minibatch, so
BatchNorm models see each candidate's own batch statistics in training mode, exactly as an original step does.
(The evaluation copy has running-statistics tracking removed: running statistics never enter a training-mode
forward pass, and updating them in place cannot be vmapped.) Chunking bounds memory to `chunk` minibatches.

`loop=True` computes the same gradients one candidate at a time (a plain forward/backward each): on CPU, for
BatchNorm convnets, vmapped convolution backward is slower than a loop (measured for ResNet-mini, 8 candidates of
25 images, 1 thread: 3.19 s vmapped, 1.20 s looped, largest difference 7e-7), so "auto" loops on CPU.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

from rayforge.train.batches import TensorData


def flatten(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class CandidateGradients:
    """Flat minibatch gradients of the mean cross-entropy for stacks of candidate minibatches."""

    def __init__(self, model: nn.Module, chunk: int, loop: bool = False):
        self.model = copy.deepcopy(model)
        replace_all_batch_norm_modules_(self.model)
        self.model.train()
        self.chunk, self.loop = chunk, loop
        self.evaluations = 0  # minibatch gradients computed (the paper's unit of cost)

        def loss(params, x, y):
            return F.cross_entropy(functional_call(self.model, params, (x,)), y)

        self._grads = vmap(grad(loss), in_dims=(None, 0, 0))

    def __call__(self, params: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """xs: (m, b, C, H, W), ys: (m, b) -> (m, dim) gradients in the model's parameter order (one chunk)."""
        self.evaluations += len(ys)
        if self.loop:
            return torch.stack([self._one(params, x, y) for x, y in zip(xs, ys)])
        g = self._grads({name: p.detach() for name, p in params.items()}, xs, ys)
        return torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], dim=1)

    def _one(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        loss = F.cross_entropy(functional_call(self.model, leaves, (x,)), y)
        return flatten(torch.autograd.grad(loss, list(leaves.values())))

    def distances(self, params, data: TensorData, idx: np.ndarray, flips: np.ndarray,
                  target: torch.Tensor) -> torch.Tensor:
        """ℓ2 distance to `target` (a flat gradient) of the gradient of each candidate minibatch idx[m] (with
        flips[m]), materialising and holding only `chunk` minibatches at a time."""
        out = []
        for start in range(0, len(idx), self.chunk):
            xs, ys = data.stacked(idx[start:start + self.chunk], flips[start:start + self.chunk])
            out.append(torch.linalg.vector_norm(self(params, xs, ys) - target, dim=1))
        return torch.cat(out)
