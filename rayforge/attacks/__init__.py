"""Membership-inference attacks (LiRA, EnhancedMIA, Xent, MEntr, MIDA), their shadow models, and the metrics of
the paper's Section IV-A. Plain objects: the distributed stage wraps them in Ray actors."""

from rayforge.attacks.base import ATTACKS, Attack, Population, build_attack, model_logits
from rayforge.attacks.shadows import ShadowSet, balanced_in_mask, train_shadow

# Importing the attack modules registers them in ATTACKS.
from rayforge.attacks.lira import LiRA  # noqa: E402
from rayforge.attacks.enhanced import EnhancedMIA  # noqa: E402
from rayforge.attacks.xent import Xent  # noqa: E402
from rayforge.attacks.mentr import MEntr  # noqa: E402
from rayforge.attacks.mida import MIDA  # noqa: E402

__all__ = [
    "ATTACKS",
    "Attack",
    "EnhancedMIA",
    "LiRA",
    "MEntr",
    "MIDA",
    "Population",
    "ShadowSet",
    "Xent",
    "balanced_in_mask",
    "build_attack",
    "model_logits",
    "train_shadow",
]
