"""Model quality: test AUC of the federated algorithm (its plain-numpy
reference, `vfl.common.protocol.reference.train_plain`, which the services
match to 1e-4) against scikit-learn's LogisticRegression (lbfgs) on the same
split, for the Taylor residual (what the services run) and the degree-5
polynomial (POLY5: a per-job choice, `residual poly5`, with one passive party), over a small grid of optimisers,
learning rates, decays, batch sizes, L2 penalties and stopping rules.

`python -m benchmarks.quality [--quick] [--json OUT]`, or through the harness
`make bench BENCH=quality` (results.json, BENCHMARKS.md).

Data: the bundled breast split and the synthetic 30,000 x (13 + 10) set
(`benchmarks/synthetic.py`), both split 80/20 as `vfl demo` does
(`split_ids(..., 0.2, 42)`). Each party standardises its own columns with
its own training statistics (`vfl.common.data.Scaler`), as the services do;
scikit-learn fits the joined standardised training rows with C = 1 / (l2 n):
our gradient is mean(d x) + l2 w (intercept unpenalised), the gradient of
mean log-loss + l2/2 |w|^2, which is scikit-learn's objective divided by C n.

Stopping rules:
- epochs: a fixed number of epochs over all training rows;
- validation: the services' rule (JobConfig.validation_every / patience):
  VALIDATION_FRACTION of the training rows become A's holdout rows (the job
  trains on the rest, standardised with the rest's statistics), A checks the
  validation loss every epoch's worth of iterations and after the last, keeps
  the best check's weights, and stops after `patience` checks without a
  better loss. The loss is the one the services compute, the Taylor loss
  (`LOGISTIC.plain_loss`), for both residuals (docs/POLY5.md: validation is
  not wired for poly5 yet).

A configuration passes when its test AUC is within AUC_BOUND of
scikit-learn's, either way, on *both* data sets.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from benchmarks import synthetic
from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE, split_aligned, split_ids
from vfl.common.data import Scaler, load_party_csv
from vfl.common.jobconfig import JobConfig
from vfl.common.protocol.batching import batch_schedule, min_batch_size
from vfl.common.protocol.optimizers import DecayName, OptimizerName, OptimizerSettings
from vfl.common.protocol.reference import train_plain, with_intercept
from vfl.common.protocol.residual import LOGISTIC, POLY5, PolynomialResidual, ResidualModel

AUC_BOUND = 0.001
TEST_SIZE, SPLIT_SEED = 0.2, 42  # the split used everywhere (`vfl demo`, the benchmarks)
VALIDATION_FRACTION = 0.2  # of the training rows, for the validation stopping rule
INIT_SEEDS = (0, 1)  # A's and B's initial weights (init_scale from JobConfig: 0.01)
SKLEARN_MAX_ITER, SKLEARN_TOL = 100_000, 1e-10

Residual = ResidualModel | PolynomialResidual
RESIDUALS: dict[str, Residual] = {"taylor": LOGISTIC, "poly5": POLY5}

# Epochs per budget and data set: the validation rule runs up to "long".
EPOCHS: dict[str, dict[str, int]] = {
    "breast": {"short": 10, "long": 30},
    "synthetic": {"short": 5, "long": 10},
}
OPTIMIZER_RATES: tuple[tuple[OptimizerName, float], ...] = (
    ("sgd", 0.15),
    ("sgd", 0.5),
    ("momentum", 0.015),
    ("momentum", 0.05),
    ("adam", 0.01),
    ("adam", 0.05),
)
DECAYS: tuple[DecayName, ...] = ("none", "inverse_time")  # inverse_time: lr / (1 + 0.5 t / 100), JobConfig's defaults
BATCH_SIZES = (64, 256)
L2S = (0.01, 0.001)


@dataclass(frozen=True)
class Stop:
    """A stopping rule. `budget` names the epochs per data set (EPOCHS)."""

    kind: Literal["epochs", "validation"]
    budget: str
    patience: int = 0

    @property
    def label(self) -> str:
        if self.kind == "epochs":
            return f"fixed epochs ({self.budget})"
        return f"validation each epoch, patience {self.patience} (up to {self.budget})"

    def describe(self, dataset: str) -> str:
        epochs = EPOCHS[dataset][self.budget]
        if self.kind == "epochs":
            return f"{epochs} epochs"
        return f"validation every epoch, patience {self.patience}, at most {epochs} epochs"


STOPS = (
    Stop("epochs", "short"),
    Stop("epochs", "long"),
    Stop("validation", "long", patience=3),
    Stop("validation", "long", patience=5),
)


@dataclass(frozen=True)
class Setting:
    """Everything of a configuration but the residual."""

    optimizer: OptimizerName
    learning_rate: float
    lr_decay: DecayName
    batch_size: int
    l2: float
    stop: Stop

    def job_config(self, epochs: int) -> JobConfig:
        # Validated as a job's config would be (a name the services refuse fails here).
        return JobConfig(
            optimizer=self.optimizer,
            learning_rate=self.learning_rate,
            lr_decay=self.lr_decay,
            batch_size=self.batch_size,
            l2=self.l2,
            epochs=epochs,
        )

    @property
    def label(self) -> str:
        return (
            f"{self.optimizer} lr {self.learning_rate:g}, decay {self.lr_decay}, batch {self.batch_size}, "
            f"l2 {self.l2:g}, {self.stop.label}"
        )


@dataclass(frozen=True)
class Candidate:
    residual: str  # a key of RESIDUALS
    setting: Setting

    @property
    def label(self) -> str:
        return f"{self.residual}, {self.setting.label}"


# The configuration this study found (`python -m benchmarks.quality` checks
# that it still is the one selected; tests/test_quality.py checks its claim).
RECOMMENDED = Candidate(
    "taylor",
    Setting("adam", 0.01, "inverse_time", 64, 0.01, Stop("validation", "long", patience=3)),
)


def grid() -> list[Candidate]:
    return [
        Candidate(residual, Setting(opt, lr, decay, batch, l2, stop))
        for residual in RESIDUALS
        for (opt, lr), decay, batch, l2, stop in itertools.product(OPTIMIZER_RATES, DECAYS, BATCH_SIZES, L2S, STOPS)
    ]


# --- data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """Scored rows: A's columns with the intercept, B's, the labels."""

    xa: np.ndarray
    xb: np.ndarray
    y: np.ndarray

    def scores(self, w_a: np.ndarray, w_b: np.ndarray) -> np.ndarray:
        return np.asarray(self.xa @ w_a + self.xb @ w_b, dtype=np.float64)


@dataclass(frozen=True)
class Prepared:
    """A job's training rows (each party standardised with its own training
    statistics) and other rows transformed with the same statistics."""

    xa: np.ndarray  # without the intercept, as train_plain takes it
    xb: np.ndarray
    y: np.ndarray
    other: dict[str, Rows]


@dataclass(frozen=True)
class DataSet:
    name: str
    full: Prepared  # all training rows; other: test
    early: Prepared  # training rows minus the validation rows; other: test, validation

    @property
    def test(self) -> Rows:
        return self.full.other["test"]


def _prepare(active_csv: Path, passive_csv: Path, train: list[str], other: dict[str, list[str]]) -> Prepared:
    a, b = load_party_csv(active_csv, "id", "y"), load_party_csv(passive_csv, "id")
    assert a.labels is not None
    pa, pb = a.positions(train, "train_ids"), b.positions(train, "train_ids")
    sa, sb = Scaler.fit(a.features[pa]), Scaler.fit(b.features[pb])
    rows = {}
    for name, ids in other.items():
        qa, qb = a.positions(ids, name), b.positions(ids, name)
        rows[name] = Rows(with_intercept(sa.transform(a.features[qa])), sb.transform(b.features[qb]), a.labels[qa])
    return Prepared(sa.transform(a.features[pa]), sb.transform(b.features[pb]), a.labels[pa], rows)


def load_dataset(name: str, active_csv: Path, passive_csv: Path) -> DataSet:
    train, test, _ = split_ids(active_csv, "id", "y", TEST_SIZE, SPLIT_SEED)
    fit, validation = split_aligned(train, VALIDATION_FRACTION, SPLIT_SEED)
    return DataSet(
        name,
        full=_prepare(active_csv, passive_csv, train, {"test": test}),
        early=_prepare(active_csv, passive_csv, fit, {"test": test, "validation": validation}),
    )


def breast() -> DataSet:
    return load_dataset("breast", BUNDLED_ACTIVE, BUNDLED_PASSIVE)


def synthetic_dataset(out_dir: Path, rows: int = synthetic.DEFAULT_ROWS) -> DataSet:
    split = synthetic.make_default(out_dir, rows=rows)
    return load_dataset("synthetic", split.active_csv, split.passive_csv)


# --- scikit-learn -----------------------------------------------------------------------


def sklearn_auc(ds: DataSet, l2: float) -> float:
    """LogisticRegression (lbfgs) on the joined standardised training rows,
    C = 1 / (l2 n); its test AUC."""
    p = ds.full
    model = LogisticRegression(C=1.0 / (l2 * len(p.y)), max_iter=SKLEARN_MAX_ITER, tol=SKLEARN_TOL)
    model.fit(np.hstack([p.xa, p.xb]), p.y)
    t = ds.test
    return float(roc_auc_score(t.y, model.decision_function(np.hstack([t.xa[:, :-1], t.xb]))))


# --- training -------------------------------------------------------------------------


@dataclass(frozen=True)
class Trajectory:
    weights: list[tuple[np.ndarray, np.ndarray]]  # after t updates, t = 0..len(batches)
    per_epoch: int


def trajectory(p: Prepared, residual: str, setting: Setting, epochs: int) -> Trajectory:
    """train_plain over `epochs` epochs from small random initial weights,
    with the weights after every update (its trace holds those before each)."""
    config = setting.job_config(epochs)
    p_a, p_b = int(p.xa.shape[1]), int(p.xb.shape[1])
    floor = min_batch_size(p_a, p_b, config.allow_small_batch)
    batches = batch_schedule(len(p.y), config.batch_size, config.epochs, config.seed, floor, config.max_iterations)
    w_a0 = np.random.default_rng(INIT_SEEDS[0]).normal(0.0, config.init_scale, size=p_a + 1)
    w_b0 = np.random.default_rng(INIT_SEEDS[1]).normal(0.0, config.init_scale, size=p_b)
    trace: list[dict[str, np.ndarray]] = []
    w_a, w_b = train_plain(
        p.xa, p.xb, p.y, w_a0, w_b0, batches, OptimizerSettings.of(config), config.l2, trace, RESIDUALS[residual]
    )
    return Trajectory([(t["w_active"], t["w_passive"]) for t in trace] + [(w_a, w_b)], batches.per_epoch)


def validation_stop(traj: Trajectory, rows: Rows, every: int, patience: int) -> tuple[int, int]:
    """The services' rule (ActiveParty._validation_check and the training
    loop): a check of w^t at t = every, 2 every, ... and t = T; the best
    (lowest) loss is kept; after `patience` checks without improvement the
    job stops at the end of that iteration. (kept t, iterations run)."""
    total = len(traj.weights) - 1
    best_t, best_loss, stale = 0, float("inf"), 0
    for t in range(1, total + 1):
        if t % every and t != total:
            continue
        loss = LOGISTIC.plain_loss(rows.scores(*traj.weights[t]), rows.y)
        if loss < best_loss:
            best_t, best_loss, stale = t, loss, 0
        else:
            stale += 1
        if stale >= patience and t < total:
            return best_t, t + 1
    return best_t, total


@dataclass(frozen=True)
class Result:
    candidate: Candidate
    dataset: str
    auc: float
    iterations: int  # run (the updates a federated job would do)
    kept: int  # the iteration whose weights are the model
    per_epoch: int  # iterations per epoch (the validation rule checks this often)


class Study:
    """Trajectories are shared by the stopping rules: one run of the longest
    budget gives every shorter one (the batches of epoch e and the decayed
    rate of update t do not depend on the number of epochs)."""

    def __init__(self, ds: DataSet) -> None:
        self.ds = ds
        self._trajectories: dict[tuple[Any, ...], Trajectory] = {}
        self._sklearn: dict[float, float] = {}

    def sklearn(self, l2: float) -> float:
        if l2 not in self._sklearn:
            self._sklearn[l2] = sklearn_auc(self.ds, l2)
        return self._sklearn[l2]

    def _trajectory(self, residual: str, setting: Setting, early: bool) -> Trajectory:
        s = setting
        key = (residual, s.optimizer, s.learning_rate, s.lr_decay, s.batch_size, s.l2, early)
        if key not in self._trajectories:
            epochs = max(EPOCHS[self.ds.name].values())
            self._trajectories[key] = trajectory(self.ds.early if early else self.ds.full, residual, s, epochs)
        return self._trajectories[key]

    def evaluate(self, c: Candidate) -> Result:
        stop = c.setting.stop
        epochs = EPOCHS[self.ds.name][stop.budget]
        if stop.kind == "epochs":
            traj = self._trajectory(c.residual, c.setting, early=False)
            kept = ran = epochs * traj.per_epoch
        else:
            traj = self._trajectory(c.residual, c.setting, early=True)
            # Checks every epoch's worth of iterations, up to the budget.
            capped = Trajectory(traj.weights[: epochs * traj.per_epoch + 1], traj.per_epoch)
            kept, ran = validation_stop(capped, self.ds.early.other["validation"], traj.per_epoch, stop.patience)
        auc = float(roc_auc_score(self.ds.test.y, self.ds.test.scores(*traj.weights[kept])))
        return Result(c, self.ds.name, auc, ran, kept, traj.per_epoch)


# --- the study ------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    datasets: dict[str, dict[str, Any]]  # name -> rows, features, sklearn AUC per l2
    results: list[Result]
    recommended: Candidate | None
    wall_s: float

    def gap(self, r: Result) -> float:
        return r.auc - float(self.datasets[r.dataset]["sklearn_auc"][str(r.candidate.setting.l2)])

    def scored(self) -> Scored:
        """Each configuration run on every data set: its gaps and iterations."""
        return {
            c: ([self.gap(r) for r in rs.values()], sum(r.iterations for r in rs.values()))
            for c, rs in self.by_candidate().items()
            if len(rs) == len(self.datasets)
        }

    def by_candidate(self) -> dict[Candidate, dict[str, Result]]:
        out: dict[Candidate, dict[str, Result]] = {}
        for r in self.results:
            out.setdefault(r.candidate, {})[r.dataset] = r
        return out


def passes(gaps: Sequence[float]) -> bool:
    # Within the bound both ways: the issue asks for the AUC within 0.001 of
    # scikit-learn's, and a gap above it is as much a different model.
    return all(abs(g) <= AUC_BOUND for g in gaps)


Scored = dict[Candidate, tuple[list[float], int]]  # gap per data set, iterations over all of them


def family(c: Candidate) -> tuple[str, str, str, str, int]:
    """A configuration but its learning rate, batch, l2 and epoch budget."""
    s = c.setting
    return (c.residual, s.optimizer, s.lr_decay, s.stop.kind, s.stop.patience)


def family_label(f: tuple[str, str, str, str, int]) -> str:
    residual, optimizer, decay, kind, patience = f
    stop = "fixed epochs" if kind == "epochs" else f"validation, patience {patience}"
    return f"{residual}, {optimizer}, decay {decay}, {stop}"


def families(scored: Scored) -> dict[tuple[str, str, str, str, int], dict[str, Any]]:
    """Per family: how many of its members pass, and its worst gap."""
    out: dict[tuple[str, str, str, str, int], dict[str, Any]] = {}
    for c, (gaps, _) in scored.items():
        f = out.setdefault(family(c), {"members": 0, "passing": 0, "worst_gap": float("inf")})
        f["members"] += 1
        f["passing"] += passes(gaps)
        f["worst_gap"] = min(f["worst_gap"], min(gaps))
    return out


def _changes(c: Candidate) -> int:
    """Hyper-parameters (of those a member of a family varies) changed from JobConfig's defaults."""
    d, s = JobConfig(), c.setting
    return (s.learning_rate != d.learning_rate) + (s.batch_size != d.batch_size) + (s.l2 != d.l2)


