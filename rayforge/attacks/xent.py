"""Xent (Yeom et al. 2018): members have lower cross-entropy loss.

score = -loss = log p_y of the plain image; one threshold per label, each at maximum (plain) accuracy on ONE shadow
model's (shadow 0's) own members and non-members. Yeom's original threshold is the mean training loss; the paper's
setup (and the inspire-group code it follows) picks the accuracy-maximising one instead, as here.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rayforge.attacks.base import register_attack
from rayforge.attacks.labelwise import LabelThresholdAttack
from rayforge.attacks.signals import log_prob_label


@register_attack
class Xent(LabelThresholdAttack):
    name = "xent"
    flips = (False,)

    def __init__(self, calibration_shadows: Sequence[int] | None = (0,), balanced: bool = False):
        super().__init__(calibration_shadows, balanced)

    def signal(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return log_prob_label(logits[:, 0], labels)
