"""Each attack pinned to its reference on a small hand-made case: Attack P's population quantile, Xent's balanced
per-label threshold (inspire-group's `_thre_setting`), MIDA's moment features and shadow-only classifier."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rayforge.attacks import MIRROR, PLAIN, ModelViews, Population, ShadowSet, build_attack
from rayforge.attacks import mida as mida_module
from rayforge.attacks.enhanced import population_threshold
from rayforge.attacks.mida import mida_queries, moment_features
from rayforge.attacks.signals import log_prob_label
from rayforge.data import ImageArrays
from rayforge.errors import RayforgeError


def _prepared(world, name, **kw):
    attack = build_attack(name, **kw)
    attack.prepare(world.pop, world.shadows)
    return attack


# ---- EnhancedMIA = Attack P (ML Privacy Meter's population metric) ------------------------------------------------

def test_population_threshold_is_the_lower_quantile():
    losses = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0])
    assert population_threshold(losses, 0.1) == 0.1  # 10 values: the 0.1 quantile 'lower' is the 1st smallest
    assert population_threshold(losses, 0.25) == 0.3  # position 2.25 -> index 2
    assert population_threshold(losses, 0.25) == np.quantile(losses, 0.25, method="lower")


def test_attack_p_threshold_is_the_models_population_loss_quantile(world):
    attack = _prepared(world, "enhanced")
    pts = world.pop.ids
    for model in (world.target, world.other_target):
        views = ModelViews(model, world.pop, pts)
        aux_loss = -log_prob_label(views.aux_logits(PLAIN), world.pop.aux.labels)
        threshold = np.quantile(aux_loss, 0.1, method="lower")
        assert attack.threshold(views) == threshold
        loss = -log_prob_label(views.logits(PLAIN), world.pop.labels)
        scores = attack.score(model, pts)
        np.testing.assert_allclose(scores, threshold - loss, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(attack.predict(scores, pts), loss <= threshold)  # the reference's rule
        # on the population data itself the rule flags (about) alpha of the points: the FPR it is set for
        assert np.mean(aux_loss <= threshold) == pytest.approx(0.1, abs=1.0 / len(aux_loss))
    # computed per model under test: the two targets get their own thresholds
    t1 = attack.threshold(ModelViews(world.target, world.pop, pts[:1]))
    t2 = attack.threshold(ModelViews(world.other_target, world.pop, pts[:1]))
    assert t1 != t2


# ---- Xent: balanced per-label threshold (inspire-group membership-inference-evaluation) --------------------------

def _thre_setting(tr_values, te_values):
    """inspire-group's `_thre_setting`, transcribed: the first value (ascending) of best 0.5 * (TPR + TNR)."""
    value_list = np.concatenate((tr_values, te_values))
    thre, max_acc = 0, 0
    for value in value_list:
        tr_ratio = np.sum(tr_values >= value) / (len(tr_values) + 0.0)
        te_ratio = np.sum(te_values < value) / (len(te_values) + 0.0)
        acc = 0.5 * (tr_ratio + te_ratio)
        if acc > max_acc:
            thre, max_acc = value, acc
    return thre


def _one_shadow(pop: Population, logits: np.ndarray, in_row: np.ndarray) -> ShadowSet:
    """A hand-made one-shadow set: its logits given (plain and mirrored alike), no trained model behind it."""
    return ShadowSet(pop, "logreg", in_row[None], [{}], {PLAIN: logits[None], MIRROR: logits[None]})


def test_xent_threshold_is_the_balanced_one_per_label():
    # class 0: members' label logits {3, 1}, non-members' {2, 2, 0 x 6}: plain accuracy would pick 3 (0.9),
    # the balanced criterion picks 1 (0.875 vs 0.75). Class 1 (six points) is separable at a=1.
    a = np.array([3, 1, 2, 2, 0, 0, 0, 0, 0, 0, 1, 1, 1, -1, -1, -1], dtype=np.float64)
    labels = np.array([0] * 10 + [1] * 6, dtype=np.int64)
    member = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0], dtype=bool)
    logits = np.zeros((16, 10))
    logits[np.arange(16), labels] = a
    pop = Population(ImageArrays(np.zeros((16, 1, 4, 4), np.uint8), labels), (0.5,), (0.25,), flip=True)
    attack = build_attack("xent")
    attack.prepare(pop, _one_shadow(pop, logits, member))
    signal = log_prob_label(logits, labels)
    for c in (0, 1):
        sel = labels == c
        expected = _thre_setting(signal[sel & member], signal[sel & ~member])
        assert attack.thresholds[c] == expected
    assert attack.thresholds[0] == signal[1]  # a = 1, not a = 3
    plain = build_attack("xent", balanced=False)
    plain.prepare(pop, _one_shadow(pop, logits, member))
    assert plain.thresholds[0] == signal[0]  # plain accuracy would have chosen a = 3
    assert build_attack("mentr").balanced  # MEntr: the same criterion


