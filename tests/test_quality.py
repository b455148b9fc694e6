"""The model-quality claim of benchmarks/quality.py, checked on breast in
seconds: the recommended configuration's test AUC is within the claimed bound
of scikit-learn's, the Taylor row beside it comes from the same code with
only the residual changed, and the study's figures (benchmarks/results.json,
when recorded) are what this code computes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import quality
from vfl.common.protocol.residual import LOGISTIC, POLY5

RESULTS = Path(quality.__file__).resolve().parent / "results.json"


@pytest.fixture(scope="module")
def breast() -> quality.DataSet:
    return quality.breast()


def _recorded_summary() -> dict[str, Any] | None:
    if not RESULTS.is_file():
        return None
    recs = json.loads(RESULTS.read_text())
    return next((r for r in recs if r.get("name") == "quality" and r.get("case") == "summary"), None)


def test_recommended_is_within_the_bound_of_scikit_learn_on_breast(breast: quality.DataSet) -> None:
    study = quality.Study(breast)
    c = quality.RECOMMENDED
    result = study.evaluate(c)
    sk = study.sklearn(c.setting.l2)
    print(f"breast: {c.label}: AUC {result.auc:.4f}, scikit-learn {sk:.4f}")
    assert abs(result.auc - sk) <= quality.AUC_BOUND, (result.auc, sk)
    assert 0 < result.kept <= result.iterations


def test_the_taylor_row_runs_the_same_code_with_only_the_residual_changed(
    breast: quality.DataSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, ...]] = []
    real = quality.train_plain

    def spy(*args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(quality, "train_plain", spy)
    study = quality.Study(breast)
    results = {res: study.evaluate(dataclasses.replace(quality.RECOMMENDED, residual=res)) for res in quality.RESIDUALS}
    assert len(calls) == len(quality.RESIDUALS)  # one trajectory each
    (*taylor, taylor_model), (*poly, poly_model) = calls
    assert taylor_model is LOGISTIC and poly_model is POLY5  # LOGISTIC: what the services run
    # Everything else identical: data, initial weights, batches, optimiser, l2.
    for a, b in zip(taylor[:5], poly[:5], strict=True):
        np.testing.assert_array_equal(a, b)
    assert [x.rows.tolist() for x in taylor[5]] == [x.rows.tolist() for x in poly[5]]
    assert taylor[6] == poly[6] and taylor[7] == poly[7]
    assert results["taylor"].auc != results["poly5"].auc  # the residual did change

    summary = _recorded_summary()
    if summary is None or summary.get("headline") is None:
        pytest.skip("no quality study recorded in benchmarks/results.json")
    recorded = quality.candidate_from_record(summary["recommended"])
    if recorded != quality.RECOMMENDED:
        pytest.fail(f"results.json recommends {recorded.label}, quality.RECOMMENDED is {quality.RECOMMENDED.label}")
    row = summary["headline"]["breast"]
    assert row["sklearn_auc"] == pytest.approx(study.sklearn(recorded.setting.l2), abs=1e-9)
    for res, r in results.items():
        assert row[res]["auc"] == pytest.approx(r.auc, abs=1e-6), res
        assert (row[res]["iterations"], row[res]["kept_iteration"]) == (r.iterations, r.kept), res
    assert summary["auc_bound"] == quality.AUC_BOUND
    # The data set's full grid holds the same rows.
    recs = json.loads(RESULTS.read_text())
    grid = quality.rows_of(next(r for r in recs if r.get("name") == "quality" and r.get("case") == "breast"))
    assert len(grid) == len(quality.grid())
    for res, r in results.items():
        s = dataclasses.replace(recorded, residual=res)
        (row_of,) = [g for g in grid if quality.candidate_from_record(g) == s]
        assert row_of["auc"] == pytest.approx(r.auc, abs=1e-6) and row_of["kept_iteration"] == r.kept, res


def test_validation_stop_follows_the_services_rule() -> None:
    """Checks of w^t every `every` iterations; best loss kept; after
    `patience` checks without improvement the job stops at the end of that
    iteration. Intercept-only weights u on all-positive labels: the Taylor
    loss log 2 - u/2 + u^2/8 is lowest at u = 2."""
    n = 8
    rows = quality.Rows(np.ones((n, 1)), np.zeros((n, 1)), np.ones(n))
    us = [0.0, 1.0, 2.0, 1.5, 1.0, 0.5, 2.0]
    traj = quality.Trajectory([(np.array([u]), np.array([0.0])) for u in us], per_epoch=1)
    assert quality.validation_stop(traj, rows, every=1, patience=2) == (2, 5)
    # Never patient enough to stop: the final check (t = 6, u = 2) ties and is not better.
    assert quality.validation_stop(traj, rows, every=1, patience=10) == (2, 6)
    # Every 4: checks at 4 and at the last iteration (6) only.
    assert quality.validation_stop(traj, rows, every=4, patience=1) == (6, 6)
