"""What an attack reads of a model: its logits on population points under augmented views of them.

A `Query` is one augmented view of an image: mirrored or not, then shifted by (dy, dx) pixels with black fill (the
zero padding of augmentation_mia's crop augmentation, in pixel space). A `Views` object answers an attack's
questions about ONE model on a fixed set of points, computing each view's logits once however many attacks ask:
`ModelViews` runs a model, `ShadowViews` reads a shadow model's cached logits (the exchangeable control scores a
shadow as if it were the target without rerunning it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from rayforge.train.batches import TensorData

if TYPE_CHECKING:  # base.py and shadows.py import this module
    from rayforge.attacks.base import Population
    from rayforge.attacks.shadows import ShadowSet

LOGIT_BATCH = 1024  # inference batch: bounds memory, no effect on results (eval mode, no batch statistics)


@dataclass(frozen=True, order=True)
class Query:
    """One augmented view: the image mirrored when `flip`, then moved `dy` pixels down and `dx` right."""

    flip: bool = False
    dy: int = 0
    dx: int = 0

    @property
    def key(self) -> str:
        """A stable name, e.g. 'f1_y-1_x+0' (tensor names in saved shadow logits)."""
        return f"f{int(self.flip)}_y{self.dy:+d}_x{self.dx:+d}"

    @classmethod
    def from_key(cls, key: str) -> "Query":
        f, y, x = key.split("_")
        if f not in ("f0", "f1") or y[0] != "y" or x[0] != "x":
            raise ValueError(f"not a query key: {key!r}")
        return cls(f == "f1", int(y[1:]), int(x[1:]))


PLAIN = Query()
MIRROR = Query(flip=True)


def shift_images(x: torch.Tensor, dy: int, dx: int, fill: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) moved by (dy, dx) pixels; uncovered pixels take the per-channel value `fill` (C,)."""
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    out = fill.to(x.dtype).view(1, -1, 1, 1).expand_as(x).clone()
    if abs(dy) < h and abs(dx) < w:
        out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


@torch.no_grad()
def data_logits(model: nn.Module, data: TensorData, idx: np.ndarray, query: Query, fill: torch.Tensor,
                num_classes: int, batch_size: int = LOGIT_BATCH) -> np.ndarray:
    """float32 (P, C) logits of `model` in eval mode on rows `idx` of `data` seen through `query`.
    The model's train/eval mode is restored afterwards: callers may pass a model mid-training."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(idx), batch_size):
            part = idx[start:start + batch_size]
            x, _ = data.batch(part, np.full(len(part), query.flip) if query.flip else None)
            out.append(model(shift_images(x, query.dy, query.dx, fill).to(device)).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, num_classes), dtype=np.float32)
    return torch.cat(out).numpy()


class Views(ABC):
    """One model's logits on the population points `points` (and on the population's auxiliary points), per query,
    each computed once."""

    def __init__(self, pop: "Population", points: np.ndarray):
        self.pop = pop
        self.points = pop.check_points(points)
        self._cache: dict[Query, np.ndarray] = {}
        self._aux_cache: dict[Query, np.ndarray] = {}

    @property
    def labels(self) -> np.ndarray:
        return self.pop.labels[self.points]

    def logits(self, query: Query) -> np.ndarray:
        """(P, C) on `points`."""
        if query not in self._cache:
            self._cache[query] = self._compute(query)
        return self._cache[query]

    def stacked(self, queries: Sequence[Query]) -> np.ndarray:
        """(P, Q, C), one query per entry of `queries`."""
        return np.stack([self.logits(q) for q in queries], axis=1)

    def aux_logits(self, query: Query = PLAIN) -> np.ndarray:
        """(A, C) on every auxiliary point of the population (`Population.aux`)."""
        if query not in self._aux_cache:
            self._aux_cache[query] = self._compute_aux(query)
        return self._aux_cache[query]

    @abstractmethod
    def _compute(self, query: Query) -> np.ndarray: ...

    @abstractmethod
    def _compute_aux(self, query: Query) -> np.ndarray: ...


class ModelViews(Views):
    """The views of a model under test (the original, a forged one, or any nn.Module)."""

    def __init__(self, model: nn.Module, pop: "Population", points: np.ndarray):
        super().__init__(pop, points)
        self.model = model

    def _compute(self, query: Query) -> np.ndarray:
        return data_logits(self.model, self.pop.data, self.points, query, self.pop.fill, self.pop.num_classes)

    def _compute_aux(self, query: Query) -> np.ndarray:
        aux = self.pop.require_aux()
        return data_logits(self.model, aux, np.arange(len(aux)), query, self.pop.fill, self.pop.num_classes)


class ShadowViews(Views):
    """The views of shadow k, from the shadow set's cache (auxiliary points: computed from the shadow model)."""

    def __init__(self, shadows: "ShadowSet", k: int, points: np.ndarray | None = None):
        super().__init__(shadows.pop, shadows.pop.ids if points is None else points)
        self.shadows, self.k = shadows, k

    def _compute(self, query: Query) -> np.ndarray:
        return self.shadows.logits(self.k, query)[self.points]

    def _compute_aux(self, query: Query) -> np.ndarray:
        return ModelViews(self.shadows.model(self.k), self.pop, self.points[:0]).aux_logits(query)
