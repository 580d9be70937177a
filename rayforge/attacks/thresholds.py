"""Exact threshold search: the best of all candidate thresholds, vectorised.

The candidates are the sorted unique scores plus +inf: `score >= s_j` realises every split of the sorted scores
except "nobody is a member", which +inf adds (the best rule for a class whose members score *lower*).

Convention everywhere: higher score = more likely member, and a point is predicted a member iff score >= threshold.
"""

from __future__ import annotations

import numpy as np


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    if scores.shape != labels.shape or scores.size == 0:
        raise ValueError(f"need equally many scores and labels (>= 1), got {scores.size} and {labels.size}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("threshold search needs finite scores")
    return scores, labels


def threshold_accuracies(scores: np.ndarray, labels: np.ndarray, balanced: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate threshold (ascending unique scores, then +inf) and the accuracy of `score >= t` at each.

    balanced=True gives (TPR + TNR) / 2, the criterion of the inspire-group reference code; False gives plain
    accuracy (TP + TN) / total. A class with no examples contributes rate 0 to the balanced criterion.
    """
    scores, labels = _check(scores, labels)
    candidates = np.r_[np.unique(scores), np.inf]
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    # searchsorted(left) counts the entries below t, so "len - that" counts score >= t: one pass for all t.
    tp = len(pos) - np.searchsorted(pos, candidates, side="left")
    tn = np.searchsorted(neg, candidates, side="left")
    if balanced:
        tpr = tp / len(pos) if len(pos) else np.zeros(len(candidates))
        tnr = tn / len(neg) if len(neg) else np.zeros(len(candidates))
        acc = 0.5 * (tpr + tnr)
    else:
        acc = (tp + tn) / len(scores)
    return candidates, acc


def best_threshold(scores: np.ndarray, labels: np.ndarray, balanced: bool = False) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of `score >= threshold`; ties go to the lowest threshold
    (the first maximum in ascending order, as the reference's strict `>` update does)."""
    candidates, acc = threshold_accuracies(scores, labels, balanced)
    i = int(np.argmax(acc))
    return float(candidates[i]), float(acc[i])


def per_label_thresholds(scores: np.ndarray, labels: np.ndarray, classes: np.ndarray, num_classes: int,
                         balanced: bool = False) -> tuple[np.ndarray, float]:
    """One threshold per class label (label-specific thresholds), plus the global one.

    A class without both members and non-members among the calibration points has no meaningful threshold of its
    own and gets the global threshold instead (documented fallback; the reference would crash or pick an extreme).
    """
    scores, labels = _check(scores, labels)
    classes = np.asarray(classes).ravel()
    global_t, _ = best_threshold(scores, labels, balanced)
    out = np.full(num_classes, global_t, dtype=np.float64)
    for c in range(num_classes):
        sel = classes == c
        if labels[sel].any() and (~labels[sel]).any():
            out[c], _ = best_threshold(scores[sel], labels[sel], balanced)
    return out, global_t