# ---- MIDA: moments of the augmented copies' losses, a classifier fitted on shadows only --------------------------

def test_moment_features_are_power_means():
    losses = np.array([[1.0, 2.0, 4.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
    f = moment_features(losses)
    assert f.shape == (3, 20)
    for k in (1, 2, 7, 20):
        assert f[0, k - 1] == pytest.approx(np.mean(losses[0] ** k) ** (1 / k), rel=1e-12)
    assert np.all(f[1] == 0) and np.allclose(f[2], 3.0)
    assert np.all(np.diff(f[0]) > 0)  # power means grow with the order towards the max
    assert np.all(np.isfinite(moment_features(np.array([[800.0, 1.0]]))))  # 800^20 would overflow float64


def test_mida_reads_flips_and_shifts():
    q = mida_queries(1)
    assert len(q) == 18 and len(set(q)) == 18
    assert {x.flip for x in q} == {False, True} and {(x.dy, x.dx) for x in q} == {(a, b) for a in (-1, 0, 1)
                                                                                   for b in (-1, 0, 1)}
    assert len(mida_queries(0)) == 2 and build_attack("mida", shift=0).queries == mida_queries(0)


def test_mida_classifier_sees_only_the_shadows_members(world, monkeypatch):
    """The classifier's training and selection labels are the shadows' own IN/OUT masks and its features come
    from shadow logits: no target model exists at prepare, and the target's members are never labelled."""
    seen = {}
    real_fit = mida_module.fit_classifier

    def spy(x_fit, y_fit, x_sel, y_sel, seed):
        seen.update(x_fit=x_fit, y_fit=y_fit, x_sel=x_sel, y_sel=y_sel)
        return real_fit(x_fit, y_fit, x_sel, y_sel, seed)

    monkeypatch.setattr(mida_module, "fit_classifier", spy)
    attack = _prepared(world, "mida", shift=0)
    sh, n = world.shadows, len(world.pop)
    n_sel = max(1, sh.k // 4)
    np.testing.assert_array_equal(seen["y_fit"], sh.in_mask[:sh.k - n_sel].reshape(-1))
    np.testing.assert_array_equal(seen["y_sel"], sh.in_mask[sh.k - n_sel:].reshape(-1))
    x, member = attack.training_set(world.pop, sh)
    np.testing.assert_array_equal(member, sh.in_mask.reshape(-1))
    k = 2  # shadow k's block of features is computed from shadow k's cached logits of every copy
    logits = np.stack([sh.logits(k, q) for q in attack.queries], axis=1)
    np.testing.assert_array_equal(x[k * n:(k + 1) * n], attack.features(logits, world.pop.labels))
    np.testing.assert_array_equal(seen["x_fit"], x[:(sh.k - n_sel) * n])
    # the target's membership is not an input anywhere: the same shadows give the same classifier for either target
    again = _prepared(world, "mida", shift=0)
    np.testing.assert_array_equal(again.classifier.w1, attack.classifier.w1)
    # and it separates the overfit targets' members from their non-members
    from rayforge.attacks.metrics import auc

    assert auc(attack.score(world.target, world.pop.ids), world.members) > 0.6


def test_mida_refuses_a_population_without_flips(world):
    pop = Population(world.pop.images, world.pop.mean, world.pop.std, flip=False)
    with pytest.raises(RayforgeError, match="flips"):
        build_attack("mida").prepare(pop, ShadowSet(pop, "logreg", world.shadows.in_mask, world.shadows.states))
    with pytest.raises(RayforgeError, match="shift"):
        build_attack("mida", shift=-1)


def test_mida_logit_matches_a_hand_forward_pass():
    rng = np.random.default_rng(0)
    w = mida_module.MLPWeights(*(rng.normal(size=s) for s in [(20, 20), (20,), (20, 20), (20,), (20, 1), (1,)]))
    x = rng.normal(size=(3, 20))
    h = np.tanh(np.tanh(x @ w.w1 + w.b1) @ w.w2 + w.b2)
    np.testing.assert_allclose(w.logit(x), (h @ w.w3)[:, 0] + w.b3[0])
    assert math.isfinite(float(w.logit(x)[0]))
