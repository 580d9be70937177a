"""Section IV-A metrics (c_A, s_A), Table IV uniformity, and ROC/AUC/TPR@FPR on hand-worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rayforge.attacks.metrics import auc, mean_stderr, prediction_difference, roc, sample_frequencies, \
    score_difference, tpr_at_fpr, uniformity_l1


def test_prediction_difference_counts_points_with_any_disagreement():
    original = np.array([[True, False], [True, True], [False, False]])
    forged = np.array([[True, False], [True, False], [True, False]])
    # rows 1 and 2 each disagree on at least one z in U_i; row 0 agrees everywhere -> 2 of 3 points
    assert prediction_difference(original, forged) == pytest.approx(100 * 2 / 3)
    # Diff setting, U_i = {x_i}: a 1-D array per point
    assert prediction_difference(np.array([True, True, False, False]), np.array([False, True, False, True])) == 50.0
    assert prediction_difference(original, original) == 0.0


def test_prediction_difference_rejects_bad_input():
    with pytest.raises(ValueError):
        prediction_difference(np.zeros((2, 3), bool), np.zeros((2, 2), bool))
    with pytest.raises(ValueError):
        prediction_difference(np.zeros((2, 3)), np.zeros((2, 3)))  # scores, not predictions


def test_score_difference_is_absolute():
    np.testing.assert_allclose(score_difference(np.array([1.0, -2.0, 0.5]), np.array([3.0, -2.5, 0.5])),
                               [2.0, 0.5, 0.0])


def test_uniformity_hand_example():
    # n=4, batches [[0,1],[0,2]]: counts 2,1,1,0 of 4 -> freqs .5,.25,.25,0 -> |.25|+0+0+|-.25| = 0.5
    np.testing.assert_allclose(sample_frequencies([np.array([0, 1]), np.array([0, 2])], 4), [0.5, 0.25, 0.25, 0.0])
    assert uniformity_l1([np.array([0, 1]), np.array([0, 2])], 4) == pytest.approx(0.5)
    # one epoch of a true SGD run sees every point once: perfectly uniform
    assert uniformity_l1([np.array([3, 1]), np.array([0, 2])], 4) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        uniformity_l1([np.array([0, 4])], 4)


def test_mean_stderr():
    mean, se = mean_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2.0)
    mean, se = mean_stderr([7.0])
    assert mean == 7.0 and math.isnan(se)


def test_roc_and_tpr_at_fpr_hand_example():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 1, 0, 1, 0], dtype=bool)
    fpr, tpr, thr = roc(scores, labels)
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5])
    assert tpr_at_fpr(scores, labels, 0.0) == pytest.approx(2 / 3)
    assert tpr_at_fpr(scores, labels, 0.001) == pytest.approx(2 / 3)
    assert tpr_at_fpr(scores, labels, 0.5) == 1.0
    # members scored lowest: nothing is caught before the first false positive
    assert tpr_at_fpr(-scores + np.array([0, 0, 5, 0, 0]), labels, 0.0) == 0.0


def test_roc_groups_ties():
    fpr, tpr, _ = roc(np.array([1.0, 1.0, 0.0]), np.array([True, False, False]))
    np.testing.assert_allclose(fpr, [0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1, 1])


def test_auc_hand_examples_and_ties():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == pytest.approx(0.75)
    assert auc(np.array([1.0, 1.0]), np.array([True, False])) == pytest.approx(0.5)
    assert auc(np.array([2.0, 1.0, 1.0, 0.0]), np.array([True, True, False, False])) == pytest.approx(0.875)
    assert auc(np.array([0.0, 1.0]), np.array([True, False])) == 0.0
    with pytest.raises(ValueError):
        auc(np.array([1.0, 2.0]), np.array([True, True]))


def test_auc_matches_pairwise_definition_and_trapezoid():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 200).astype(float)  # many ties
    labels = rng.random(200) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairwise = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert auc(scores, labels) == pytest.approx(pairwise)
    fpr, tpr, _ = roc(scores, labels)
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(pairwise)
