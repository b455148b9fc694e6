"""The model report: a self-contained HTML page with PNG plots (no gRPC here).

The caller (`vfl report`) fills a ReportData from the services' API; this
module computes the metrics (in numpy: tests/test_report.py compares them to
scikit-learn and scipy), draws the plots with matplotlib's Agg backend and
writes out_dir/index.html beside them. render_in_chromium opens the page in
headless Chromium, for a screenshot and for the DOM after onload, which says
how many of the page's plots loaded.

Conventions: a row is predicted positive when its score is >= the threshold;
TPR(t) = P(score >= t | y = 1) and FPR(t) = P(score >= t | y = 0), taken at
each distinct score (equal scores are one threshold).
"""

from __future__ import annotations

import contextlib
import csv
import html
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vfl.common.evaluation import (
    brier_score,
    calibration_bins,
    confusion_matrix,
    cumulative_gain,
    grouped_counts,
    ks_curve,
    ks_statistic,
    lift_table,
    roc_auc,
    roc_curve_points,
    validate,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
FIGSIZE = (6.0, 4.0)
# Colours: the positive class (y = 1) and the negative class (y = 0) keep theirs on every plot.
POS, NEG, ACCENT, GREY = "#c0392b", "#2471a3", "#1e8449", "#7f8c8d"


@dataclass(frozen=True)
class ReportData:
    """Everything the page shows; y and scores are the scored rows (split_name)."""

    model_id: str
    created_unix: float
    config: dict[str, object]
    loss_history: list[tuple[int, float]]  # (iteration, training batch loss)
    validation_losses: list[tuple[int, float]]  # (iteration, validation loss); may be empty
    kept_iteration: int | None
    ids: list[str]
    y: np.ndarray  # 0/1 labels of the scored rows
    scores: np.ndarray  # P(y = 1) per row
    split_name: str
    iterations: int
    train_rows: int
    active_features: int
    passive_features: int
    elapsed_s: float
    phase_seconds: dict[str, float]
    bytes_sent: int
    dp_epsilon_spent: float | None
    dp_delta: float | None
    learned: list[tuple[str, str]] = field(default_factory=list)  # (party, what it learned)
    threshold: float = 0.5


# --- metrics ------------------------------------------------------------------------


@dataclass(frozen=True)
class Plot:
    file: str
    title: str
    alt: str
    caption: str


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11, loc="left", fontweight="bold")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="#e5e5e5", linewidth=0.7)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def _plot_loss(ax: Axes, data: ReportData) -> None:
    _style(ax, "Loss by iteration", "iteration", "log loss")
    if data.loss_history:
        it = np.array([i for i, _ in data.loss_history], dtype=np.float64)
        loss = np.array([v for _, v in data.loss_history], dtype=np.float64)
        window = max(1, len(loss) // 20)
        ax.plot(it, loss, color=NEG, alpha=0.3, linewidth=0.8, label="training batch loss")
        if window > 1:
            ax.plot(it, _moving_average(loss, window), color=NEG, linewidth=1.6, label=f"training, mean of {window}")
    if data.validation_losses:
        vit = [i for i, _ in data.validation_losses]
        vloss = [v for _, v in data.validation_losses]
        ax.plot(vit, vloss, color=POS, marker="o", markersize=3, linewidth=1.4, label="validation loss")
    if data.kept_iteration is not None:
        ax.axvline(data.kept_iteration, color=ACCENT, linestyle="--", linewidth=1.2)
        ax.annotate(
            f"kept: iteration {data.kept_iteration}",
            xy=(data.kept_iteration, 0.55),
            xycoords=("data", "axes fraction"),
            xytext=(4, 0),
            textcoords="offset points",
            fontsize=8,
            color=ACCENT,
        )
    if not data.loss_history and not data.validation_losses:
        ax.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax.transAxes, color=GREY)
    else:
        ax.legend(fontsize=8, frameon=False, loc="upper right")


