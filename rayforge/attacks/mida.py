"""MIDA (Yu et al. 2021, "How does data augmentation affect privacy in machine learning?"): membership inference as
the classification of a SET of augmented copies of a point rather than of the point alone.

References: the paper implements MIDA "based on augmentation_mia" (Kaya & Dumitras's code, whose augmentation-aware
attack reads the losses of many augmented copies, crops included: zero-padded and shifted images), and Yu et al.'s
own code (dayu11/MI_with_DA, mi_attack.py, the `M_moments` attack) for the set classifier. Here:
  * the set: the cross-entropy losses of every copy training could have produced -- the image and its mirror -- each
    also shifted by (dy, dx) in {-s..s}^2 with black fill as augmentation_mia's crop does (s = `shift`, default 1:
    2 x 9 = 18 copies; shift=0 keeps the two copies training used);
  * permutation-invariant features: the power means (mean_t loss_t^k)^(1/k) for k = 1..20 (Yu's `get_moments`);
  * the classifier: Yu's inference model, an MLP 20 -> 20 -> 20 -> 1 with tanh and a sigmoid output, trained with
    binary cross-entropy by plain SGD (lr 0.5, batch 200, 1000 steps), keeping the weights of best accuracy checked
    every 5 steps;
  * its training data: the shadow models' own members (IN) and non-members (OUT) only -- features from shadow
    logits, labels from the shadows' IN/OUT mask. The target's members are never labelled, and no model under test
    is seen.
score = the classifier's logit (higher = member). predict: one threshold per label at maximum accuracy (the
paper's Appendix C: "label-specific MI score thresholds ... based on maximum accuracy").
Departures: Yu et al. pick the kept weights on the very examples they evaluate (the target's members and
non-members); we pick them, and the label thresholds, on held-out shadows (the last quarter of the K shadows, at
least one), fitting on the others. Yu et al. train on 200 + 200 examples; we use every (shadow, point) pair of the
fitting shadows. The MLP is trained in float64 numpy (reproducible anywhere), from torch.nn.Linear's default init.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rayforge.attacks.base import Attack, Population, register_attack
from rayforge.attacks.shadows import ShadowSet
from rayforge.attacks.signals import log_prob_label
from rayforge.attacks.thresholds import per_label_thresholds
from rayforge.attacks.views import Query, Views
from rayforge.errors import RayforgeError

ORDERS = 20  # moment orders 1..20, as Yu et al.
HIDDEN = 20
LR, BATCH, STEPS, EVAL_EVERY = 0.5, 200, 1000, 5


def mida_queries(shift: int) -> tuple[Query, ...]:
    """Every copy: unflipped then flipped, each at every shift in {-shift..shift}^2 (row-major)."""
    r = range(-shift, shift + 1)
    return tuple(Query(f, dy, dx) for f in (False, True) for dy in r for dx in r)


def moment_features(losses: np.ndarray) -> np.ndarray:
    """(P, T) losses -> (P, ORDERS) power means (mean_t l_t^k)^(1/k), k = 1..ORDERS, computed relative to each row's
    largest loss so high orders never overflow."""
    loss = np.maximum(np.asarray(losses, dtype=np.float64), 0.0)  # exact losses are >= 0; guard rounding
    top = loss.max(axis=1, keepdims=True)
    ratio = loss / np.where(top > 0, top, 1.0)
    return np.stack([np.mean(ratio ** k, axis=1) ** (1.0 / k) for k in range(1, ORDERS + 1)], axis=1) * top


@dataclass(frozen=True)
class MLPWeights:
    """The fitted set classifier (float64), evaluated in numpy: x -> tanh -> tanh -> logit."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray

    def logit(self, x: np.ndarray) -> np.ndarray:
        h = np.tanh(x @ self.w1 + self.b1)
        h = np.tanh(h @ self.w2 + self.b2)
        return (h @ self.w3 + self.b3)[:, 0]


def _init_weights(rng: np.random.Generator) -> list[np.ndarray]:
    """torch.nn.Linear's default init (the reference's layers): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases too."""
    out = []
    for fan_in, fan_out in ((ORDERS, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 1)):
        bound = 1.0 / np.sqrt(fan_in)
        out += [rng.uniform(-bound, bound, (fan_in, fan_out)), rng.uniform(-bound, bound, fan_out)]
    return out


