"""Membership-inference attacks (the paper's LiRA, EnhancedMIA, MEntr, Xent, MIDA, plus EnhancedMIA's per-example
variant), their shadow models, and the metrics of the paper's Section IV-A. Plain objects: the distributed stage
wraps them in Ray actors."""

from rayforge.attacks.base import ATTACKS, Attack, Population, build_attack, model_logits
from rayforge.attacks.shadows import ShadowSet, balanced_in_mask, train_shadow
from rayforge.attacks.views import MIRROR, PLAIN, ModelViews, Query, ShadowViews, Views

# Importing the attack modules registers them in ATTACKS.
from rayforge.attacks.lira import LiRA  # noqa: E402
from rayforge.attacks.enhanced import EnhancedMIA  # noqa: E402
from rayforge.attacks.enhanced_ref import EnhancedMIARef  # noqa: E402
from rayforge.attacks.xent import Xent  # noqa: E402
from rayforge.attacks.mentr import MEntr  # noqa: E402
from rayforge.attacks.mida import MIDA  # noqa: E402

__all__ = [
    "ATTACKS",
    "Attack",
    "EnhancedMIA",
    "EnhancedMIARef",
    "LiRA",
    "MEntr",
    "MIDA",
    "MIRROR",
    "ModelViews",
    "PLAIN",
    "Population",
    "Query",
    "ShadowSet",
    "ShadowViews",
    "Views",
    "Xent",
    "balanced_in_mask",
    "build_attack",
    "model_logits",
    "train_shadow",
]