def _plot_roc(ax: Axes, y: np.ndarray, s: np.ndarray) -> None:
    fpr, tpr = roc_curve_points(y, s)
    _style(ax, "ROC curve", "false positive rate", "true positive rate")
    ax.plot([0, 1], [0, 1], color=GREY, linestyle=":", linewidth=1, label="random (AUC = 0.500)")
    ax.plot(fpr, tpr, color=NEG, linewidth=1.8, label=f"model (AUC = {roc_auc(y, s):.3f})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.legend(fontsize=8, frameon=False, loc="lower right")


def _plot_ks(ax: Axes, y: np.ndarray, s: np.ndarray) -> None:
    thresholds, tpr, fpr = ks_curve(y, s)
    ks, at = ks_statistic(y, s)
    _style(ax, "KS: cumulative score distributions", "score threshold t", "share of class scoring below t")
    # Share below t = 1 - share at or above t; thresholds ascending, each step holds up to its threshold.
    x = np.r_[thresholds[::-1], max(1.0, float(thresholds[0]))]
    below_pos = np.r_[1.0 - tpr[::-1], 1.0]
    below_neg = np.r_[1.0 - fpr[::-1], 1.0]
    x0 = min(0.0, float(thresholds[-1]))
    ax.plot(np.r_[x0, x], np.r_[0.0, below_neg], drawstyle="steps-pre", color=NEG, linewidth=1.6, label="y = 0")
    ax.plot(np.r_[x0, x], np.r_[0.0, below_pos], drawstyle="steps-pre", color=POS, linewidth=1.6, label="y = 1")
    best = int(np.argmax(tpr - fpr))
    lo, hi = 1.0 - tpr[best], 1.0 - fpr[best]
    ax.vlines(at, lo, hi, color=ACCENT, linewidth=2.2)
    ax.annotate(
        f"KS = {ks:.3f}\nat t = {at:.3f}",
        xy=(at, (lo + hi) / 2),
        xytext=(10, 0),
        textcoords="offset points",
        va="center",
        fontsize=9,
        color=ACCENT,
        fontweight="bold",
    )
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, frameon=False, loc="lower right")


def _plot_rates(ax: Axes, y: np.ndarray, s: np.ndarray, threshold: float) -> None:
    y_int, scores = validate(y, s)
    thresholds, tps, fps = grouped_counts(y_int, scores)
    n1, n0 = tps[-1], fps[-1]
    # Ascending thresholds; the rate at t holds for every cut between the next lower score and t.
    x = thresholds[::-1]
    recall = (tps / n1)[::-1]
    precision = (tps / (tps + fps))[::-1]
    accuracy = ((tps + n0 - fps) / (n1 + n0))[::-1]
    _style(ax, "Rates by threshold", "threshold t (predict 1 at score >= t)", "rate")
    for values, colour, name in (
        (recall, POS, "recall (true positive rate)"),
        (precision, NEG, "precision"),
        (accuracy, ACCENT, "accuracy"),
    ):
        ax.plot(x, values, drawstyle="steps-pre", color=colour, linewidth=1.5, label=name)
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlim(min(0.0, float(x[0])), max(1.0, float(x[-1])))
    ax.set_ylim(0, 1.04)
    ax.legend(fontsize=8, frameon=False, loc="lower left")


def _plot_lift(ax: Axes, y: np.ndarray, s: np.ndarray) -> None:
    table = lift_table(y, s)
    _style(ax, "Lift by decile", "decile of rows by score (1 = highest)", "lift over the base rate")
    deciles = np.arange(1, len(table.fraction) + 1)
    ax.bar(deciles, table.band_lift, color=NEG, alpha=0.75, width=0.7, label="decile lift")
    ax.plot(deciles, table.cumulative_lift, color=POS, marker="o", markersize=4, linewidth=1.6, label="cumulative lift")
    ax.axhline(1.0, color=GREY, linestyle=":", linewidth=1, label=f"random: 1.0 = base rate {table.base_rate:.1%}")
    ax.set_xticks(deciles)
    top = max(float(table.band_lift.max()), float(table.cumulative_lift.max()), 1.0)
    ax.set_ylim(0, top * 1.4)
    ax.legend(fontsize=8, frameon=False, loc="upper right", ncols=2)


