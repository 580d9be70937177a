"""EnhancedMIA-R, attack R of Ye et al. 2022 (reference models, per-example thresholds; ML Privacy Meter's reference
metric with the logit-rescale threshold function). Kept beside `enhanced` (attack P, the paper's EnhancedMIA) as the
stronger per-example variant.

For every point, the reference models are the shadows where it is OUT. Their losses are mapped to the logit-scaled
confidence logit(p_y) = log p_y - log(1 - p_y) (a monotone function of the loss that makes its distribution nearly
Gaussian) and fitted with a Gaussian N(mu, sigma) (maximum likelihood, ddof=0, like scipy's norm.fit). The per-example
threshold at false-positive rate alpha is that Gaussian's (1 - alpha) quantile: a point is a member when its
rescaled value under the model lies above it. We expose the same test as a continuous score,
    score = Phi((v - mu) / sigma)   (the Gaussian CDF of the model's value under the OUT fit, in [0, 1])
so `predict` = score > 1 - alpha (alpha = 0.1 in the paper) is exactly the per-example quantile test.
When training used flips, v is the mean of the rescaled values of the image and its mirror (for the shadows too).
Departures: the reference models are the run's shadows (half of them hold each point), not models trained afresh per
target; scores are the Gaussian CDF rather than the raw rescaled loss, which is the same test.
"""

from __future__ import annotations

import numpy as np

from rayforge.attacks.base import Attack, Population, augmentation_queries, register_attack
from rayforge.attacks.shadows import ShadowSet
from rayforge.attacks.signals import gaussian_cdf, logit_confidence
from rayforge.attacks.views import Views
from rayforge.errors import RayforgeError

MIN_STD = 1e-6  # reference models that agree exactly would give sigma 0 (a step-function score)


@register_attack
class EnhancedMIARef(Attack):
    name = "enhanced_ref"

    def __init__(self, fpr: float = 0.1):
        super().__init__()
        if not 0.0 < fpr < 1.0:
            raise RayforgeError(f"enhanced_ref: fpr must be in (0, 1), got {fpr}")
        self.fpr = float(fpr)
        self.mu: np.ndarray | None = None  # (N,)
        self.sd: np.ndarray | None = None  # (N,)

    def prepare(self, pop: Population, shadows: ShadowSet) -> None:
        self._bind(pop, shadows)
        self.queries = augmentation_queries(pop)
        v = np.mean([logit_confidence(shadows.all_logits(q), pop.labels[None, :]) for q in self.queries],
                    axis=0)  # (K, N)
        out = ~shadows.in_mask
        if not out.any(axis=0).all():
            raise RayforgeError("enhanced_ref: some point has no OUT shadow to use as reference model")
        vals = np.where(out, v, np.nan)
        self.mu = np.nanmean(vals, axis=0)
        self.sd = np.maximum(np.nanstd(vals, axis=0), MIN_STD)

    def score_views(self, views: Views) -> np.ndarray:
        views = self._check_views(views)
        v = logit_confidence(views.stacked(self.queries), views.labels[:, None]).mean(axis=1)
        return gaussian_cdf(v, self.mu[views.points], self.sd[views.points])

    def predict(self, scores: np.ndarray, points: np.ndarray) -> np.ndarray:
        scores, _ = self._check_scores(scores, points)
        return scores > 1.0 - self.fpr
