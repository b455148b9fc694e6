"""Model quality on labelled rows, in numpy: AUC, the KS statistic, lift,
gain, calibration. A uses AUC and KS on a job's holdout rows (JobStatus,
ModelInfo); the report (vfl/cli/report.py) draws the rest.
tests/test_report.py compares them to scikit-learn and scipy.

Conventions: a row is predicted positive when its score is >= the threshold;
TPR(t) = P(score >= t | y = 1) and FPR(t) = P(score >= t | y = 0), taken at
each distinct score (equal scores are one threshold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def validate(y: object, scores: object) -> tuple[np.ndarray, np.ndarray]:
    """y as 0/1 int64 and scores as float64, or ValueError naming what is wrong."""
    y_arr = np.asarray(y)
    s_arr = np.asarray(scores)
    if y_arr.ndim != 1 or s_arr.ndim != 1:
        raise ValueError(f"y and scores must be 1-D (got shapes {y_arr.shape} and {s_arr.shape})")
    if len(y_arr) != len(s_arr):
        raise ValueError(f"y and scores differ in length ({len(y_arr)} labels, {len(s_arr)} scores)")
    if len(y_arr) == 0:
        raise ValueError("no rows: y and scores are empty")
    try:
        y_float = y_arr.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"y must hold only 0 and 1 (got dtype {y_arr.dtype})") from None
    bad_y = ~np.isin(y_float, (0.0, 1.0))
    if bad_y.any():
        first = int(np.flatnonzero(bad_y)[0])
        raise ValueError(
            f"y must hold only 0 and 1 ({int(bad_y.sum())} other value(s), first {y_arr[first]!r} at row {first})"
        )
    y_int = y_float.astype(np.int64)
    positives = int(y_int.sum())
    if positives in (0, len(y_int)):
        raise ValueError(f"y has only one class (all {y_int[0]}, {len(y_int)} rows): ROC, KS and AUC need both 0 and 1")
    try:
        s_float = s_arr.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"scores must be numbers (got dtype {s_arr.dtype})") from None
    bad_s = ~np.isfinite(s_float)
    if bad_s.any():
        rows = ", ".join(str(int(i)) for i in np.flatnonzero(bad_s)[:5])
        raise ValueError(f"scores must be finite ({int(bad_s.sum())} NaN or infinite, at row(s) {rows})")
    return y_int, s_float


def grouped_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores descending, and the positives and negatives scoring >= each (cumulative)."""
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # The last row of each run of equal scores: thresholds are the distinct scores.
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tps = np.cumsum(y_sorted)[ends].astype(np.float64)
    fps = (ends + 1).astype(np.float64) - tps
    return s_sorted[ends], tps, fps