def _plot_gain(ax: Axes, y: np.ndarray, s: np.ndarray) -> None:
    q = np.linspace(0.0, 1.0, 201)
    gain = cumulative_gain(y, s, q)
    base = float(np.mean(y))
    table = lift_table(y, s)
    _style(ax, "Cumulative gain", "share of rows, highest scores first", "share of positives captured")
    ax.plot([0, 1], [0, 1], color=GREY, linestyle=":", linewidth=1, label="random")
    ax.plot([0, base, 1], [0, 1, 1], color=GREY, linestyle="--", linewidth=1, label="perfect ranking")
    ax.plot(q, gain, color=NEG, linewidth=1.8, label="model")
    ax.plot(table.fraction, table.gain, "o", color=NEG, markersize=3.5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, frameon=False, loc="lower right")


def _plot_scores(ax: Axes, y: np.ndarray, s: np.ndarray, threshold: float) -> None:
    _style(ax, "Score distribution by class", "score P(y = 1)", "rows")
    lo, hi = min(0.0, float(s.min())), max(1.0, float(s.max()))
    edges = np.linspace(lo, hi, 26).tolist()
    ax.hist(s[y == 0], bins=edges, color=NEG, alpha=0.6, label=f"y = 0 ({int((y == 0).sum())} rows)")
    ax.hist(s[y == 1], bins=edges, color=POS, alpha=0.6, label=f"y = 1 ({int((y == 1).sum())} rows)")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.legend(fontsize=8, frameon=False, loc="upper center")


def _plot_confusion(ax: Axes, y: np.ndarray, s: np.ndarray, threshold: float) -> None:
    cm = confusion_matrix(y, s, threshold)
    vmax = max(1, int(cm.max())) * 1.25
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=vmax)
    ax.set_title(f"Confusion matrix at threshold {threshold:g}", fontsize=11, loc="left", fontweight="bold")
    names = [["true negative", "false positive"], ["false negative", "true positive"]]
    total = int(cm.sum())
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}\n{cm[i, j] / total:.1%}\n{names[i][j]}",
                ha="center",
                va="center",
                fontsize=10,
                color="white" if cm[i, j] > 0.55 * vmax else "black",
            )
    ax.set_xticks([0, 1], ["predicted 0", "predicted 1"], fontsize=9)
    ax.set_yticks([0, 1], ["actual 0", "actual 1"], fontsize=9)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _plot_calibration(ax: Axes, y: np.ndarray, s: np.ndarray) -> None:
    cal = calibration_bins(y, s)
    _style(ax, "Calibration (reliability)", "mean predicted P(y = 1) in bin", "observed rate of y = 1")
    counts = ax.twinx()
    centres = (cal.edges[:-1] + cal.edges[1:]) / 2
    counts.bar(centres, cal.count, width=0.09, color=GREY, alpha=0.18)
    counts.set_ylabel("rows in bin", fontsize=8, color=GREY)
    counts.tick_params(labelsize=7, colors=GREY)
    counts.set_ylim(0, max(1, int(cal.count.max())) * 3)
    for side in ("top",):
        counts.spines[side].set_visible(False)
    ax.set_zorder(counts.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot([0, 1], [0, 1], color=GREY, linestyle=":", linewidth=1, label="perfectly calibrated")
    full = cal.count > 0
    ax.plot(
        cal.mean_predicted[full],
        cal.observed_rate[full],
        color=POS,
        marker="o",
        markersize=5,
        linewidth=1.5,
        label="model (10 bins)",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, frameon=False, loc="upper left")


def _plot_timings(ax: Axes, phases: dict[str, float]) -> None:
    items = sorted(phases.items(), key=lambda kv: kv[1])
    total = sum(v for _, v in items)
    _style(ax, "Time by phase", "seconds", "")
    rows = np.arange(len(items))
    ax.barh(rows, [v for _, v in items], color=NEG, alpha=0.8)
    ax.set_yticks(rows, [k for k, _ in items], fontsize=8)
    for row, (_, v) in zip(rows, items, strict=True):
        share = f"{v / total:.0%}" if total > 0 else ""
        ax.text(v, float(row), f"  {v:.2f} s  {share}", va="center", fontsize=8)
    ax.set_xlim(0, max(v for _, v in items) * 1.3 if total > 0 else 1)
    ax.grid(False, axis="y")


# --- HTML ------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)} min {secs:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes)} min"


def _table(rows: Sequence[tuple[object, ...]], header: tuple[str, ...] | None = None, cls: str = "") -> str:
    out = [f'<table class="{_e(cls)}">' if cls else "<table>"]
    if header:
        out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_e(_fmt(c))}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


