"""Signals and statistics by hand: phi, MEntr, Gaussian scores, LiRA's fit, and the exact threshold search."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rayforge.attacks.lira import GaussianFit, fit_gaussians, lira_score
from rayforge.attacks.signals import gaussian_cdf, gaussian_log_sf, gaussian_logpdf, log_complement, \
    log_prob_label, logit_confidence, modified_entropy
from rayforge.attacks.thresholds import best_threshold, per_label_thresholds, threshold_accuracies

PROBS = np.array([[0.7, 0.2, 0.1]])
LOGITS = np.log(PROBS) + 3.0  # any shift: softmax-invariant


def test_phi_is_logit_of_label_probability():
    assert logit_confidence(LOGITS, np.array([0]))[0] == pytest.approx(math.log(0.7) - math.log(0.3))
    assert logit_confidence(LOGITS, np.array([2]))[0] == pytest.approx(math.log(0.1) - math.log(0.9))
    assert log_prob_label(LOGITS, np.array([1]))[0] == pytest.approx(math.log(0.2))


def test_signals_are_finite_for_extreme_logits():
    z = np.array([[1000.0, -1000.0, 0.0, 0.0], [-1000.0, 1000.0, 1000.0, -1000.0], [0.0, 0.0, 0.0, 1000.0]])
    for y in range(4):
        labels = np.full(3, y)
        for fn in (logit_confidence, log_prob_label, modified_entropy):
            assert np.all(np.isfinite(fn(z, labels))), (fn.__name__, y)
    # the values themselves are the exact limits, not clipped
    phi = logit_confidence(z, np.array([0, 0, 3]))
    assert phi[0] == pytest.approx(1000.0 - math.log(2))
    assert phi[1] == pytest.approx(-1000.0 - (1000.0 + math.log(2)))
    assert phi[2] == pytest.approx(1000.0 - math.log(3))
    assert np.all(np.isfinite(log_complement(z)))
    assert log_complement(z)[0, 0] == pytest.approx(-1000.0 + math.log(2), rel=1e-9)  # 1-p_0 = 2e^-1000 (+tiny)


def test_modified_entropy_hand_computed():
    # y=0: -(1-.7) ln .7 - .2 ln(1-.2) - .1 ln(1-.1)
    expect0 = -(0.3) * math.log(0.7) - 0.2 * math.log(0.8) - 0.1 * math.log(0.9)
    # y=1: -(1-.2) ln .2 - .7 ln(1-.7) - .1 ln(1-.1)
    expect1 = -(0.8) * math.log(0.2) - 0.7 * math.log(0.3) - 0.1 * math.log(0.9)
    got = modified_entropy(np.repeat(LOGITS, 2, axis=0), np.array([0, 1]))
    np.testing.assert_allclose(got, [expect0, expect1], rtol=1e-12)
    assert expect0 == pytest.approx(0.1621673, abs=1e-7)
    # a confidently wrong prediction has high Mentr, a confidently right one ~0
    z = np.array([[50.0, 0.0, 0.0]])
    assert modified_entropy(z, np.array([0]))[0] == pytest.approx(0.0, abs=1e-15)
    assert modified_entropy(z, np.array([1]))[0] > 40


def test_gaussian_functions_hand_computed():
    c = 0.5 * math.log(2 * math.pi)
    assert gaussian_logpdf(1.0, 2.0, 1.0) == pytest.approx(-0.5 - c)
    assert gaussian_logpdf(1.0, 0.0, 2.0) == pytest.approx(-0.125 - math.log(2) - c)
    assert gaussian_log_sf(0.0, 0.0, 1.0) == pytest.approx(math.log(0.5))
    assert gaussian_log_sf(1.959963984540054, 0.0, 1.0) == pytest.approx(math.log(0.025), rel=1e-9)
    assert gaussian_log_sf(3.0 + 2 * 1.0, 3.0, 2.0) == pytest.approx(math.log(0.5 * math.erfc(1 / math.sqrt(2))))
    assert np.isfinite(gaussian_log_sf(1e4, 0.0, 1.0))  # deep tail: log-space, no log(0)
    assert gaussian_cdf(1.0, 1.0, 3.0) == pytest.approx(0.5)


def test_lira_online_and_offline_scores_hand_computed():
    # two queries; the same Gaussians for both: IN N(2, 1), OUT N(0, 2)
    fit = GaussianFit(mu_out=np.array([[0.0, 0.0]]), sd_out=np.array([[2.0, 2.0]]),
                      mu_in=np.array([[2.0, 2.0]]), sd_in=np.array([[1.0, 1.0]]))
    phi = np.array([[1.0, 0.0]])
    # query 1: [-(1-2)^2/2 - ln 1] - [-(1-0)^2/8 - ln 2] = -0.5 + 0.125 + ln 2
    # query 2: [-(0-2)^2/2] - [-0 - ln 2] = -2 + ln 2;  the score averages the two
    q1, q2 = -0.5 + 0.125 + math.log(2), -2.0 + math.log(2)
    assert lira_score(phi, fit, online=True)[0] == pytest.approx((q1 + q2) / 2)
    # offline: -log P[Z > phi], Z ~ N(0, 2): phi=0 -> ln 2; phi=1 -> -log(erfc(0.5/sqrt2)/2)
    off1 = -math.log(0.5 * math.erfc(0.5 / math.sqrt(2)))
    assert lira_score(phi, fit, online=False)[0] == pytest.approx((off1 + math.log(2)) / 2)
    # monotone: more confident -> higher offline score
    assert lira_score(np.array([[3.0, 3.0]]), fit, False)[0] > lira_score(phi, fit, False)[0]


def test_lira_fit_median_and_std():
    phi = np.array([1.0, 3.0, 10.0, 20.0]).reshape(4, 1, 1)  # (K, N, Q)
    in_mask = np.array([True, True, False, False]).reshape(4, 1)
    fit = fit_gaussians(phi, in_mask, online=True, global_variance=False)
    assert (fit.mu_in[0, 0], fit.sd_in[0, 0], fit.mu_out[0, 0], fit.sd_out[0, 0]) == (2.0, 1.0, 15.0, 5.0)
    # global variance: residuals of two points pooled; point 2 spreads by 3 around its own mean
    phi2 = np.concatenate([phi, np.array([0.0, 6.0, 0.0, 0.0]).reshape(4, 1, 1)], axis=1)
    mask2 = np.repeat(in_mask, 2, axis=1)
    g = fit_gaussians(phi2, mask2, online=True, global_variance=True)
    np.testing.assert_allclose(g.sd_in[:, 0], [math.sqrt((1 + 1 + 9 + 9) / 4)] * 2)
    np.testing.assert_allclose(g.mu_in[:, 0], [2.0, 3.0])


def test_best_threshold_plain_vs_balanced_and_ties():
    # the member has the lowest score: t=1 (all members) gives acc 1/3, balanced .5; t=2: 0, .0; t=3: 1/3, .25;
    # t=+inf (nobody) gives acc 2/3, balanced .5
    scores, labels = np.array([1.0, 2.0, 3.0]), np.array([True, False, False])
    assert best_threshold(scores, labels, balanced=False) == (np.inf, pytest.approx(2 / 3))
    assert best_threshold(scores, labels, balanced=True) == (1.0, 0.5)  # tie -> lowest threshold
    assert best_threshold(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0, 0, 1, 1], bool)) == (3.0, 1.0)


def test_threshold_search_matches_brute_force():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=300), 1)
    labels = rng.random(300) < 0.3 + 0.4 * (scores > 0)
    cands, accs = threshold_accuracies(scores, labels, balanced=False)
    cands_b, accs_b = threshold_accuracies(scores, labels, balanced=True)
    for t, a, ab in zip(cands, accs, accs_b):
        pred = scores >= t
        assert a == pytest.approx(np.mean(pred == labels))
        assert ab == pytest.approx(0.5 * (pred[labels].mean() + (~pred[~labels]).mean()))
    assert np.array_equal(cands, np.r_[np.unique(scores), np.inf]) and np.array_equal(cands, cands_b)


def test_per_label_thresholds_fall_back_to_global():
    scores = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 5.0])
    members = np.array([False, True, False, True, True, False, True])
    classes = np.array([0, 0, 1, 1, 2, 2, 3])
    per, glob = per_label_thresholds(scores, members, classes, num_classes=5)
    assert per[0] == 2.0 and per[1] == 4.0 and per[2] == 10.0
    assert per[3] == glob and per[4] == glob  # class 3 has only a member, class 4 nothing
