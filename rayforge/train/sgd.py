"""One SGD step, shared by training, replay, forging, rebuilding and verification.

Everything that recomputes a step goes through `loss_and_grads` and `sgd_update`, so a replay is bit-identical to the
original run on the same machine. The update follows torch.optim.SGD (dampening 0, no Nesterov):

    d = grad + weight_decay * theta          # Appendix B, Alg. 3 line 5
    v = momentum * v + d                     # v starts at 0, so the first step gives v = d exactly, like torch
    theta = theta - lr * v

Departure from the paper's notation: Alg. 3 writes the regulariser as `weight_decay * ||theta||^2` (gradient
2 * wd * theta) but the paper's experiments use PyTorch's SGD (Appendix C), whose weight decay adds `wd * theta`.
We follow the implementation. For forging the term cancels in grad_error anyway (same theta on both sides).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SGDHyper:
    momentum: float = 0.0
    weight_decay: float = 0.0


def named_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters()}


def zero_velocity(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(p) for name, p in model.named_parameters()}


def loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Mean cross-entropy over the batch and its gradient, in training mode (BatchNorm uses batch statistics and
    updates its running statistics, exactly as the original step did)."""
    model.train()
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), list(grads)


@torch.no_grad()
def sgd_update(model: nn.Module, grads: list[torch.Tensor], velocity: dict[str, torch.Tensor], lr: float,
               hyper: SGDHyper) -> None:
    for (name, p), g in zip(model.named_parameters(), grads):
        d = g.add(p, alpha=hyper.weight_decay) if hyper.weight_decay else g
        if hyper.momentum:
            v = velocity[name]
            v.mul_(hyper.momentum).add_(d)
            d = v
        p.add_(d, alpha=-lr)


def train_step(model: nn.Module, velocity: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, lr: float,
               hyper: SGDHyper) -> torch.Tensor:
    loss, grads = loss_and_grads(model, x, y)
    sgd_update(model, grads, velocity, lr, hyper)
    return loss
