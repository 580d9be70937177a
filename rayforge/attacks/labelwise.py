"""Shared machinery of the attacks with label-specific global thresholds (Xent, MEntr).

Such an attack is a per-point signal of the model's outputs plus one threshold per class label, each chosen on
calibration shadows' own members (IN) and non-members (OUT) at maximum balanced accuracy 0.5 * (TPR + TNR), as the
inspire-group membership-inference-evaluation code's `_thre_setting` does (or at plain accuracy with
balanced=False).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Sequence

import numpy as np

from rayforge.attacks.base import Attack, Population
from rayforge.attacks.shadows import ShadowSet
from rayforge.attacks.thresholds import per_label_thresholds
from rayforge.attacks.views import PLAIN, Views
from rayforge.errors import RayforgeError


class LabelThresholdAttack(Attack):
    """Subclasses define `signal` (higher = member) of the views in `queries`."""

    queries = (PLAIN,)

    def __init__(self, calibration_shadows: Sequence[int] | None = (0,), balanced: bool = True):
        super().__init__()
        self.calibration_shadows = None if calibration_shadows is None else tuple(int(k) for k in calibration_shadows)
        self.balanced = bool(balanced)
        self.thresholds: np.ndarray | None = None  # (C,)
        self.global_threshold: float | None = None

    @abstractmethod
    def signal(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(P,) scores from logits (P, Q, C), one view per entry of `self.queries`, and labels (P,)."""

    def _calibration(self, pop: Population, shadows: ShadowSet) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Per calibration shadow its logits (N, Q, C); plus pooled IN labels and class labels."""
        ks = range(shadows.k) if self.calibration_shadows is None else self.calibration_shadows
        if not ks or any(k < 0 or k >= shadows.k for k in ks):
            raise RayforgeError(f"{self.name}: calibration shadows {list(ks)} not in 0..{shadows.k - 1}")
        logits = [np.stack([shadows.logits(k, q) for q in self.queries], axis=1) for k in ks]
        members = np.concatenate([shadows.in_mask[k] for k in ks])
        classes = np.tile(pop.labels, len(ks))
        return logits, members, classes

    def prepare(self, pop: Population, shadows: ShadowSet) -> None:
        self._bind(pop, shadows)
        logits, members, classes = self._calibration(pop, shadows)
        scores = np.concatenate([self.signal(lg, pop.labels) for lg in logits])
        self.thresholds, self.global_threshold = per_label_thresholds(scores, members, classes, pop.num_classes,
                                                                      self.balanced)

    def score_views(self, views: Views) -> np.ndarray:
        views = self._check_views(views)
        return self.signal(views.stacked(self.queries), views.labels)

    def predict(self, scores: np.ndarray, points: np.ndarray) -> np.ndarray:
        scores, points = self._check_scores(scores, points)
        return scores >= self.thresholds[self.pop.labels[points]]