def _sgd_step(p: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> None:
    """One plain SGD step on the mean binary cross-entropy of the logits, backpropagated by hand (float64)."""
    w1, b1, w2, b2, w3, b3 = p
    h1 = np.tanh(x @ w1 + b1)
    h2 = np.tanh(h1 @ w2 + b2)
    z = h2 @ w3 + b3
    dz = (1.0 / (1.0 + np.exp(-z)) - y[:, None]) / len(x)
    da2 = (dz @ w3.T) * (1.0 - h2 ** 2)
    da1 = (da2 @ w2.T) * (1.0 - h1 ** 2)
    grads = [x.T @ da1, da1.sum(0), h1.T @ da2, da2.sum(0), h2.T @ dz, dz.sum(0)]
    for param, grad in zip(p, grads):
        param -= LR * grad


def fit_classifier(x_fit: np.ndarray, y_fit: np.ndarray, x_sel: np.ndarray, y_sel: np.ndarray,
                   seed: int) -> MLPWeights:
    """Yu et al.'s inference model trained on (x_fit, y_fit) with batches drawn without replacement as theirs are;
    the weights kept are those of best accuracy on (x_sel, y_sel), checked every EVAL_EVERY steps (first best wins).
    In numpy: a 20-unit MLP is all per-call overhead in torch, and float64 numpy is reproducible everywhere."""
    rng = np.random.default_rng([seed, 0x41DA])
    p = _init_weights(rng)
    y = np.asarray(y_fit, dtype=np.float64)
    best, kept = -1.0, p
    for step in range(STEPS):
        if step % EVAL_EVERY == 0:
            acc = float(np.mean((MLPWeights(*p).logit(x_sel) >= 0) == y_sel))
            if acc > best:
                best, kept = acc, [a.copy() for a in p]
        idx = rng.choice(len(x_fit), size=min(BATCH, len(x_fit)), replace=False)
        _sgd_step(p, x_fit[idx], y[idx])
    return MLPWeights(*kept)


@register_attack
class MIDA(Attack):
    name = "mida"

    def __init__(self, shift: int = 1, seed: int = 0):
        super().__init__()
        if not isinstance(shift, int) or shift < 0:
            raise RayforgeError(f"mida: shift must be an integer >= 0, got {shift!r}")
        self.shift, self.seed = shift, int(seed)
        self.queries = mida_queries(shift)
        self.classifier: MLPWeights | None = None
        self.thresholds: np.ndarray | None = None  # (C,)

    def features(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(P, T, C) logits of the copies, labels (P,) -> (P, ORDERS) features."""
        return moment_features(-log_prob_label(logits, np.asarray(labels)[:, None]))

    def training_set(self, pop: Population, shadows: ShadowSet) -> tuple[np.ndarray, np.ndarray]:
        """(features (K N, ORDERS), IN labels (K N,)), shadow-major: every population point under each shadow,
        labelled with that shadow's own IN/OUT mask -- nothing else."""
        shadows.ensure(self.queries)
        feats = [self.features(np.stack([shadows.logits(k, q) for q in self.queries], axis=1), pop.labels)
                 for k in range(shadows.k)]
        return np.concatenate(feats), shadows.in_mask.reshape(-1)

    def prepare(self, pop: Population, shadows: ShadowSet) -> None:
        self._bind(pop, shadows)
        if not pop.flip:
            raise RayforgeError("mida: the target did not train with flips (data.flip is false), so there are no "
                                "augmented copies to read")
        if shadows.k < 2:
            raise RayforgeError("mida: needs >= 2 shadows (one to fit the classifier on, one to select it)")
        x, member = self.training_set(pop, shadows)
        n_sel = max(1, shadows.k // 4)
        sel = np.repeat(np.arange(shadows.k) >= shadows.k - n_sel, len(pop))
        self.classifier = fit_classifier(x[~sel], member[~sel], x[sel], member[sel], self.seed)
        classes = np.tile(pop.labels, shadows.k)
        self.thresholds, _ = per_label_thresholds(self.classifier.logit(x[sel]), member[sel], classes[sel],
                                                  pop.num_classes, balanced=False)

    def score_views(self, views: Views) -> np.ndarray:
        views = self._check_views(views)
        return self.classifier.logit(self.features(views.stacked(self.queries), views.labels))

    def predict(self, scores: np.ndarray, points: np.ndarray) -> np.ndarray:
        scores, points = self._check_scores(scores, points)
        return scores >= self.thresholds[self.pop.labels[points]]
