"""Seeded synthetic vertical splits: A holds the id, a 0/1 label and p_A
features, B the same ids (in another order) and p_B features.

Labels come from a logistic model over *all* features, so neither party can
fit them alone and the federated model's AUC means something (about 0.9 for
the default signal strength). Columns get arbitrary offsets and scales so that
each party's standardisation has work to do, as with real data.

`python -m benchmarks.synthetic OUT_DIR [--rows N]` writes the default
13 + 10 split to OUT_DIR/active.csv and OUT_DIR/passive.csv.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_ROWS = 30_000
DEFAULT_P_ACTIVE = 13
DEFAULT_P_PASSIVE = 10
DEFAULT_SEED = 7
# Standard deviation of the true linear predictor over standardised features;
# 2.5 gives a Bayes-optimal AUC of about 0.9 (checked by `bayes_auc` below).
SIGNAL_STD = 2.5


@dataclass(frozen=True)
class SyntheticSplit:
    active_csv: Path
    passive_csv: Path
    rows: int
    p_active: int
    p_passive: int
    seed: int


def _features(rng: np.random.Generator, rows: int, p: int) -> np.ndarray:
    """Standard normal columns with a little shared structure (a common factor),
    so features are correlated as in real data but never collinear."""
    common = rng.standard_normal((rows, 1))
    loadings = rng.uniform(0.0, 0.5, size=(1, p))
    z = rng.standard_normal((rows, p)) + common * loadings
    return np.asarray((z - z.mean(axis=0)) / z.std(axis=0))


def _true_weights(rng: np.random.Generator, p: int, x: np.ndarray) -> np.ndarray:
    """Weights scaled so the linear predictor has standard deviation SIGNAL_STD."""
    w = rng.standard_normal(p)
    return np.asarray(w * (SIGNAL_STD / float(np.std(x @ w))))


def _labels(rng: np.random.Generator, x: np.ndarray, w: np.ndarray, intercept: float) -> np.ndarray:
    eta = x @ w + intercept
    return np.asarray(rng.random(len(eta)) < 1.0 / (1.0 + np.exp(-eta)), dtype=np.int64)


def _raw_scale(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Arbitrary per-column units and offsets (undone by the parties' scalers)."""
    scale = rng.uniform(0.5, 20.0, size=x.shape[1])
    offset = rng.uniform(-10.0, 10.0, size=x.shape[1])
    return x * scale + offset


def _write_csv(path: Path, header: list[str], columns: np.ndarray, int_columns: int) -> None:
    """`int_columns` leading columns as integers (id, label), the rest as %.6f."""
    fmt = ["%d"] * int_columns + ["%.6f"] * (columns.shape[1] - int_columns)
    with path.open("w", newline="") as fh:
        fh.write(",".join(header) + "\n")
        np.savetxt(fh, columns, fmt=fmt, delimiter=",")


def make_split(rows: int, p_active: int, p_passive: int, seed: int, out_dir: Path) -> SyntheticSplit:
    """Write active.csv (id, y, a0..) and passive.csv (id, b0..) under out_dir."""
    if rows < 2 or p_active < 1 or p_passive < 1:
        raise ValueError("make_split: expected rows >= 2 and at least one feature per party")
    rng = np.random.default_rng(seed)
    x = _features(rng, rows, p_active + p_passive)
    w = _true_weights(rng, p_active + p_passive, x)
    y = _labels(rng, x, w, intercept=rng.uniform(-0.5, 0.5))
    raw = _raw_scale(rng, x)
    ids = np.arange(1, rows + 1, dtype=np.int64)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = SyntheticSplit(out_dir / "active.csv", out_dir / "passive.csv", rows, p_active, p_passive, seed)
    _write_csv(
        split.active_csv,
        ["id", "y", *(f"a{j}" for j in range(p_active))],
        np.column_stack([ids, y, raw[:, :p_active]]),
        int_columns=2,
    )
    # B lists the same ids in another order: the services join on the id.
    order = rng.permutation(rows)
    _write_csv(
        split.passive_csv,
        ["id", *(f"b{j}" for j in range(p_passive))],
        np.column_stack([ids[order], raw[order, p_active:]]),
        int_columns=1,
    )
    return split


def make_default(out_dir: Path, rows: int = DEFAULT_ROWS, seed: int = DEFAULT_SEED) -> SyntheticSplit:
    """The synthetic workload's data: 13 features at A, 10 at B."""
    return make_split(rows, DEFAULT_P_ACTIVE, DEFAULT_P_PASSIVE, seed, out_dir)


def bayes_auc(rows: int = 20_000, p: int = 23, seed: int = DEFAULT_SEED) -> float:
    """AUC of the true model on fresh labels: the ceiling a fit can reach."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    x = _features(rng, rows, p)
    w = _true_weights(rng, p, x)
    y = _labels(rng, x, w, intercept=0.0)
    return float(roc_auc_score(y, x @ w))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    split = make_default(args.out_dir, args.rows, args.seed)
    print(f"wrote {split.active_csv} and {split.passive_csv} ({split.rows} rows, 13 + 10 features)")


if __name__ == "__main__":
    main()
