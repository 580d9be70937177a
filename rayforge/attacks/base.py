"""The attack population and the one interface every membership-inference attack implements.

An attack is fitted once (`prepare`) from the population and shadow models only, then scores any model under test
(the original or a forged one) with everything it learned frozen: a PoR is judged by whether the *same* attack
changes its mind between two models, so nothing may be refitted per model. (EnhancedMIA's Attack P is the one
attack whose decision rule reads the model under test beyond the queried point -- its threshold is a quantile of
that model's losses on fixed population data, as ML Privacy Meter computes it for whatever model it audits -- but it
learns nothing from shadows or from any model's members, so it too holds no state that scoring could change.)
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from rayforge.attacks.views import MIRROR, PLAIN, ModelViews, Query, Views, data_logits
from rayforge.data import ImageArrays, arrays_sha256
from rayforge.errors import RayforgeError
from rayforge.train.batches import TensorData

if TYPE_CHECKING:  # shadows.py imports this module
    from rayforge.attacks.shadows import ShadowSet

NUM_CLASSES = 10


@dataclass(eq=False)
class Population:
    """The points an attack knows and can be asked about, with integer ids 0..N-1.

    `images` are the raw uint8 pixels (hashable, cheap to ship); `data` holds them normalised on `device`.
    `flip` says whether the target and shadows train with random horizontal flips: attacks that query
    augmentations (LiRA, EnhancedMIA-R, MIDA) then also query the mirrored image.
    `aux` are further non-members that have no id: never evaluated, never a shadow's training data -- the
    population data of EnhancedMIA's Attack P (ML Privacy Meter's term), read only through `Views.aux_logits`.
    """

    images: ImageArrays
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool = False
    num_classes: int = NUM_CLASSES
    device: str = "cpu"
    aux: ImageArrays | None = None
    data: TensorData = field(init=False, repr=False)
    aux_data: TensorData | None = field(init=False, repr=False)
    fill: torch.Tensor = field(init=False, repr=False)  # a black pixel, normalised: what shifted views fill in

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.images) == 0:
            raise RayforgeError("attack population is empty")
        for arrays in (self.images, self.aux):
            if arrays is not None and len(arrays) and (arrays.labels.min() < 0
                                                       or arrays.labels.max() >= self.num_classes):
                raise RayforgeError(f"population labels must lie in 0..{self.num_classes - 1}")
        self.data = TensorData(self.images, self.mean, self.std, self.device)
        self.aux_data = None if self.aux is None else TensorData(self.aux, self.mean, self.std, self.device)
        self.fill = torch.tensor([-m / s for m, s in zip(self.mean, self.std)], device=self.device)

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

    def require_aux(self) -> TensorData:
        if self.aux_data is None or len(self.aux_data) == 0:
            raise RayforgeError("this attack needs population data (Population.aux): non-members outside D and V")
        return self.aux_data

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
        """Identifies the points with ids and their preprocessing (recorded with saved shadows, which train on
        them); the auxiliary points are not part of it (no shadow sees them)."""
        h = hashlib.sha256(arrays_sha256(self.images).encode())
        h.update(repr((self.mean, self.std, bool(self.flip), self.num_classes)).encode())
        return h.hexdigest()


def model_logits(model: nn.Module, pop: Population, points: np.ndarray | None = None,
                 query: Query = PLAIN) -> np.ndarray:
    """float32 (P, C) logits of `model` in eval mode on the points (all by default) seen through `query`."""
    points = pop.ids if points is None else pop.check_points(points)
    return data_logits(model, pop.data, points, query, pop.fill, pop.num_classes)


def augmentation_queries(pop: Population) -> tuple[Query, ...]:
    """The views of the augmentations training used: the image, plus its mirror when training used flips."""
    return (PLAIN, MIRROR) if pop.flip else (PLAIN,)


class Attack(ABC):
    """A membership-inference attack: fitted once from shadows, then frozen.

    `score` is continuous (higher = more likely member) so score differences s_A are meaningful; `predict` turns
    scores into member bits with thresholds fixed at `prepare` (possibly one per label, looked up via `points`).
    An attack reads a model only through `Views` (its logits on the queried points under `queries`), so one model's
    logits are computed once for all attacks, and a shadow can be scored from its cached logits.
    """

    name: str = "attack"
    queries: tuple[Query, ...] = (PLAIN,)

    def __init__(self) -> None:
        self.pop: Population | None = None

    @abstractmethod
    def prepare(self, pop: Population, shadows: "ShadowSet") -> None:
        """Fit everything (thresholds, per-example statistics) from the shadows. Never sees a model under test."""

    @abstractmethod
    def score_views(self, views: Views) -> np.ndarray:
        """float64 (P,) membership scores of the points of `views`; must not change state."""

    @abstractmethod
    def predict(self, scores: np.ndarray, points: np.ndarray) -> np.ndarray:
        """bool (P,) member predictions for `scores` of `points`, with the thresholds fixed at prepare."""

    def score(self, model: nn.Module, points: np.ndarray) -> np.ndarray:
        """float64 (P,) membership scores of population points `points` under `model`."""
        return self.score_views(ModelViews(model, self._require_prepared(), points))

    # ---- helpers shared by the attacks ------------------------------------------------------------------------

    def _bind(self, pop: Population, shadows: "ShadowSet") -> None:
        if shadows.pop is not pop and shadows.pop.fingerprint() != pop.fingerprint():
            raise RayforgeError(f"{self.name}: the shadows were trained on a different population")
        self.pop = pop

    def _require_prepared(self, points: np.ndarray | None = None) -> Population:
        if self.pop is None:
            raise RayforgeError(f"{self.name}: call prepare() before score()/predict()")
        if points is not None:
            self.pop.check_points(points)
        return self.pop

    def _check_views(self, views: Views) -> Views:
        pop = self._require_prepared()
        if views.pop is not pop and views.pop.fingerprint() != pop.fingerprint():
            raise RayforgeError(f"{self.name}: asked about a different population than it was prepared on")
        return views

    def _check_scores(self, scores: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        points = self._require_prepared().check_points(points)
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != points.shape:
            raise RayforgeError(f"{self.name}: {scores.shape[0] if scores.ndim else 0} scores for {len(points)} points")
        return scores, points


ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    ATTACKS[cls.name] = cls
    return cls


def build_attack(name: str, **kw) -> Attack:
    """A fresh, unprepared attack by name (see `ATTACKS`) with its options."""
    import rayforge.attacks  # noqa: F401  (importing the package registers every attack)

    cls = ATTACKS.get(name)
    if cls is None:
        raise RayforgeError(f"unknown attack {name!r} (known: {', '.join(sorted(ATTACKS))})")
    try:
        return cls(**kw)
    except TypeError as exc:
        raise RayforgeError(f"attack {name!r}: bad options {sorted(kw)} ({exc})") from None
