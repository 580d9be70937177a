"""MIDA: an augmentation-aware loss attack (Yu et al. 2021; implemented after Kaya & Dumitras's augmentation_mia).

The model is queried on every augmentation a training sample could have been seen with -- here the image and its
horizontal mirror, the project's only augmentation -- and the two cross-entropy losses are reduced to one number
(mean, min or max). score = -reduced loss. The reduction is the one whose best global threshold separates the
calibration shadows' members from non-members with the highest balanced accuracy (as augmentation_mia picks its
reduction on the attacker's training split); then one threshold per label at maximum accuracy, as for Xent.
Calibration uses all shadows' IN/OUT points by default (K x N examples rather than one shadow's N).

Only meaningful when training used flips (pop.flip): otherwise the mirror is just another unseen input. It still runs
then, to keep the five-attack table uniform.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rayforge.attacks.base import Population, register_attack
from rayforge.attacks.labelwise import LabelThresholdAttack
from rayforge.attacks.shadows import ShadowSet
from rayforge.attacks.signals import log_prob_label
from rayforge.attacks.thresholds import best_threshold, per_label_thresholds
from rayforge.errors import RayforgeError

REDUCTIONS = {"mean": np.mean, "min": np.min, "max": np.max}


@register_attack
class MIDA(LabelThresholdAttack):
    name = "mida"
    flips = (False, True)

    def __init__(self, reduction: str | None = None, calibration_shadows: Sequence[int] | None = None,
                 balanced: bool = False):
        super().__init__(calibration_shadows, balanced)
        if reduction is not None and reduction not in REDUCTIONS:
            raise RayforgeError(f"mida: reduction must be one of {sorted(REDUCTIONS)} or None (chosen at prepare)")
        self.fixed_reduction = reduction
        self.reduction: str | None = reduction

    @staticmethod
    def losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(P, Q) cross-entropy losses, one per query."""
        return -log_prob_label(logits, np.asarray(labels)[:, None])

    def signal(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        if self.reduction is None:
            raise RayforgeError("mida: call prepare() before score()")
        return -REDUCTIONS[self.reduction](self.losses(logits, labels), axis=1)

    def prepare(self, pop: Population, shadows: ShadowSet) -> None:
        self._bind(pop, shadows)
        logits, members, classes = self._calibration(pop, shadows)
        losses = np.concatenate([self.losses(lg, pop.labels) for lg in logits])  # (K' N, Q)
        candidates = [self.fixed_reduction] if self.fixed_reduction else sorted(REDUCTIONS)
        accs = [best_threshold(-REDUCTIONS[r](losses, axis=1), members, balanced=True)[1] for r in candidates]
        self.reduction = candidates[int(np.argmax(accs))]
        scores = -REDUCTIONS[self.reduction](losses, axis=1)
        self.thresholds, self.global_threshold = per_label_thresholds(scores, members, classes, pop.num_classes,
                                                                      self.balanced)
