"""vfl.cli.report: the metrics against scikit-learn and scipy, input checks,
the page's escaping, and the page rendered in headless Chromium (every plot
loads; a missing plot is caught)."""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics

from vfl.cli.report import ReportData, plots_loaded, render_in_chromium, write_report
from vfl.common.evaluation import (
    auc_and_ks,
    calibration_bins,
    confusion_matrix,
    cumulative_gain,
    ks_curve,
    ks_statistic,
    lift_table,
    roc_auc,
)

REPO = Path(__file__).resolve().parents[1]


def tied_data(seed: int, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Labels, and scores with signal rounded to 2 decimals (many ties, also across classes)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.int64)
    s = np.round(np.clip(0.25 * y + 0.8 * rng.random(n), 0, 1), 2)
    return y, s


def bundled_like(seed: int = 7, n: int = 114) -> tuple[np.ndarray, np.ndarray]:
    """Like the bundled breast data's held-out 20 %: 114 rows, about 63 % positive, AUC near 0.99."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.63).astype(np.int64)
    logit = (2 * y - 1) * 2.6 + rng.normal(0, 1.4, n)
    return y, 1 / (1 + np.exp(-logit))


def sklearn_ks(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    fpr, tpr, thr = metrics.roc_curve(y, s, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    return float(max(tpr - fpr)), float(thr[best])


CASES = [tied_data(seed) for seed in range(5)] + [bundled_like(), bundled_like(seed=11)]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_ks_statistic_equals_sklearn_and_scipy(case: int) -> None:
    y, s = CASES[case]
    ks, at = ks_statistic(y, s)
    want_ks, want_at = sklearn_ks(y, s)
    assert abs(ks - want_ks) <= 1e-12
    assert at == want_at
    # The default (drop_intermediate=True) curve has the same maximum.
    fpr, tpr, _ = metrics.roc_curve(y, s)
    assert abs(ks - float(max(tpr - fpr))) <= 1e-12
    stats = pytest.importorskip("scipy.stats")
    assert abs(ks - stats.ks_2samp(s[y == 1], s[y == 0]).statistic) <= 1e-12
    # What A puts in JobStatus and ModelInfo for a holdout split.
    auc, ks_a = auc_and_ks(y, s)
    assert abs(auc - metrics.roc_auc_score(y, s)) <= 1e-12 and ks_a == ks


def test_ks_curve_groups_equal_scores() -> None:
    y = np.array([1, 0, 1, 0, 1, 0])
    s = np.array([0.9, 0.9, 0.5, 0.5, 0.5, 0.1])
    thresholds, tpr, fpr = ks_curve(y, s)
    assert thresholds.tolist() == [0.9, 0.5, 0.1]
    assert tpr.tolist() == [1 / 3, 1.0, 1.0]
    assert fpr.tolist() == [1 / 3, 2 / 3, 1.0]
    # Row order does not matter (a tie is one threshold, not split by position).
    order = np.random.default_rng(0).permutation(len(y))
    assert ks_statistic(y[order], s[order]) == ks_statistic(y, s) == (pytest.approx(1 / 3), 0.5)


def test_ks_of_all_equal_scores_is_zero() -> None:
    assert ks_statistic([0, 1, 1, 0], [0.3, 0.3, 0.3, 0.3]) == (0.0, 0.3)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_roc_auc_and_confusion_equal_sklearn(case: int) -> None:
    y, s = CASES[case]
    assert abs(roc_auc(y, s) - metrics.roc_auc_score(y, s)) <= 1e-12
    for t in (0.3, 0.5, float(np.median(s))):
        assert (confusion_matrix(y, s, t) == metrics.confusion_matrix(y, (s >= t).astype(int), labels=[0, 1])).all()


def test_cumulative_gain_and_lift() -> None:
    y, s = bundled_like()
    table = lift_table(y, s)
    assert table.fraction[-1] == 1.0 and table.gain[-1] == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.diff(table.gain) >= -1e-12)
    assert table.band_lift.mean() == pytest.approx(1.0)
    assert cumulative_gain(y, s, [0.0, 1.0]).tolist() == pytest.approx([0.0, 1.0])
    # A perfect ranking: the top decile is all positives (base rate 63 % > 10 %), so its lift is 1 / base rate.
    perfect = lift_table(y, y.astype(float) + 0.001 * np.arange(len(y)) / len(y))
    assert perfect.cumulative_lift[0] == pytest.approx(1 / y.mean())
    assert perfect.band_lift[0] == pytest.approx(1 / y.mean())
    # Random scores of one value: every band holds the base rate pro rata.
    flat = lift_table(y, np.full(len(y), 0.5))
    assert flat.gain == pytest.approx(flat.fraction) and flat.band_lift == pytest.approx(np.ones(10))
    # Ties straddling a band edge are shared pro rata: row order does not change the table.
    yt, st = tied_data(3)
    order = np.random.default_rng(1).permutation(len(yt))
    assert lift_table(yt[order], st[order]).gain == pytest.approx(lift_table(yt, st).gain, abs=1e-12)


def test_calibration_bins_equal_sklearn() -> None:
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(5)
    s = rng.random(5000)
    y = (rng.random(5000) < s).astype(int)  # calibrated by construction
    cal = calibration_bins(y, s)
    assert cal.count.sum() == 5000 and len(cal.count) == 10
    prob_true, prob_pred = calibration_curve(y, s, n_bins=10, strategy="uniform")
    full = cal.count > 0
    assert cal.observed_rate[full] == pytest.approx(prob_true, abs=1e-12)
    assert cal.mean_predicted[full] == pytest.approx(prob_pred, abs=1e-12)
    assert np.abs(cal.observed_rate - cal.mean_predicted).max() < 0.05
    inside = (cal.mean_predicted >= cal.edges[:-1]) & (cal.mean_predicted <= cal.edges[1:])
    assert inside.all()
    # Empty bins are NaN, not 0.
    sparse = calibration_bins([0, 1, 1], [0.05, 0.95, 1.0])
    assert sparse.count.tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert np.isnan(sparse.observed_rate[1]) and sparse.observed_rate[9] == 1.0


@pytest.mark.parametrize(
    ("y", "s", "message"),
    [
        ([1, 1, 1], [0.2, 0.5, 0.9], "only one class"),
        ([0, 1, 0], [0.2, float("nan"), 0.9], "scores must be finite"),
        ([0, 1, 0], [0.2, float("inf"), 0.9], "scores must be finite"),
        ([0, 1, 0], [0.2, 0.5], "differ in length"),
        ([0, 1, 2], [0.2, 0.5, 0.9], "only 0 and 1"),
        ([], [], "no rows"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(y: list[int], s: list[float], message: str) -> None:
    for metric in (ks_statistic, roc_auc, ks_curve, lift_table, calibration_bins, confusion_matrix):
        with pytest.raises(ValueError, match=message):
            metric(y, s)  # type: ignore[operator]


def test_calibration_needs_probabilities() -> None:
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        calibration_bins([0, 1], [-0.5, 2.0])


# --- the page -----------------------------------------------------------------------------------


def synthetic_run(**changes: object) -> ReportData:
    """A realistic run on 114 held-out rows: 200 iterations, validation every 10, early-stopped weights kept."""
    y, s = bundled_like()
    rng = np.random.default_rng(3)
    it = np.arange(1, 201)
    train = 0.08 + 0.61 * np.exp(-it / 35) + rng.normal(0, 0.03, len(it))
    val_it = np.arange(10, 201, 10)
    val = 0.11 + 0.58 * np.exp(-val_it / 35) + 0.0004 * np.maximum(val_it - 120, 0)
    kept = int(val_it[np.argmin(val)])
    fields: dict[str, object] = dict(
        model_id="m-2f9c41d7",
        created_unix=1765152000.0,
        config={
            "learning_rate": 0.15,
            "batch_size": 64,
            "max_iterations": 200,
            "l2": 0.001,
            "optimizer": "sgd",
            "crypto": "ou",
            "key_bits": 2048,
            "validation_fraction": 0.1,
            "patience": 5,
        },
        loss_history=[(int(i), float(v)) for i, v in zip(it, train, strict=True)],
        validation_losses=[(int(i), float(v)) for i, v in zip(val_it, val, strict=True)],
        kept_iteration=kept,
        ids=[f"id{i:04d}" for i in range(len(y))],
        y=y,
        scores=s,
        split_name="held-out rows",
        iterations=200,
        train_rows=455,
        active_features=10,
        passive_features=20,
        elapsed_s=96.4,
        phase_seconds={
            "encrypt": 31.2,
            "matvec": 22.7,
            "decrypt": 14.9,
            "rpc_wait": 11.6,
            "serialise": 6.1,
            "mask": 2.4,
        },
        bytes_sent=184_337_920,
        dp_epsilon_spent=None,
        dp_delta=None,
        learned=[
            ("active party (A)", "its own weights w_A, the labels it holds, the training loss per iteration"),
            ("passive party (B)", "its own weights w_B; only masked, encrypted gradients of its features"),
            ("assistant", "ciphertext sizes and timings; no rows, labels or weights"),
        ],
    )
    fields.update(changes)
    return ReportData(**fields)  # type: ignore[arg-type]


def test_page_is_self_contained_and_escapes_the_data(tmp_path: Path) -> None:
    data = synthetic_run(
        model_id='m<1>&"x"',
        config={"note": "<script>alert(1)</script>", "<b>key</b>": 1},
        dp_epsilon_spent=1.25,
        dp_delta=1e-5,
    )
    # A misclassified row's id is shown among the most confident errors.
    wrong = int(np.flatnonzero((data.scores >= 0.5) != (data.y == 1))[0])
    ids = list(data.ids)
    ids[wrong] = "<img src=x onerror=alert(2)>"
    data = dataclasses.replace(data, ids=ids)
    page = write_report(data, tmp_path / "report")
    assert page == tmp_path / "report" / "index.html"
    text = page.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "<script>alert(1)" not in text
    assert "&lt;b&gt;key&lt;/b&gt;" in text and "<b>key" not in text
    assert "&lt;img src=x onerror=alert(2)&gt;" in text and "<img src=x" not in text
    assert "m&lt;1&gt;&amp;&quot;x&quot;" in text
    assert "1.25" in text and "δ = 1e-05" in text
    assert not re.search(r"https?://|//[a-z]", text, re.I), "the page must not reference anything outside it"
    imgs = re.findall(r"<img\b[^>]*>", text)
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    assert len(imgs) == len(pngs) >= 8
    for tag in imgs:
        assert 'class="plot"' in tag and re.search(r'alt="[^"]+"', tag)
        src = re.search(r'src="([^"]+)"', tag)
        assert src and src.group(1) in pngs


def test_epsilon_off_without_dp(tmp_path: Path) -> None:
    text = write_report(synthetic_run(), tmp_path).read_text()
    assert re.search(r"ε spent</td><td>off</td>", text)


def test_report_data_mismatched_ids(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ids and y differ in length"):
        write_report(synthetic_run(ids=["a", "b"]), tmp_path)


@pytest.fixture
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("VFL_REQUIRE_CHROMIUM") == "1":
            pytest.fail("VFL_REQUIRE_CHROMIUM=1 but no chromium on PATH (install Debian's chromium)")
        pytest.skip("no chromium on PATH (install Debian's chromium; VFL_REQUIRE_CHROMIUM=1 makes this a failure)")
    return found


def test_report_renders_in_chromium_with_every_plot(tmp_path: Path, chromium: str) -> None:
    import matplotlib.image

    page = write_report(synthetic_run(), tmp_path / "report")
    pngs = list(page.parent.glob("*.png"))
    assert len(pngs) >= 8
    shot = tmp_path / "screenshot.png"
    dom = render_in_chromium(page, shot)
    assert plots_loaded(dom) == (len(pngs), len(pngs))
    assert f"{len(pngs)} of {len(pngs)} plots loaded" in dom
    assert shot.stat().st_size > 20_000
    pixels = matplotlib.image.imread(shot)
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 16, f"the screenshot is nearly blank ({len(colours)} colours)"
    artefacts = Path(os.environ.get("VFL_ARTEFACT_DIR") or REPO / "artefacts")
    artefacts.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, artefacts / "report-screenshot.png")


def test_a_missing_plot_is_caught(tmp_path: Path, chromium: str) -> None:
    page = write_report(synthetic_run(), tmp_path / "report")
    pngs = list(page.parent.glob("*.png"))
    (page.parent / "roc.png").unlink()
    dom = render_in_chromium(page, tmp_path / "screenshot.png")
    total, loaded = plots_loaded(dom)
    assert total == len(pngs) and loaded == total - 1
    assert 'class="check bad"' in dom


def test_plots_loaded_without_the_script() -> None:
    with pytest.raises(ValueError, match="page script did not run"):
        plots_loaded("<html><body><p>no script</p></body></html>")


def test_render_without_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="install Debian's chromium"):
        render_in_chromium(tmp_path / "index.html", tmp_path / "shot.png")


def fake_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "chromium"
    fake.write_text("#!/bin/sh\n" + script + "\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_a_failing_chromium_raises_with_its_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_chromium(tmp_path, monkeypatch, 'echo "noise"; echo "fatal: cannot open display" >&2; exit 3')
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*fatal: cannot open display"):
        render_in_chromium(tmp_path / "index.html", tmp_path / "shot.png")


def test_a_hung_chromium_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_chromium(tmp_path, monkeypatch, 'echo "starting" >&2; sleep 30')
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"(?s)timed out.*starting"):
        render_in_chromium(tmp_path / "index.html", tmp_path / "shot.png", timeout_s=1)
    assert time.monotonic() - started < 10


def test_ties_matter_in_the_comparison_data() -> None:
    """Plant: KS taken row by row (equal scores split by position) differs from the
    grouped value on the tied data, so the comparison with scikit-learn would catch it."""
    y, s = CASES[0]
    order = np.argsort(-s, kind="stable")
    per_row = np.cumsum(y[order]) / y.sum() - np.cumsum(1 - y[order]) / (len(y) - y.sum())
    assert abs(float(per_row.max()) - sklearn_ks(y, s)[0]) > 1e-3
    assert abs(ks_statistic(y, s)[0] - sklearn_ks(y, s)[0]) <= 1e-12


def test_the_demo_writes_a_report_whose_ks_equals_sklearns(tmp_path: Path, chromium: str) -> None:
    """`vfl demo` (each party its own process, real gRPC, test-size keys)
    writes the report of its run and prints its path; the page renders with
    every plot, and its KS and AUC are scikit-learn's on the scores it scored."""
    import subprocess
    import sys

    from vfl.cli.main import BUNDLED_ACTIVE, read_labels

    cmd = [sys.executable, "-m", "vfl.cli.main", "demo", "--key-bits", "1024", "--epochs", "2"]
    cmd += ["--report-dir", str(tmp_path / "report"), "--workdir", str(tmp_path / "fed")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    page = Path(next(line for line in lines if line.startswith("report ")).removeprefix("report "))
    printed_auc = float(next(line for line in lines if line.startswith("AUC ")).split()[1])
    assert page == tmp_path / "report" / "index.html"

    shot = tmp_path / "demo-report.png"
    dom = render_in_chromium(page, shot)
    total, loaded = plots_loaded(dom)
    assert total == loaded == len(list(page.parent.glob("*.png"))) >= 8
    artefacts = Path(os.environ.get("VFL_ARTEFACT_DIR") or REPO / "artefacts")
    artefacts.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, artefacts / "demo-report-screenshot.png")

    # The scored rows the page lists, with the labels from A's own file (not the page's).
    with (page.parent / "scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    labels = read_labels(BUNDLED_ACTIVE, "id", "y")
    y = np.array([labels[r["id"]] for r in rows])
    s = np.array([float(r["score"]) for r in rows])
    assert len(rows) == 114
    ks_page = float(re.search(r'\bdata-ks="([^"]+)"', dom).group(1))  # type: ignore[union-attr]
    auc_page = float(re.search(r'\bdata-auc="([^"]+)"', dom).group(1))  # type: ignore[union-attr]
    fpr, tpr, _ = metrics.roc_curve(y, s)
    assert ks_page == pytest.approx(float(max(tpr - fpr)), abs=1e-12)
    assert auc_page == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
    assert round(auc_page, 4) == printed_auc
