"""The paper's evaluation metrics (Section IV-A, Table IV) and standard attack-quality measures.

c_A^U   prediction_difference: % of evaluated points i with some z in U_i that the attack labels differently under
        the original and the forged model (U_i = {x_i} for Diff, 5 common / 5 validation points otherwise).
s_A     score_difference: |score under the forged model - score under the original|, per point.
l1      uniformity_l1: distance between the sample frequencies in a log's mini-batches and the uniform distribution.
ROC/AUC/TPR@FPR for judging the attacks themselves (convention: higher score = member).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def _as_2d_bool(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != bool:
        raise ValueError(f"{name} must be boolean predictions, got {a.dtype}")
    return a[:, None] if a.ndim == 1 else a


def prediction_difference(pred_original: np.ndarray, pred_forged: np.ndarray) -> float:
    """c_A^U in percent: share of rows i (evaluated points, one forged model each) whose U_i predictions (a row of
    the (P, U) arrays) differ for at least one z. A (P,) array is read as U_i = one point."""
    a, b = _as_2d_bool(pred_original, "pred_original"), _as_2d_bool(pred_forged, "pred_forged")
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"prediction arrays must have the same (P >= 1, U) shape, got {a.shape} and {b.shape}")
    return 100.0 * float(np.mean(np.any(a != b, axis=1)))


def score_difference(score_forged: np.ndarray, score_original: np.ndarray) -> np.ndarray:
    """s_A = |A.score(x, forged) - A.score(x, original)|, elementwise (float64)."""
    f, o = np.asarray(score_forged, dtype=np.float64), np.asarray(score_original, dtype=np.float64)
    if f.shape != o.shape:
        raise ValueError(f"score arrays differ in shape: {f.shape} vs {o.shape}")
    return np.abs(f - o)


def sample_frequencies(batches: Iterable[np.ndarray], n: int) -> np.ndarray:
    """How often each of the n points occurs in the batches, divided by the total number of occurrences."""
    parts = [np.asarray(b).ravel() for b in batches]
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if ids.size == 0:
        raise ValueError("no samples in the batches")
    if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= n:
        raise ValueError(f"batch entries must be integer point ids in 0..{n - 1}")
    counts = np.bincount(ids.astype(np.int64), minlength=n)
    return counts / counts.sum()


def uniformity_l1(batches: Sequence[np.ndarray], n: int) -> float:
    """Table IV: sum over the n points of |frequency - 1/n| (0 = perfectly uniform, at most 2 - 2/n)."""
    return float(np.sum(np.abs(sample_frequencies(batches, n) - 1.0 / n)))


def mean_stderr(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std with ddof=1 over sqrt(n)); stderr is nan for one value."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_stderr of no values")
    if v.size == 1:
        return float(v[0]), math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


# ---- attack quality -----------------------------------------------------------------------------------------------

def _scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if not y.any() or y.all():
        raise ValueError("ROC needs at least one member and one non-member")
    if np.isnan(s).any():
        raise ValueError("scores contain nan")
    return s, y


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for `score >= threshold` over all distinct thresholds, descending, starting at
    (0, 0) with threshold +inf (sklearn's roc_curve without dropping collinear points)."""
    s, y = _scores_labels(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_value = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # ties enter the curve together
    tp = np.cumsum(y)[last_of_value]
    fp = np.cumsum(~y)[last_of_value]
    tpr = np.r_[0.0, tp / y.sum()]
    fpr = np.r_[0.0, fp / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[last_of_value]]


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney) statistic, ties counted as 1/2."""
    s, y = _scores_labels(scores, labels)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # Average rank (1-based) of each distinct value: its block of tied positions averaged.
    upper = np.cumsum(counts)
    avg_rank = upper - (counts - 1) / 2.0
    ranks = avg_rank[inverse]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float = 0.001) -> float:
    """The highest TPR over thresholds whose FPR is <= `fpr` (0 when even the strictest one exceeds it)."""
    f, t, _ = roc(scores, labels)
    return float(t[f <= fpr].max())