def select(scored: Scored) -> Candidate | None:
    """A default must not hinge on one lucky learning rate: the family
    (residual, optimiser, decay, stopping rule) whose members pass most often
    over the learning rates, batch sizes, L2 penalties and budgets tried, then
    the one with the largest worst gap (rounded to 1e-4: below that the test
    AUCs are noise), then Taylor (what the services run). Within it, of the
    members that pass: the fewest changes from JobConfig's defaults (learning
    rate, batch, l2), the largest worst gap (to 1e-4), the fewest iterations
    over both data sets (each is a round of encryptions in the federation)."""
    order = list(RESIDUALS)
    fams = families(scored)
    ranked = sorted(
        (f for f, v in fams.items() if v["passing"]),
        key=lambda f: (-fams[f]["passing"] / fams[f]["members"], -round(fams[f]["worst_gap"], 4), order.index(f[0])),
    )
    if not ranked:
        return None
    members = [(c, g, its) for c, (g, its) in scored.items() if family(c) == ranked[0] and passes(g)]
    return min(members, key=lambda m: (_changes(m[0]), -round(min(m[1]), 4), m[2]))[0]


def run_study(datasets: Sequence[DataSet], say: Callable[[str], None] = print) -> Outcome:
    t0 = time.perf_counter()
    results: list[Result] = []
    info: dict[str, dict[str, Any]] = {}
    candidates = grid()
    for ds in datasets:
        t1 = time.perf_counter()
        study = Study(ds)
        sk = {str(l2): study.sklearn(l2) for l2 in L2S}
        info[ds.name] = {
            "train_rows": len(ds.full.y),
            "test_rows": len(ds.test.y),
            "validation_rows": len(ds.early.other["validation"].y),
            "p_active": ds.full.xa.shape[1],
            "p_passive": ds.full.xb.shape[1],
            "epochs": EPOCHS[ds.name],
            # The test AUC moves in steps of 1 / (positives x negatives).
            "auc_step": 1.0 / float(np.sum(ds.test.y == 1) * np.sum(ds.test.y == 0)),
            "sklearn_auc": sk,
            "sklearn_C": {str(l2): 1.0 / (l2 * len(ds.full.y)) for l2 in L2S},
        }
        results += [study.evaluate(c) for c in candidates]
        say(
            f"   {ds.name}: scikit-learn AUC {sk}; {len(candidates)} configurations in {time.perf_counter() - t1:.1f} s"
        )
    outcome = Outcome(info, results, None, 0.0)
    return dataclasses.replace(outcome, recommended=select(outcome.scored()), wall_s=time.perf_counter() - t0)