CSS = """
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #1f2933;
       font: 14px/1.45 "DejaVu Sans", "Liberation Sans", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 20px 40px; }
header { border-bottom: 3px solid #2471a3; margin-bottom: 16px; padding-bottom: 8px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 26px 0 10px; color: #243b53; }
.sub { color: #52606d; font-size: 13px; }
.check { font-size: 12px; color: #1e8449; margin-top: 4px; }
.check.bad { color: #c0392b; font-weight: bold; }
.cards { display: grid; grid-template-columns: repeat(6, minmax(0, 1fr)); gap: 10px; margin-bottom: 6px; }
.card { background: #fff; border: 1px solid #d9dde3; border-radius: 6px; padding: 8px 12px; }
.card .k { font-size: 11px; color: #52606d; text-transform: uppercase; letter-spacing: 0.04em; }
.card .v { font-size: 20px; font-weight: bold; }
.grid { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 14px; }
.cols { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 14px; align-items: start; }
figure { margin: 0; background: #fff; border: 1px solid #d9dde3; border-radius: 6px; padding: 8px; }
figcaption { font-size: 12px; color: #52606d; padding: 4px 4px 0; }
img.plot { display: block; width: 100%; max-width: 600px; height: auto; margin: 0 auto; }
table { border-collapse: collapse; background: #fff; width: 100%; border: 1px solid #d9dde3; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid #e4e7eb; font-size: 13px; vertical-align: top; }
th { background: #eef1f5; font-weight: 600; }
table.num td:not(:first-child), table.num th:not(:first-child) {
  text-align: right; font-variant-numeric: tabular-nums; }
.note { font-size: 12px; color: #52606d; margin: 6px 0 0; }
footer { margin-top: 28px; font-size: 12px; color: #7b8794; }
"""

SCRIPT = """
window.onload = function () {
  var plots = document.querySelectorAll("img.plot");
  var loaded = 0;
  for (var i = 0; i < plots.length; i++) {
    if (plots[i].complete && plots[i].naturalWidth > 0) { loaded++; }
  }
  document.body.setAttribute("data-plots", String(plots.length));
  document.body.setAttribute("data-plots-loaded", String(loaded));
  document.body.setAttribute("data-page-height", String(document.documentElement.scrollHeight));
  var line = document.getElementById("plot-check");
  line.textContent = loaded + " of " + plots.length + " plots loaded";
  if (loaded < plots.length) { line.className = "check bad"; }
};
"""


def _check_data(data: ReportData) -> tuple[np.ndarray, np.ndarray]:
    y, s = validate(data.y, data.scores)
    if len(data.ids) != len(y):
        raise ValueError(f"ids and y differ in length ({len(data.ids)} ids, {len(y)} labels)")
    if not math.isfinite(data.threshold):
        raise ValueError(f"threshold must be finite (got {data.threshold})")
    return y, s


