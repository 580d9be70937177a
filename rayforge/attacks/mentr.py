"""MEntr (Song & Mittal 2021): modified prediction entropy, which is low only for confident *correct* predictions.

Mentr(x, y) = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i); score = -Mentr of the plain image. One threshold
per label, each maximising (TPR + TNR) / 2 on shadow 0's members and non-members (the reference's `_thre_setting`).
The reference clips probabilities at 1e-30 before taking logs (capping the entropy near 69); we compute every term
in log-space instead (`signals.modified_entropy`), identical for ordinary outputs and finite for extreme logits.
"""

from __future__ import annotations

import numpy as np

from rayforge.attacks.base import register_attack
from rayforge.attacks.labelwise import LabelThresholdAttack
from rayforge.attacks.signals import modified_entropy


@register_attack
class MEntr(LabelThresholdAttack):
    name = "mentr"

    def signal(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return -modified_entropy(logits[:, 0], labels)