# --- records --------------------------------------------------------------------------

COLUMNS = (
    *("residual", "optimizer", "learning_rate", "lr_decay", "batch_size", "l2", "stop", "budget", "patience"),
    *("auc", "gap", "iterations", "kept_iteration"),
)


def _candidate_record(c: Candidate) -> dict[str, Any]:
    s = c.setting
    return {
        "residual": c.residual,
        "optimizer": s.optimizer,
        "learning_rate": s.learning_rate,
        "lr_decay": s.lr_decay,
        "batch_size": s.batch_size,
        "l2": s.l2,
        "stop": s.stop.kind,
        "budget": s.stop.budget,
        "patience": s.stop.patience,
        "label": c.label,
    }


def candidate_from_record(rec: dict[str, Any]) -> Candidate:
    stop = Stop(rec["stop"], rec["budget"], rec["patience"])
    setting = Setting(rec["optimizer"], rec["learning_rate"], rec["lr_decay"], rec["batch_size"], rec["l2"], stop)
    return Candidate(rec["residual"], setting)


def _rows(outcome: Outcome, name: str) -> list[str]:
    """One comma-separated line per configuration (COLUMNS; `rows_of` reads
    them back): one line each in results.json rather than one per value."""
    out = []
    for r in outcome.results:
        if r.dataset != name:
            continue
        c, s = r.candidate, r.candidate.setting
        values = [c.residual, s.optimizer, s.learning_rate, s.lr_decay, s.batch_size, s.l2, s.stop.kind]
        values += [s.stop.budget, s.stop.patience, f"{r.auc:.6f}", f"{outcome.gap(r):+.6f}", r.iterations, r.kept]
        out.append(",".join(map(str, values)))
    return out


