"""B's prediction budget per time window stays small and fast however many
calls it counts (the soak, benchmarks/soak.py, showed one entry per Predict
call: every call read and rewrote them all), and still never counts a call
for less than the window."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vfl.common.errors import ResourceExhausted
from vfl.common.storage import read_record
from vfl.services.passive.policy import BUDGETS_KIND, WINDOW_SLOTS, PassivePolicy, PredictionBudget

WINDOW_S = 1000.0
SLOT_S = WINDOW_S / WINDOW_SLOTS


def window_entries(data_dir: Path) -> list[list[float]]:
    return read_record(data_dir / "budgets.json", BUDGETS_KIND)["a"]["window"]


def test_many_calls_keep_a_bounded_window(tmp_path: Path) -> None:
    budget = PredictionBudget(tmp_path, PassivePolicy(predict_ids_per_window=10**9, predict_window_s=WINDOW_S))
    t0 = 1_000_000.0
    for i in range(5000):  # 5000 calls over half the window: 10 per slot
        budget.charge("a", "m", 16, now=t0 + i * WINDOW_S / 2 / 5000)
    entries = window_entries(tmp_path)
    assert len(entries) <= WINDOW_SLOTS // 2 + 2
    assert sum(c for _, c in entries) == 5000 * 16  # every id still counted
    started = time.perf_counter()
    budget.charge("a", "m", 16, now=t0 + WINDOW_S / 2)
    assert time.perf_counter() - started < 0.5


def test_a_call_counts_for_the_whole_window_and_about_a_slot_more(tmp_path: Path) -> None:
    budget = PredictionBudget(tmp_path, PassivePolicy(predict_ids_per_window=100, predict_window_s=WINDOW_S))
    t0 = 1_000_000.0
    budget.charge("a", "m", 60, now=t0)
    budget.charge("a", "m", 30, now=t0 + SLOT_S / 4)  # the same slot: one entry
    assert len(window_entries(tmp_path)) == 1
    with pytest.raises(ResourceExhausted):  # 90 used: 20 more is over 100, just before the window ends
        budget.charge("a", "m", 20, now=t0 + WINDOW_S - SLOT_S / 2)
    with pytest.raises(ResourceExhausted):  # the later call of the slot is still in its window
        budget.charge("a", "m", 20, now=t0 + WINDOW_S + SLOT_S / 8)
    budget.charge("a", "m", 20, now=t0 + WINDOW_S + SLOT_S)  # both out of the window now
    assert sum(c for _, c in window_entries(tmp_path)) == 20


def test_a_steady_stream_does_not_pin_its_oldest_calls(tmp_path: Path) -> None:
    """Calls in every slot: the entries roll over, so calls older than the
    window plus a slot stop counting."""
    budget = PredictionBudget(tmp_path, PassivePolicy(predict_ids_per_window=10**9, predict_window_s=WINDOW_S))
    t0 = 1_000_000.0
    steps = 3 * WINDOW_SLOTS
    for i in range(steps):  # three windows, 1 id a slot
        budget.charge("a", "m", 1, now=t0 + i * SLOT_S)
    counted = sum(c for _, c in window_entries(tmp_path))
    assert WINDOW_SLOTS - 1 <= counted <= WINDOW_SLOTS + 1
