"""The typed checkpoint records of each party: a round trip through the
on-disk form is the identity, and a record that cannot be used is refused
with the error the restore path turns into "cannot resume"."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vfl.services.active.records import ActiveSetup, ActiveState
from vfl.services.passive.records import PassiveState

STATE_A = ActiveState(
    next_iteration=7,
    w=np.array([0.1, -0.2, 0.3]),
    prev_w=np.array([0.0, -0.1, 0.2]),
    optimizer={"step": 7, "first": [0.0, 0.0, 0.0], "second": None},
    prev_optimizer=None,
    validation_losses=[(5, 0.4)],
    best_iteration=5,
    best_loss=0.4,
    best_w=np.array([0.05, -0.15, 0.25]),
    stale_checks=1,
    pending_z_b=[2**200 + 3, 17],
    epoch=1,
    loss=0.45,
    losses=[(5, 0.5), (7, 0.45)],
    released_at=6,
    extra_releases=0,
)
SETUP_A = ActiveSetup(
    job_id="j1",
    config={"epochs": 2},
    train_ids=["a", "b"],
    holdout_ids=["c"],
    alignment_id="al",
    scores_any_row=False,
    target_fingerprint=bytes(range(32)),
    passive_key={"scheme": "ou"},
    p_passive=4,
    started=1.5,
    w0=np.array([0.01, 0.02, 0.03]),
    dp=None,
)
STATE_B = PassiveState(
    iteration=3,
    w=np.array([0.5, 0.25]),
    optimizer=None,
    candidates={2: np.array([0.4, 0.2])},
    last_update_sq_norm=0.01,
    last_apply=(2, b"\x01" * 32, 0.01),
    restarts=1,
    restarted_at=2,
    released_at=2,
)


def _same(a: object, b: object) -> None:
    assert json.dumps(a.to_record(), sort_keys=True) == json.dumps(b.to_record(), sort_keys=True)  # type: ignore[attr-defined]


@pytest.mark.parametrize("record", [STATE_A, SETUP_A, STATE_B], ids=["active-state", "active-setup", "passive-state"])
def test_round_trip_through_json(record: ActiveState | ActiveSetup | PassiveState) -> None:
    on_disk = json.loads(json.dumps(record.to_record()))
    back = type(record).from_record(on_disk)
    _same(back, record)
    if isinstance(record, ActiveState):
        assert isinstance(back, ActiveState) and back.pending_z_b == record.pending_z_b  # exact big integers


@pytest.mark.parametrize(
    "cls, base, change, error",
    [
        (ActiveState, STATE_A, {"w": [0.1, float("nan")]}, ValueError),
        (ActiveState, STATE_A, {"pending_z_b": ["zz"]}, ValueError),
        (ActiveState, STATE_A, {"optimizer": [1, 2]}, TypeError),
        (ActiveState, STATE_A, {"next_iteration": None}, TypeError),
        (ActiveSetup, SETUP_A, {"target_fingerprint": "not hex"}, ValueError),
        (ActiveSetup, SETUP_A, {"w0": [[0.1]]}, ValueError),
        (PassiveState, STATE_B, {"candidates": {"2": [0.1, 0.2, 0.3]}}, ValueError),
        (PassiveState, STATE_B, {"last_apply": [2, "xyz", 0.0]}, ValueError),
    ],
)
def test_unusable_records_are_refused(cls: type, base: object, change: dict[str, object], error: type) -> None:
    record = {**base.to_record(), **change}  # type: ignore[attr-defined]
    with pytest.raises(error):
        cls.from_record(record)


@pytest.mark.parametrize("cls, base, key", [(ActiveState, STATE_A, "w"), (PassiveState, STATE_B, "released_at")])
def test_a_missing_field_is_refused(cls: type, base: object, key: str) -> None:
    record = base.to_record()  # type: ignore[attr-defined]
    del record[key]
    with pytest.raises(KeyError):
        cls.from_record(record)