def rows_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A data set's record's rows as dicts of COLUMNS, numbers as numbers."""
    numeric = {"learning_rate": float, "batch_size": int, "l2": float, "patience": int, "auc": float, "gap": float}
    numeric |= {"iterations": int, "kept_iteration": int}
    out = []
    for line in record["rows"]:
        row: dict[str, Any] = dict(zip(record["columns"], line.split(","), strict=True))
        out.append({k: numeric[k](v) if k in numeric else v for k, v in row.items()})
    return out


def headline(outcome: Outcome, c: Candidate) -> dict[str, Any]:
    """The recommended configuration beside the same one with each residual."""
    table = outcome.by_candidate()
    out: dict[str, Any] = {}
    for name in outcome.datasets:
        row: dict[str, Any] = {"sklearn_auc": outcome.datasets[name]["sklearn_auc"][str(c.setting.l2)]}
        for residual in RESIDUALS:
            r = table[dataclasses.replace(c, residual=residual)][name]
            row[residual] = {
                "auc": round(r.auc, 6),
                "gap": round(outcome.gap(r), 6),
                "iterations": r.iterations,
                "kept_iteration": r.kept,
                "iterations_per_epoch": r.per_epoch,
            }
        out[name] = row
    return out


def records(outcome: Outcome) -> list[dict[str, Any]]:
    """One summary record (the recommendation, its table, the pass counts)
    and one per data set (every configuration's row)."""
    rec = outcome.recommended
    by = outcome.by_candidate()
    passing = [c for c, rs in by.items() if passes([outcome.gap(r) for r in rs.values()])]
    summary: dict[str, Any] = {
        "name": "quality",
        "case": "summary",
        "backend": "plain",
        "auc_bound": AUC_BOUND,
        "wall_s": round(outcome.wall_s, 1),
        "configurations": len(by),
        "passing": {res: sum(c.residual == res for c in passing) for res in RESIDUALS},
        # |gap| <= AUC_BOUND on every data set (not above scikit-learn by more either).
        "within_both_ways": {
            res: sum(
                c.residual == res and all(abs(outcome.gap(r)) <= AUC_BOUND for r in rs.values()) for c, rs in by.items()
            )
            for res in RESIDUALS
        },
        "families": [
            {"family": list(f), "label": family_label(f), **{k: round(v, 6) for k, v in stats.items()}}
            for f, stats in families(outcome.scored()).items()
        ],
        "datasets": outcome.datasets,
        "recommended": None if rec is None else _candidate_record(rec),
        "recommended_is_constant": rec == RECOMMENDED,
        "headline": None if rec is None else headline(outcome, rec),
        "validation_fraction": VALIDATION_FRACTION,
        "init": {"scale": JobConfig().init_scale, "seeds": list(INIT_SEEDS)},
    }
    if rec != RECOMMENDED:
        summary["constant"] = {**_candidate_record(RECOMMENDED), "headline": headline(outcome, RECOMMENDED)}
    if rec is None:
        worst = {c: min(outcome.gap(r) for r in rs.values()) for c, rs in by.items()}
        closest = max(worst, key=lambda c: worst[c])
        summary["closest"] = {**_candidate_record(closest), "worst_gap": round(worst[closest], 6)}
    per_set = [
        {"name": "quality", "case": name, "backend": "plain", "columns": list(COLUMNS), "rows": _rows(outcome, name)}
        for name in outcome.datasets
    ]
    return [summary, *per_set]


# --- BENCHMARKS.md ----------------------------------------------------------------------


def _cell(r: dict[str, Any]) -> str:
    kept = f", kept {r['kept_iteration']}" if r["kept_iteration"] != r["iterations"] else ""
    return f"{r['auc']:.4f} ({r['gap']:+.5f}; {r['iterations']} it.{kept})"


def _stop_text(rec: dict[str, Any], datasets: dict[str, Any], headline_rows: dict[str, Any]) -> str:
    c = candidate_from_record(rec)
    per = []
    for name, info in datasets.items():
        epochs = info["epochs"][c.setting.stop.budget]
        if c.setting.stop.kind == "epochs":
            per.append(f"{name} {epochs} epochs")
        else:
            every = headline_rows[name][c.residual]["iterations_per_epoch"]
            per.append(f"{name} `validation_every` {every}, at most {epochs} epochs")
    return "; ".join(per)


def report_section(records: Sequence[dict[str, Any]]) -> list[str]:
    """The BENCHMARKS.md section, from the quality records of the results file."""
    lines = ["## Model quality (plain reference vs scikit-learn)", ""]
    summary = next((r for r in records if r.get("name") == "quality" and r.get("case") == "summary"), None)
    errors = [f"- failed: {r['error']}" for r in records if r.get("name") == "quality" and "error" in r]
    if summary is None:
        return lines + (errors or ["Not run yet."]) + [""]
    ds, bound = summary["datasets"], summary["auc_bound"]
    machine, code = summary.get("machine") or {}, summary.get("code") or {}
    where = (
        f"`{summary.get('command', 'python -m benchmarks.quality')}` on {machine.get('cpu', '?')} "
        f"({machine.get('cores', '?')} cores), commit {code.get('commit', '?')}, {summary.get('date', '?')} UTC: "
        f"{summary['wall_s']:.0f} s for {summary['configurations']} configurations on each data set"
    )
    lines += [
        "`benchmarks/quality.py`: the test AUC of `train_plain` (the plain-numpy reference the services "
        "reproduce to 1e-4) against scikit-learn's LogisticRegression (lbfgs, C = 1 / (l2 n), on the joined "
        "training rows, each party's columns standardised with its own training statistics as the services do), "
        "on the 80/20 split of `vfl demo` (`split_ids(..., 0.2, 42)`). Initial weights N(0, 0.01) from fixed "
        "seeds; the batch order is the job's (seed 42). Grid: the Taylor residual (what the services run) and "
        "POLY5 (`residual poly5`, docs/POLY5.md); sgd lr 0.15 / 0.5, "
        "momentum 0.015 / 0.05, adam "
        "0.01 / 0.05; lr_decay none / inverse_time (r 0.5, k 100); batch 64 / 256; l2 0.01 / 0.001; stopping "
        "by fixed epochs (short / long: "
        + ", ".join(f"{n} {i['epochs']['short']} / {i['epochs']['long']}" for n, i in ds.items())
        + f") or by the services' validation rule ({summary['validation_fraction']:.0%} of the training rows "
        "held out as A's holdout, the rest trained on; the Taylor validation loss every epoch's worth of "
        "iterations, the best check kept, stopped after `patience` 3 / 5 checks without improvement, at most "
        f"the long budget). A configuration passes when its test AUC is within {bound:g} of scikit-learn's, "
        "either way, on both data sets. Measured by " + where + ".",
        "",
    ]
    rec, head = summary.get("recommended"), summary.get("headline")
    if rec is None or head is None:
        closest = summary["closest"]
        lines += [
            f"No configuration is within {bound:g} of scikit-learn on both data sets; the closest is "
            f"{closest['label']} (worst gap {closest['worst_gap']:+.4f}).",
            "",
        ]
    else:
        other = [r for r in RESIDUALS if r != rec["residual"]]
        lines += [
            f"**Recommended default: {rec['label'].replace(' (up to long)', '')}** "
            f"({_stop_text(rec, ds, head)}). The same optimiser and stopping rule with each residual; "
            "cells: test AUC (gap to scikit-learn; iterations run, and the one kept if earlier):",
            "",
        ]
        header = ["data set", "train rows (of which validation) / test rows", "AUC step", "scikit-learn AUC (C)"]
        header += [f"{rec['residual']} (recommended)", *(f"{r}, same optimiser and stop" for r in other)]
        rows = []
        for name, info in ds.items():
            l2 = str(rec["l2"])
            rows.append(
                [
                    f"{name} ({info['p_active']} + {info['p_passive']} features)",
                    f"{info['train_rows']:,} ({info['validation_rows']:,}) / {info['test_rows']:,}",
                    f"{info['auc_step']:.2g}",
                    f"{head[name]['sklearn_auc']:.4f} ({info['sklearn_C'][l2]:.4g})",
                    _cell(head[name][rec["residual"]]),
                    *(_cell(head[name][r]) for r in other),
                ]
            )
        lines += [*_table(header, rows), ""]
        above = [f"{n} ({head[n][rec['residual']]['gap']:+.4f})" for n in ds if head[n][rec["residual"]]["gap"] > bound]
        if above:
            lines += [
                f"Above scikit-learn by more than {bound:g} on {', '.join(above)}: only a shortfall fails a "
                "configuration. The test AUC moves in steps of 1 / (positives x negatives) (the AUC step "
                "column), so a few steps either way on a small test set are a handful of ranked pairs.",
                "",
            ]
    passing = summary["passing"]
    per_residual = summary["configurations"] // len(RESIDUALS)
    lines += [
        "Passing configurations (within the bound both ways): "
        + ", ".join(f"{r} {n} of {per_residual}" for r, n in passing.items())
        + ". By family (a residual, optimiser, decay and stopping rule over the learning rates, batches, l2 "
        "and budgets tried; the recommendation is taken from the family that passes most often, then by its "
        "worst gap, and within it the member with the fewest changes from JobConfig's defaults):",
        "",
    ]
    fams = sorted(summary["families"], key=lambda f: (-f["passing"] / f["members"], -f["worst_gap"]))
    lines += _table(
        ["family", "members passing", "worst gap"],
        ([f["label"], f"{f['passing']} / {f['members']}", f"{f['worst_gap']:+.5f}"] for f in fams),
    )
    lines += [
        "",
        "Every configuration's AUC, gap and iterations per data set: the `quality` records of "
        "`benchmarks/results.json`. The validation rule scores POLY5's weights with the Taylor loss (the only "
        "validation loss the protocol computes); POLY5 itself is not in the services yet.",
        "",
        *errors,
    ]
    return lines + ([""] if errors else [])


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def workload(quick: bool, data_dir: Path, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    rows = 3_000 if quick else synthetic.DEFAULT_ROWS
    datasets = [breast(), synthetic_dataset(data_dir / f"quality-synthetic-{rows}", rows)]
    outcome = run_study(datasets, say)
    recs = records(outcome)
    summary = recs[0]
    if outcome.recommended is None:
        say(f"   no configuration within {AUC_BOUND} of scikit-learn on both: closest {summary['closest']}")
    else:
        say(f"   recommended: {outcome.recommended.label}")
        for name, row in summary["headline"].items():
            say(
                f"   {name}: scikit-learn {row['sklearn_auc']:.4f}, "
                + ", ".join(f"{res} {row[res]['auc']:.4f} ({row[res]['gap']:+.4f})" for res in RESIDUALS)
            )
        if outcome.recommended != RECOMMENDED:
            say(f"   note: the selection differs from quality.RECOMMENDED ({RECOMMENDED.label})")
    say(f"   study: {outcome.wall_s:.0f} s")
    return recs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="synthetic set of 3,000 rows")
    parser.add_argument("--json", type=Path, default=None, help="write the records here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vfl-quality-") as tmp:
        recs = workload(args.quick, Path(tmp))
    if args.json is not None:
        args.json.write_text(json.dumps(recs, indent=1) + "\n")


if __name__ == "__main__":
    main()