def ks_curve(y: object, scores: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, tpr, fpr): the distinct scores, descending, and at each
    TPR = P(score >= t | y = 1) and FPR = P(score >= t | y = 0). The last
    threshold is the lowest score (tpr = fpr = 1)."""
    y_int, s = validate(y, scores)
    thresholds, tps, fps = grouped_counts(y_int, s)
    return thresholds, tps / tps[-1], fps / fps[-1]


def ks_statistic(y: object, scores: object) -> tuple[float, float]:
    """(KS, threshold): max over thresholds of TPR - FPR, the largest gap between
    the two classes' cumulative score distributions, and the score threshold
    (predict 1 at score >= t) where it is first reached from the top. This is the
    gap in the direction "positives score higher", the one a usable model has;
    it equals the two-sided max |F1 - F0| whenever that is the larger direction."""
    thresholds, tpr, fpr = ks_curve(y, scores)
    gap = tpr - fpr
    best = int(np.argmax(gap))
    return float(gap[best]), float(thresholds[best])


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """Ranks 1..n of s, equal values sharing the average of their ranks."""
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based start of each group in sorted order
    group_rank = first + (counts + 1) / 2.0
    return np.asarray(group_rank[inverse], dtype=np.float64)


def roc_auc(y: object, scores: object) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U / (n1 n0)), ties averaged."""
    y_int, s = validate(y, scores)
    ranks = _average_ranks(s)
    n1 = float(y_int.sum())
    n0 = float(len(y_int)) - n1
    return float((ranks[y_int == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def roc_curve_points(y: object, scores: object) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from (0, 0) to (1, 1), one point per distinct score."""
    _, tpr, fpr = ks_curve(y, scores)
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


def cumulative_gain(y: object, scores: object, fractions: object) -> np.ndarray:
    """Share of all positives among the top `fractions` of rows by score (each in [0, 1]).
    A run of equal scores straddling a cut counts pro rata (the expected value when
    the tie is broken at random), so the result does not depend on row order."""
    y_int, s = validate(y, scores)
    q = np.asarray(fractions, dtype=np.float64)
    if q.size and (not np.isfinite(q).all() or q.min() < 0.0 or q.max() > 1.0):
        raise ValueError("fractions must be in [0, 1]")
    _, tps, fps = grouped_counts(y_int, s)
    rows = np.r_[0.0, tps + fps]
    captured = np.r_[0.0, tps]
    return np.asarray(np.interp(q * len(y_int), rows, captured) / tps[-1], dtype=np.float64)


@dataclass(frozen=True)
class LiftTable:
    """By population band (deciles by default), best-scored first."""

    fraction: np.ndarray  # cumulative share of rows at the band's end: 0.1, 0.2, ..., 1.0
    gain: np.ndarray  # cumulative share of positives captured (ends at 1.0)
    cumulative_lift: np.ndarray  # gain / fraction: the top rows' positive rate over the base rate
    band_lift: np.ndarray  # the band's own positive rate over the base rate
    base_rate: float


def lift_table(y: object, scores: object, bands: int = 10) -> LiftTable:
    """Lift and cumulative gain by equal population bands (deciles for bands=10)."""
    if bands < 1:
        raise ValueError(f"bands must be at least 1 (got {bands})")
    y_int, s = validate(y, scores)
    fraction = np.arange(1, bands + 1, dtype=np.float64) / bands
    gain = cumulative_gain(y_int, s, fraction)
    band_gain = np.diff(np.r_[0.0, gain])
    return LiftTable(
        fraction=fraction,
        gain=gain,
        cumulative_lift=gain / fraction,
        band_lift=band_gain * bands,
        base_rate=float(y_int.mean()),
    )


@dataclass(frozen=True)
class CalibrationBins:
    """Equal-width score bins on [0, 1]; mean_predicted and observed_rate are NaN in empty bins."""

    edges: np.ndarray  # bins + 1 edges, 0.0 ... 1.0
    count: np.ndarray
    mean_predicted: np.ndarray
    observed_rate: np.ndarray


def calibration_bins(y: object, scores: object, bins: int = 10) -> CalibrationBins:
    """Reliability: per score bin, the mean predicted probability and the observed rate of y = 1.
    Bins are [k/bins, (k+1)/bins), the last one closed; scores must be probabilities."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1 (got {bins})")
    y_int, s = validate(y, scores)
    if s.min() < 0.0 or s.max() > 1.0:
        raise ValueError(f"scores must be probabilities in [0, 1] for calibration (range {s.min():g} to {s.max():g})")
    index = np.minimum((s * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins)
    sum_pred = np.bincount(index, weights=s, minlength=bins)
    sum_pos = np.bincount(index, weights=y_int.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.where(count > 0, sum_pred / count, np.nan)
        observed_rate = np.where(count > 0, sum_pos / count, np.nan)
    return CalibrationBins(np.linspace(0.0, 1.0, bins + 1), count, mean_predicted, observed_rate)


def confusion_matrix(y: object, scores: object, threshold: float = 0.5) -> np.ndarray:
    """[[TN, FP], [FN, TP]] (rows: actual 0, 1; columns: predicted 0, 1), predicting 1 at score >= threshold."""
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite (got {threshold})")
    y_int, s = validate(y, scores)
    pred = (s >= threshold).astype(np.int64)
    return np.asarray(np.bincount(2 * y_int + pred, minlength=4).reshape(2, 2), dtype=np.int64)


def brier_score(y: object, scores: object) -> float:
    """Mean squared difference between the predicted probability and the label."""
    y_int, s = validate(y, scores)
    return float(np.mean((s - y_int) ** 2))


# --- plots ------------------------------------------------------------------------


def auc_and_ks(y: object, scores: object) -> tuple[float, float]:
    return roc_auc(y, scores), ks_statistic(y, scores)[0]
