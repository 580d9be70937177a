"""Xent (Yeom et al. 2018): members have lower cross-entropy loss.

score = -loss = log p_y of the plain image; one threshold per label, each maximising the balanced accuracy
0.5 * (TPR + TNR) on ONE shadow model's (shadow 0's) own members and non-members -- the paper's "label-specific
threshold derived from a shadow model", chosen as the inspire-group code it follows (membership-inference-evaluation,
`_thre_setting`, the same as MEntr) chooses it. That code thresholds the confidence p_y, a monotone function of the
loss, so its predictions are these. Departure from Yeom et al., whose threshold is the mean training loss: the paper
uses the reference code's criterion. Ties go to the lowest threshold (the reference's strict `>` update).
"""

from __future__ import annotations

import numpy as np

from rayforge.attacks.base import register_attack
from rayforge.attacks.labelwise import LabelThresholdAttack
from rayforge.attacks.signals import log_prob_label


@register_attack
class Xent(LabelThresholdAttack):
    name = "xent"

    def signal(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return log_prob_label(logits[:, 0], labels)
