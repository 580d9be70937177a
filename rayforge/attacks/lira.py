"""LiRA (Carlini et al. 2022): a per-example likelihood-ratio test on the logit-scaled confidence.

For each point and query (the image, plus its mirror when training used flips), phi = log p_y - log sum_{j!=y} p_j
of the shadows where the point was IN and where it was OUT is fitted with a Gaussian each. A model's phi is then
scored as
    online:  log N(phi; mu_in, sigma_in) - log N(phi; mu_out, sigma_out)
    offline: -log P[Z > phi], Z ~ N(mu_out, sigma_out)   (one-sided: only "unusually confident" counts)
averaged over the queries (the reference averages the per-query log-likelihood ratios the same way).

As in the reference (research/mi_lira_2021/plot.py): the location is the median of the shadow values (robust to
one odd shadow), the scale their standard deviation (ddof=0). `global_variance` replaces each per-example scale by
one pooled within-example std of the IN (resp. OUT) values per query; the reference's `fix_variance` instead takes
np.std of all values around a single global mean (adding between-point spread), and its online variant uses the IN
spread for OUT too -- we do neither. The threshold is the one of maximum accuracy on the shadows themselves (the
paper's Appendix C: "computed based on maximum accuracy"), scored leave-one-out so a shadow is never judged by
Gaussians it helped fit.

Further departures from the reference: its inference.py queries the raw model with `training=True` (BatchNorm with
the statistics of 5000-image batches); we query in eval mode (running statistics), so a point's score never depends
on which points share its batch. Its shadows train with random shifts (reflect-padded 4 pixels), momentum 0.9,
weight decay 5e-4 on conv/linear weights, a cosine-shaped decay with warm-up and weight EMA; ours train exactly as the
target does (flips only, the project's SGD step) with the attack config's lr, batch size, epochs, momentum and weight
decay (`shadows.shadow_train_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rayforge.attacks.base import Attack, Population, augmentation_queries, register_attack
from rayforge.attacks.shadows import ShadowSet
from rayforge.attacks.signals import gaussian_log_sf, gaussian_logpdf, logit_confidence
from rayforge.attacks.thresholds import best_threshold
from rayforge.attacks.views import Query, Views
from rayforge.errors import RayforgeError

MIN_STD = 1e-6  # a point whose shadows agree exactly would get sigma 0 and an infinite score; phi is O(1..100)


@dataclass(frozen=True)
class GaussianFit:
    """Per-example, per-query Gaussians: arrays (N, Q); the IN ones are None for the offline attack."""

    mu_out: np.ndarray
    sd_out: np.ndarray
    mu_in: np.ndarray | None = None
    sd_in: np.ndarray | None = None


def shadow_phi(shadows: ShadowSet, pop: Population, queries: Sequence[Query]) -> np.ndarray:
    """(K, N, Q) phi of every shadow on every point and query."""
    return np.stack([logit_confidence(shadows.all_logits(q), pop.labels[None, :]) for q in queries], axis=-1)


def _masked_stats(phi: np.ndarray, mask: np.ndarray, global_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Median and std over the shadows (axis 0) where `mask` (K, N) is True; phi is (K, N, Q)."""
    vals = np.where(mask[..., None], phi, np.nan)
    if not mask.any(axis=0).all():
        raise RayforgeError("LiRA: some point has no IN or no OUT shadow to fit (use more shadows)")
    mu = np.nanmedian(vals, axis=0)
    if global_variance:
        # One scale per query: the within-example spread pooled over all points (residuals from each point's own
        # mean), not the spread of all values around one global mean, which would add between-point variance.
        resid = vals - np.nanmean(vals, axis=0)
        pooled = np.sqrt(np.nanmean(resid.reshape(-1, vals.shape[-1]) ** 2, axis=0))
        sd = np.broadcast_to(pooled, mu.shape).copy()
    else:
        sd = np.nanstd(vals, axis=0)
    return mu, np.maximum(sd, MIN_STD)


def fit_gaussians(phi: np.ndarray, in_mask: np.ndarray, online: bool, global_variance: bool) -> GaussianFit:
    """Fit the IN (online only) and OUT Gaussians of every point from shadow values phi (K, N, Q)."""
    mu_out, sd_out = _masked_stats(phi, ~in_mask, global_variance)
    if not online:
        return GaussianFit(mu_out, sd_out)
    mu_in, sd_in = _masked_stats(phi, in_mask, global_variance)
    return GaussianFit(mu_out, sd_out, mu_in, sd_in)


def lira_score(phi: np.ndarray, fit: GaussianFit, online: bool) -> np.ndarray:
    """(P,) scores for phi (P, Q) against a fit sliced to the same points (arrays (P, Q)); higher = member."""
    if online:
        per_query = gaussian_logpdf(phi, fit.mu_in, fit.sd_in) - gaussian_logpdf(phi, fit.mu_out, fit.sd_out)
    else:
        per_query = -gaussian_log_sf(phi, fit.mu_out, fit.sd_out)
    return per_query.mean(axis=-1)


def _take(fit: GaussianFit, points: np.ndarray) -> GaussianFit:
    return GaussianFit(*(None if a is None else a[points] for a in (fit.mu_out, fit.sd_out, fit.mu_in, fit.sd_in)))


@register_attack
class LiRA(Attack):
    name = "lira"

    def __init__(self, online: bool = True, global_variance: bool = False):
        super().__init__()
        self.online = bool(online)
        self.global_variance = bool(global_variance)
        self.fit: GaussianFit | None = None
        self.threshold: float | None = None
        self.shadow_accuracy: float | None = None  # leave-one-out accuracy at the threshold, for reports

    def prepare(self, pop: Population, shadows: ShadowSet) -> None:
        self._bind(pop, shadows)
        if self.online and shadows.k < 4:
            raise RayforgeError("LiRA online needs >= 4 shadows (leave-one-out must leave an IN model per point)")
        self.queries = augmentation_queries(pop)
        phi = shadow_phi(shadows, pop, self.queries)
        in_mask = shadows.in_mask
        self.fit = fit_gaussians(phi, in_mask, self.online, self.global_variance)
        # Leave-one-out calibration: shadow k plays the target, Gaussians come from the other K-1 shadows.
        scores, labels = [], []
        others = np.ones(shadows.k, dtype=bool)
        for k in range(shadows.k):
            others[:] = True
            others[k] = False
            loo = fit_gaussians(phi[others], in_mask[others], self.online, self.global_variance)
            scores.append(lira_score(phi[k], loo, self.online))
            labels.append(in_mask[k])
        self.threshold, self.shadow_accuracy = best_threshold(np.concatenate(scores), np.concatenate(labels))

    def score_views(self, views: Views) -> np.ndarray:
        views = self._check_views(views)
        phi = logit_confidence(views.stacked(self.queries), views.labels[:, None])  # (P, Q)
        return lira_score(phi, _take(self.fit, views.points), self.online)

    def predict(self, scores: np.ndarray, points: np.ndarray) -> np.ndarray:
        scores, _ = self._check_scores(scores, points)
        return scores >= self.threshold
