"""The attack population and the one interface every membership-inference attack implements.

An attack is fitted once (`prepare`) from the population and shadow models only, then scores any model under test
(the original or a forged one) with everything it learned frozen: a PoR is judged by whether the *same* attack
changes its mind between two models, so nothing may be refitted per model.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from rayforge.data import Dataset, ImageArrays, arrays_sha256
from rayforge.errors import RayforgeError
from rayforge.train.batches import TensorData

if TYPE_CHECKING:  # shadows.py imports this module
    from rayforge.attacks.shadows import ShadowSet

NUM_CLASSES = 10
LOGIT_BATCH = 1024  # inference batch: bounds memory, no effect on results (eval mode, no batch statistics)


@dataclass(eq=False)
class Population:
    """The points an attack knows and can be asked about, with integer ids 0..N-1.

    `images` are the raw uint8 pixels (hashable, cheap to ship); `data` holds them normalised on `device`.
    `flip` says whether the target and shadows train with random horizontal flips: attacks that query
    augmentations (LiRA, EnhancedMIA) then also query the mirrored image.
    """

    images: ImageArrays
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool = False
    num_classes: int = NUM_CLASSES
    device: str = "cpu"
    data: TensorData = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.images) == 0:
            raise RayforgeError("attack population is empty")
        if self.images.labels.min() < 0 or self.images.labels.max() >= self.num_classes:
            raise RayforgeError(f"population labels must lie in 0..{self.num_classes - 1}")
        self.data = TensorData(self.images, self.mean, self.std, self.device)

    @classmethod
    def from_dataset(cls, ds: Dataset, flip: bool, include_test: bool = False, **kw) -> "Population":
        """The run's training points (ids 0..n-1), followed by its test points when `include_test`."""
        arrays = ds.train
        if include_test:
            arrays = ImageArrays(np.concatenate([ds.train.images, ds.test.images]),
                                 np.concatenate([ds.train.labels, ds.test.labels]))
        return cls(arrays, ds.mean, ds.std, flip, **kw)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def ids(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)

    @property
    def labels(self) -> np.ndarray:
        return self.images.labels

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.images.shape[1:])  # type: ignore[return-value]

    def check_points(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points)
        if points.ndim != 1 or not np.issubdtype(points.dtype, np.integer):
            raise RayforgeError(f"points must be a 1-D array of integer population ids, got {points.dtype} "
                                f"{points.shape}")
        if points.size and (points.min() < 0 or points.max() >= len(self)):
            raise RayforgeError(f"point ids must lie in 0..{len(self) - 1}")
        # Contiguous: torch cannot wrap the negative strides of e.g. points[::-1].
        return np.ascontiguousarray(points, dtype=np.int64)

    def fingerprint(self) -> str:
        """Identifies the population's content and preprocessing (recorded with saved shadows)."""
        h = hashlib.sha256(arrays_sha256(self.images).encode())
        h.update(repr((self.mean, self.std, bool(self.flip), self.num_classes)).encode())
        return h.hexdigest()


@torch.no_grad()
def model_logits(model: nn.Module, pop: Population, points: np.ndarray | None = None, flip: bool = False,
                 batch_size: int = LOGIT_BATCH) -> np.ndarray:
    """float32 (P, C) logits of `model` in eval mode on the points (all by default), mirrored when `flip`.

    The model's train/eval mode is restored afterwards: callers may pass a model mid-training.
    """
    points = pop.ids if points is None else pop.check_points(points)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(points), batch_size):
            idx = points[start:start + batch_size]
            x, _ = pop.data.batch(idx, np.full(len(idx), flip) if flip else None)
            out.append(model(x.to(device)).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, pop.num_classes), dtype=np.float32)
    return torch.cat(out).numpy()


def query_flips(pop: Population) -> tuple[bool, ...]:
    """The queries of augmentation-aware attacks: the image, plus its mirror when training used flips."""
    return (False, True) if pop.flip else (False,)


def query_logits(model: nn.Module, pop: Population, points: np.ndarray, flips: Sequence[bool]) -> np.ndarray:
    """(P, Q, C) logits, one query per entry of `flips`."""
    return np.stack([model_logits(model, pop, points, f) for f in flips], axis=1)


class Attack(ABC):
    """A membership-inference attack: fitted once from shadows, then frozen.

    `score` is continuous (higher = more likely member) so score differences s_A are meaningful; `predict` turns
    scores into member bits with thresholds fixed at `prepare` (possibly one per label, looked up via `points`).
    """

    name: str = "attack"

    def __init__(self) -> None:
        self.pop: Population | None = None

    @abstractmethod
    def prepare(self, pop: Population, shadows: "ShadowSet") -> None:
        """Fit everything (thresholds, per-example statistics) from the shadows. Never sees a model under test."""

    @abstractmethod
    def score(self, model: nn.Module, points: np.ndarray) -> np.ndarray:
        """float64 (P,) membership scores of population points `points` under `model`; must not change state."""

    @abstractmethod
    def predict(self, scores: np.ndarray, points: np.ndarray) -> np.ndarray:
        """bool (P,) member predictions for `scores` of `points`, with the thresholds fixed at prepare."""

    # ---- helpers shared by the attacks ------------------------------------------------------------------------

    def _bind(self, pop: Population, shadows: "ShadowSet") -> None:
        if shadows.pop is not pop and shadows.pop.fingerprint() != pop.fingerprint():
            raise RayforgeError(f"{self.name}: the shadows were trained on a different population")
        self.pop = pop

    def _require_prepared(self, points: np.ndarray) -> np.ndarray:
        if self.pop is None:
            raise RayforgeError(f"{self.name}: call prepare() before score()/predict()")
        return self.pop.check_points(points)

    def _check_scores(self, scores: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        points = self._require_prepared(points)
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != points.shape:
            raise RayforgeError(f"{self.name}: {scores.shape[0] if scores.ndim else 0} scores for {len(points)} points")
        return scores, points


ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    ATTACKS[cls.name] = cls
    return cls


def build_attack(name: str, **kw) -> Attack:
    """A fresh, unprepared attack by name (lira, enhanced, xent, mentr, mida) with its options."""
    import rayforge.attacks  # noqa: F401  (importing the package registers every attack)

    cls = ATTACKS.get(name)
    if cls is None:
        raise RayforgeError(f"unknown attack {name!r} (known: {', '.join(sorted(ATTACKS))})")
    try:
        return cls(**kw)
    except TypeError as exc:
        raise RayforgeError(f"attack {name!r}: bad options {sorted(kw)} ({exc})") from None
