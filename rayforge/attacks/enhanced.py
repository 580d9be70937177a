"""EnhancedMIA as the paper ran it: attack P of Ye et al. 2022, ML Privacy Meter's population metric
(privacytrustlab/ml_privacy_meter, tutorials/population_metric.ipynb: `PopulationMetric` with `threshold_func`).

The signal is the cross-entropy loss of the plain image under the model. One global threshold: the alpha-quantile
(numpy's 'lower' method, as the reference's `threshold_func`) of the same model's losses on population data --
non-members of the target that are used nowhere else in the evaluation (`Population.aux`: neither D nor V, never a
shadow's training point) -- with alpha = 0.1, the paper's false-positive rate. A point is a member when its loss is
at most the threshold. We expose the test as the continuous
    score = threshold - loss   (member iff score >= 0),
so `predict` is exactly the reference's `signal <= threshold` and s_A measures how far a point moved against it.

The threshold is computed for EACH model under test from that model's own losses on the (fixed) population data,
as the reference computes it for whatever model it audits: applying "the same attack" to the original and to a
forged model means running the same procedure on each, with the same auxiliary data. A threshold frozen from the
original model would be an attack fitted on one of the two models being compared, which this project never does
(attacks are fitted from shadows only; Attack P uses none). Nothing is learned or stored at `prepare`, so scoring
can change no state; a forged model's scores cost one extra pass over the population data.

Departures: the population data are the run's own spare points (the training split outside D and V when `data.subset`
leaves some, else part of the test split; see `evaluate.attack_population`), |P| = `attack.population_data`
(default |V|), not a separately curated population dataset.
"""

from __future__ import annotations

import numpy as np

from rayforge.attacks.base import Attack, Population, register_attack
from rayforge.attacks.shadows import ShadowSet
from rayforge.attacks.signals import log_prob_label
from rayforge.attacks.views import PLAIN, Views
from rayforge.errors import RayforgeError


def population_threshold(losses: np.ndarray, alpha: float) -> float:
    """The reference's `threshold_func`: the alpha-quantile of the population losses, numpy method 'lower'."""
    return float(np.quantile(np.asarray(losses, dtype=np.float64), alpha, method="lower"))


@register_attack
class EnhancedMIA(Attack):
    name = "enhanced"
    queries = (PLAIN,)

    def __init__(self, fpr: float = 0.1):
        super().__init__()
        if not 0.0 < fpr < 1.0:
            raise RayforgeError(f"enhanced: fpr must be in (0, 1), got {fpr}")
        self.fpr = float(fpr)

    def prepare(self, pop: Population, shadows: ShadowSet) -> None:
        self._bind(pop, shadows)
        pop.require_aux()

    def threshold(self, views: Views) -> float:
        """The model's alpha-quantile loss on the population data."""
        aux = self.pop.aux
        return population_threshold(-log_prob_label(views.aux_logits(PLAIN), aux.labels), self.fpr)

    def score_views(self, views: Views) -> np.ndarray:
        views = self._check_views(views)
        loss = -log_prob_label(views.logits(PLAIN), views.labels)
        return self.threshold(views) - loss

    def predict(self, scores: np.ndarray, points: np.ndarray) -> np.ndarray:
        scores, _ = self._check_scores(scores, points)
        return scores >= 0.0