def _figure() -> tuple[Figure, Axes]:
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the model report draws its plots with matplotlib: pip install matplotlib==3.11.2 (vfl's bench extra)"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    return fig, ax


def _save(fig: Figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)


def _draw(out_dir: Path, plot: Plot, draw: Callable[[Axes], None]) -> Plot:
    fig, ax = _figure()
    try:
        draw(ax)
    except BaseException:
        import matplotlib.pyplot as plt

        plt.close(fig)
        raise
    _save(fig, out_dir / plot.file)
    return plot


def write_report(data: ReportData, out_dir: Path) -> Path:
    """Write out_dir/index.html and its PNG plots (out_dir is created); return the page's path."""
    y, s = _check_data(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = data.threshold

    auc = roc_auc(y, s)
    ks, ks_at = ks_statistic(y, s)
    cm = confusion_matrix(y, s, t)
    accuracy = float(cm[0, 0] + cm[1, 1]) / len(y)
    lift = lift_table(y, s)
    brier = brier_score(y, s)
    in_unit = bool(s.min() >= 0.0 and s.max() <= 1.0)

    plots = [
        _draw(
            out_dir,
            Plot(
                "loss.png",
                "Loss",
                "Training and validation loss by iteration",
                "Training batch loss per iteration (faint) with its moving mean, validation loss, "
                "and the iteration whose weights were kept.",
            ),
            lambda ax: _plot_loss(ax, data),
        ),
        _draw(
            out_dir,
            Plot("roc.png", "ROC", f"ROC curve, AUC {auc:.3f}", f"ROC on the {data.split_name}; AUC {auc:.3f}."),
            lambda ax: _plot_roc(ax, y, s),
        ),
        _draw(
            out_dir,
            Plot(
                "ks.png",
                "KS",
                f"KS curve, KS {ks:.3f}",
                f"Cumulative score distribution of each class; the widest gap (KS {ks:.3f}) "
                f"is at threshold {ks_at:.3f}.",
            ),
            lambda ax: _plot_ks(ax, y, s),
        ),
        _draw(
            out_dir,
            Plot(
                "scores.png",
                "Scores",
                "Score distribution by class",
                f"Histogram of scores for each class; dashed: the decision threshold {t:g}.",
            ),
            lambda ax: _plot_scores(ax, y, s, t),
        ),
        _draw(
            out_dir,
            Plot(
                "lift.png",
                "Lift",
                "Lift by decile",
                f"Positive rate in each score decile, and in the top deciles together, "
                f"over the base rate {lift.base_rate:.1%}.",
            ),
            lambda ax: _plot_lift(ax, y, s),
        ),
        _draw(
            out_dir,
            Plot(
                "gain.png",
                "Gain",
                "Cumulative gain",
                f"Share of positives among the highest-scored rows; top decile captures {lift.gain[0]:.1%}.",
            ),
            lambda ax: _plot_gain(ax, y, s),
        ),
        _draw(
            out_dir,
            Plot(
                "confusion.png",
                "Confusion",
                f"Confusion matrix at threshold {t:g}",
                f"Counts at threshold {t:g} (predict 1 at score >= threshold); accuracy {accuracy:.1%}.",
            ),
            lambda ax: _plot_confusion(ax, y, s, t),
        ),
    ]
    plots.append(
        _draw(
            out_dir,
            Plot(
                "rates.png",
                "Rates",
                "Recall, precision and accuracy by threshold",
                f"Recall, precision and accuracy if the decision threshold moved; dashed: the threshold {t:g}.",
            ),
            lambda ax: _plot_rates(ax, y, s, t),
        )
    )
    if in_unit:
        plots.append(
            _draw(
                out_dir,
                Plot(
                    "calibration.png",
                    "Calibration",
                    "Calibration reliability diagram",
                    f"Observed rate of y = 1 against the mean prediction in 10 equal-width bins "
                    f"(grey bars: rows per bin); Brier score {brier:.4f}.",
                ),
                lambda ax: _plot_calibration(ax, y, s),
            )
        )
    if data.phase_seconds:
        plots.append(
            _draw(
                out_dir,
                Plot(
                    "timings.png",
                    "Timings",
                    "Time by phase",
                    "Seconds spent in each phase, with its share of the timed phases.",
                ),
                lambda ax: _plot_timings(ax, data.phase_seconds),
            )
        )
    by_file = {p.file: p for p in plots}

    # The scored rows beside the page: the figures can be recomputed from them.
    with (out_dir / "scores.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "y", "score"])
        writer.writerows((i, int(label), repr(float(score))) for i, label, score in zip(data.ids, y, s, strict=True))
    page = out_dir / "index.html"
    page.write_text(_page(data, y, s, plots=by_file, auc=auc, ks=ks, ks_at=ks_at, accuracy=accuracy, brier=brier))
    return page


def _figure_html(plot: Plot | None) -> str:
    if plot is None:
        return ""
    return (
        f'<figure><img class="plot" src="{_e(plot.file)}" alt="{_e(plot.alt)}" width="600" height="400">'
        f"<figcaption>{_e(plot.caption)}</figcaption></figure>"
    )


def _grid(plots: dict[str, Plot], *files: str) -> str:
    figures = [_figure_html(plots.get(f)) for f in files]
    return '<div class="grid">' + "".join(f for f in figures if f) + "</div>"


def _page(
    data: ReportData,
    y: np.ndarray,
    s: np.ndarray,
    *,
    plots: dict[str, Plot],
    auc: float,
    ks: float,
    ks_at: float,
    accuracy: float,
    brier: float,
) -> str:
    created = datetime.fromtimestamp(data.created_unix, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
    positives = int(y.sum())
    epsilon = "off" if data.dp_epsilon_spent is None else f"{data.dp_epsilon_spent:.4g}"
    if data.dp_epsilon_spent is not None and data.dp_delta is not None:
        epsilon += f" (δ = {data.dp_delta:.3g})"
    cards = [
        ("AUC", f"{auc:.3f}"),
        ("KS", f"{ks:.3f}"),
        (f"Accuracy at {data.threshold:g}", f"{accuracy:.1%}"),
        ("Rows scored", f"{len(y):,}"),
        ("Iterations", f"{data.iterations:,}"),
        ("Elapsed", _duration(data.elapsed_s)),
    ]
    headline: list[tuple[object, ...]] = [
        ("ROC AUC", f"{auc:.4f}"),
        ("KS statistic", f"{ks:.4f} at score threshold {ks_at:.4f}"),
        (f"Accuracy at threshold {data.threshold:g}", f"{accuracy:.2%}"),
        ("Brier score", f"{brier:.4f}"),
        ("Rows scored", f"{len(y):,} {data.split_name} ({positives:,} with y = 1, {positives / len(y):.1%})"),
        ("Training rows", f"{data.train_rows:,}"),
        (
            "Features",
            f"{data.active_features + data.passive_features} "
            f"({data.active_features} active party, {data.passive_features} passive party)",
        ),
        ("Iterations", f"{data.iterations:,}"),
        ("Kept iteration", "last" if data.kept_iteration is None else f"{data.kept_iteration:,}"),
        ("Elapsed", _duration(data.elapsed_s)),
        ("Differential privacy ε spent", epsilon),
    ]
    phase_total = sum(data.phase_seconds.values())
    timings: list[tuple[object, ...]] = [
        (name, f"{sec:.3f}", f"{sec / phase_total:.1%}" if phase_total > 0 else "–")
        for name, sec in sorted(data.phase_seconds.items(), key=lambda kv: -kv[1])
    ]
    if timings:
        timings.append(("total of the phases", f"{phase_total:.3f}", "100.0%" if phase_total > 0 else "–"))
    per_iteration = f"{_bytes(data.bytes_sent // data.iterations)} per iteration" if data.iterations > 0 else ""
    traffic: list[tuple[object, ...]] = [
        ("Bytes sent", f"{_bytes(data.bytes_sent)} ({data.bytes_sent:,} bytes)"),
        ("Per iteration", per_iteration or "–"),
        ("Differential privacy ε spent", epsilon),
    ]
    config = [(k, data.config[k]) for k in sorted(data.config)]
    learned = list(data.learned)

    # The most confident mistakes at the threshold: where to look first.
    pred = s >= data.threshold
    wrong = np.flatnonzero(pred != (y == 1))
    wrong = wrong[np.argsort(-np.abs(s[wrong] - data.threshold), kind="stable")][:10]
    errors: list[tuple[object, ...]] = [(data.ids[i], int(y[i]), f"{s[i]:.4f}") for i in wrong]

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Model report: {_e(data.model_id)}</title>",
        f"<style>{CSS}</style>",
        f"<script>{SCRIPT}</script>",
        f'</head><body data-auc="{auc!r}" data-ks="{ks!r}"><main>',
        "<header>",
        f"<h1>Model report: {_e(data.model_id)}</h1>",
        f'<div class="sub">Vertical federated logistic regression · created {_e(created)} · '
        f"evaluated on {len(y):,} {_e(data.split_name)}</div>",
        '<div id="plot-check" class="check">plots not checked (the page script did not run)</div>',
        "</header>",
        '<section><div class="cards">'
        + "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div></div>' for k, v in cards)
        + "</div></section>",
        "<section><h2>Headline figures</h2>",
        _table(headline, ("Measure", "Value")),
        "</section>",
        "<section><h2>Discrimination</h2>",
        _grid(plots, "roc.png", "ks.png", "scores.png", "confusion.png"),
        "</section>",
        "<section><h2>Ranking, calibration and the threshold</h2>",
        _grid(plots, "lift.png", "gain.png", "calibration.png", "rates.png"),
        "</section>",
        "<section><h2>Training</h2>",
        _grid(plots, "loss.png", "timings.png"),
        '<div class="cols"><div><h2>Configuration</h2>',
        _table(config, ("Parameter", "Value")) if config else '<p class="note">No configuration recorded.</p>',
        "</div><div><h2>Time by phase</h2>",
        _table(timings, ("Phase", "Seconds", "Share"), cls="num")
        if timings
        else '<p class="note">No phase timings recorded.</p>',
        '<p class="note">Share of the timed phases; phases of different parties may overlap in wall time.</p>',
        "<h2>Communication and privacy</h2>",
        _table(traffic, ("Measure", "Value")),
        "</div></div></section>",
        "<section><h2>What each party learned</h2>",
        _table(learned, ("Party", "What it learned")) if learned else '<p class="note">Not given.</p>',
        "</section>",
        f"<section><h2>Most confident errors at threshold {data.threshold:g}</h2>",
        _table(errors, ("Row id", "Label y", "Score"), cls="num")
        if errors
        else '<p class="note">No errors at this threshold.</p>',
        '<p class="note">Misclassified rows, furthest from the threshold first (at most 10).</p>',
        "</section>",
        f"<footer>Generated by vfl · {_e(len(plots))} plots · model {_e(data.model_id)}</footer>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


# --- headless Chromium ------------------------------------------------------------------------


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise FileNotFoundError(
            "no chromium on PATH: install Debian's chromium (apt-get install chromium) to render the report"
        )
    return found


def _run_chromium(args: list[str], deadline: float, what: str) -> str:
    """Chromium's stdout; it runs in its own session, so a timeout ends its helper processes too."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"chromium {what}: no time left")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        try:
            returncode = proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            err.seek(0)
            tail = _tail(err.read().decode(errors="replace"))
            raise TimeoutError(f"chromium {what} timed out after {remaining:.0f} s; stderr tail:\n{tail}") from None
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if returncode != 0:
        raise RuntimeError(f"chromium {what} exited with code {returncode}; stderr tail:\n{_tail(stderr)}")
    return stdout


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def plots_loaded(dom: str) -> tuple[int, int]:
    """(plots on the page, plots loaded) from a DOM dumped after the page's onload ran."""
    body = re.search(r"<body\b[^>]*>", dom)
    tag = body.group(0) if body else ""
    total = re.search(r'\bdata-plots="(\d+)"', tag)
    loaded = re.search(r'\bdata-plots-loaded="(\d+)"', tag)
    if total is None or loaded is None:
        raise ValueError("the DOM has no data-plots / data-plots-loaded on <body>: the page script did not run")
    return int(total.group(1)), int(loaded.group(1))


def render_in_chromium(html_path: Path, screenshot: Path, timeout_s: float = 60) -> str:
    """Open html_path in headless Chromium: write a full-page PNG screenshot to
    `screenshot` and return the DOM as it is after onload (its <body> carries
    data-plots and data-plots-loaded). FileNotFoundError if Chromium is missing;
    RuntimeError / TimeoutError, with Chromium's stderr tail, if it fails."""
    binary = _chromium()
    url = html_path.resolve().as_uri()
    deadline = time.monotonic() + timeout_s
    screenshot = screenshot.resolve()
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vfl-chromium-") as profile:
        common = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--mute-audio",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
        ]
        dom = _run_chromium([*common, "--window-size=1280,1000", "--dump-dom", url], deadline, "--dump-dom")
        # The page's height (set by its onload script) sizes the screenshot to the whole page.
        found = re.search(r'\bdata-page-height="(\d+)"', dom)
        height = min(max(int(found.group(1)), 800), 16000) if found else 4000
        screenshot.unlink(missing_ok=True)
        _run_chromium(
            [*common, f"--window-size=1280,{height}", f"--screenshot={screenshot}", url], deadline, "--screenshot"
        )
        if not screenshot.is_file() or screenshot.stat().st_size == 0:
            raise RuntimeError(f"chromium --screenshot wrote no file at {screenshot}")
    return dom
