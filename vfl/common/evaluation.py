"""Model quality on labelled rows, in numpy: AUC and the KS statistic. A
uses them on a job's holdout rows (JobStatus, ModelInfo); the report shows
the same figures. tests/test_report.py checks both against scikit-learn."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def check_scored(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels as 0/1 floats and finite scores of the same length, both classes present."""
    y = np.asarray(y, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if y.shape != scores.shape or y.ndim != 1:
        raise ValueError(f"labels and scores: expected two vectors of one length, got {y.shape} and {scores.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels: expected only 0 and 1")
    if y.min() == y.max():
        raise ValueError(f"labels: expected both classes, all {len(y)} rows are {y[0]:g}")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores: {int((~np.isfinite(scores)).sum())} are not finite")
    return y, scores


def ks_curve(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, TPR, FPR) with one point per distinct score:
    the share of each class scored at or above the threshold."""
    y, scores = check_scored(y, scores)
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last row of each group of equal scores
    tp, fp = np.cumsum(t)[last], np.cumsum(1.0 - t)[last]
    return s[last], tp / tp[-1], fp / fp[-1]


def ks_statistic(y: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The KS statistic max |F_1 - F_0| over thresholds (= max TPR - FPR
    for a model that ranks positives higher), and the threshold reaching it."""
    thresholds, tpr, fpr = ks_curve(y, scores)
    gap = np.abs(tpr - fpr)
    k = int(np.argmax(gap))
    return float(gap[k]), float(thresholds[k])


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney: the chance a positive outranks a negative, ties counting half."""
    y, scores = check_scored(y, scores)
    ranks = rankdata(scores)  # ties take their average rank
    n1 = y.sum()
    n0 = len(y) - n1
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auc_and_ks(y: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    return roc_auc(y, scores), ks_statistic(y, scores)[0]
