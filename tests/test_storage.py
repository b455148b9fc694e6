"""The checked records of vfl/common/storage.py: round trip, each kind of damage
named (never the content), legacy plain-JSON files still read, quarantine,
and the directory flushed after a durable rename; and the stores built on
them (models, checkpoints, keys, B's budgets)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import grpc
import pytest

from vfl.common import storage
from vfl.common.checkpoint import JobCheckpoints
from vfl.common.crypto import get_backend
from vfl.common.crypto.keystore import KEY_FILE, load_or_create_keypair
from vfl.common.errors import ConfigError, DamagedFile, NotFound
from vfl.common.models import ModelStore
from vfl.common.rpc import status_of
from vfl.common.storage import (
    atomic_write_text,
    decode_record,
    encode_record,
    quarantine,
    quarantined_copy,
    read_record,
    write_record,
)
from vfl.services.passive.policy import PassivePolicy, PredictionBudget

BODY = {"weights": [0.5, -1.25, 1e-300], "name": "m", "nested": {"b": 2, "a": [1, None, True]}, "nan": None}
SECRET = "s3cr3t-value-never-echoed"


def damage(path: Path, how: str) -> None:
    """Damage a record file in place, the ways a disk, a crash or an editor do."""
    text = path.read_text()
    if how == "truncated":
        path.write_text(text[: len(text) // 2])
    elif how == "empty":
        path.write_text("")
    elif how == "garbled":
        path.write_bytes(b"\xff\xfe" + text.encode()[2:])
    elif how == "flipped":
        # One digit of the body changed (to another non-zero one): still
        # valid JSON, wrong checksum.
        at = text.index('"body"')
        at += next(i for i, ch in enumerate(text[at:]) if ch.isdigit())
        path.write_text(text[:at] + ("7" if text[at] != "7" else "3") + text[at + 1 :])
    elif how == "not-json":
        path.write_text("weights = {0.5}")
    else:
        raise AssertionError(how)


def test_round_trip_and_envelope(tmp_path):
    path = tmp_path / "r.json"
    write_record(path, "model", BODY)
    assert read_record(path, "model") == BODY
    doc = json.loads(path.read_text())
    assert doc["format"] == "vfl/model" and doc["version"] == 1 and len(doc["sha256"]) == 64
    assert doc["body"] == BODY
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The checksum is over the canonical body: key order does not matter.
    reordered = {k: BODY[k] for k in reversed(list(BODY))}
    assert json.loads(encode_record("model", reordered))["sha256"] == doc["sha256"]


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("truncated", "truncated: the JSON ends early"),
        ("empty", "empty file"),
        ("garbled", "garbled: not UTF-8 text"),
        ("flipped", "checksum mismatch"),
        ("not-json", "not valid JSON at line 1, column 1"),
    ],
)
def test_each_damage_is_named(tmp_path, how, reason):
    path = tmp_path / "r.json"
    write_record(path, "model", {**BODY, "secret": SECRET})
    damage(path, how)
    with pytest.raises(DamagedFile) as info:
        read_record(path, "model")
    assert info.value.reason == reason
    assert str(info.value) == f"{path}: {reason}"
    assert status_of(info.value) == grpc.StatusCode.DATA_LOSS
    assert SECRET not in str(info.value)


def envelope(**fields: object) -> bytes:
    doc = {"format": "vfl/model", "version": 1, "sha256": "0" * 64, "body": {}}
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (envelope(format="vfl/job-state"), "wrong format: expected 'vfl/model', the format field is 'vfl/job-state'"),
        (envelope(format=SECRET), "wrong format: expected 'vfl/model', the format field is missing or garbled"),
        (envelope(version=2), "unknown version 2; this build reads versions up to 1"),
        (envelope(version=0), "unknown version 0; this build reads versions up to 1"),
        (envelope(version="1"), "the version field is not an integer"),
        (envelope(sha256="abc"), "the sha256 field is missing or not 64 hex digits"),
        (envelope(body=[1]), "the body field is missing or not a JSON object"),
        (b"[1, 2]", "not a vfl/model record (expected a JSON object)"),
    ],
)
def test_wrong_format_version_or_fields(tmp_path, raw, reason):
    with pytest.raises(DamagedFile) as info:
        decode_record(raw, tmp_path / "r.json", "model")
    assert info.value.reason == reason
    assert SECRET not in str(info.value)


def test_legacy_plain_json_is_read_and_logged_once(tmp_path, caplog):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(BODY))
    with caplog.at_level(logging.INFO, logger="vfl.storage"):
        assert read_record(path, "model") == BODY
        assert read_record(path, "model") == BODY
    notes = [r for r in caplog.records if "event=legacy_file" in r.getMessage()]
    assert len(notes) == 1 and str(path) in notes[0].getMessage()


def test_quarantine_moves_the_file_owner_only(tmp_path, caplog):
    data = tmp_path / "data"
    path = data / "models" / "m.json"
    write_record(path, "model", BODY)
    with caplog.at_level(logging.WARNING, logger="vfl.storage"):
        moved = quarantine(path, data, "checksum mismatch")
    assert not path.exists()
    assert moved.parent == data / "quarantine" and moved.name.startswith("m.json.20")
    assert moved.name.endswith("Z")
    assert stat.S_IMODE(moved.parent.stat().st_mode) == 0o700
    assert read_record(moved, "model") == BODY  # moved intact, not rewritten
    assert quarantined_copy(path, data) == moved
    # Another id that shares the prefix is not this model's copy.
    assert quarantined_copy(data / "models" / "m.j.json", data) is None
    (line,) = [r.getMessage() for r in caplog.records if "event=file_quarantined" in r.getMessage()]
    assert line.startswith("event=file_quarantined path=models/m.json to=quarantine/m.json.")
    assert "reason='checksum mismatch'" in line


def test_durable_write_flushes_the_directory_after_the_rename(tmp_path, monkeypatch):
    """A spy on os.fsync that calls the real one: the file is flushed before
    the rename, its directory after it (the new name is then in place)."""
    path = tmp_path / "d" / "r.json"
    write_record(path, "model", {"v": 1})
    real = os.fsync
    seen: list[tuple[str, str | None]] = []

    def spy(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            assert info.st_ino == path.parent.stat().st_ino
            seen.append(("dir", json.loads(path.read_text())["body"]["v"]))
        else:
            seen.append(("file", None))
        real(fd)

    monkeypatch.setattr(storage.os, "fsync", spy)
    write_record(path, "model", {"v": 2})
    assert seen == [("file", None), ("dir", 2)]
    seen.clear()
    write_record(path, "model", {"v": 3}, durable=False)
    assert seen == []
    seen.clear()
    atomic_write_text(tmp_path / "d" / "plain.txt", "x")
    assert [kind for kind, _ in seen] == ["file", "dir"]


def test_checkpoint_state_is_durable_only_when_asked(tmp_path, monkeypatch):
    real = os.fsync
    flushed: list[bool] = []
    monkeypatch.setattr(storage.os, "fsync", lambda fd: (flushed.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd)))
    cps = JobCheckpoints(tmp_path)
    cps.save_setup("j", {"job_id": "j"})
    flushed.clear()
    cps.save_state("j", {"iteration": 1}, durable=True)
    assert flushed == [False, True]
    flushed.clear()
    cps.save_state("j", {"iteration": 2}, durable=False)
    assert flushed == []


# --- the stores -----------------------------------------------------------------


def test_damaged_shard_is_quarantined_named_and_the_others_listed(tmp_path):
    store = ModelStore(tmp_path)
    for m in ("a", "b", "c"):
        store.save(m, {"model_id": m, "secret": SECRET})
    damage(tmp_path / "models" / "b.json", "flipped")
    assert [s["model_id"] for s in store.load_all()] == ["a", "c"]
    moved = quarantined_copy(tmp_path / "models" / "b.json", tmp_path)
    assert moved is not None and not (tmp_path / "models" / "b.json").exists()
    with pytest.raises(DamagedFile) as info:
        store.load("b")
    assert str(info.value) == f"model 'b': models/b.json was damaged and moved to quarantine/{moved.name}"
    assert status_of(info.value) == grpc.StatusCode.DATA_LOSS
    with pytest.raises(NotFound):
        store.load("z")


def test_damaged_shard_found_by_load(tmp_path):
    store = ModelStore(tmp_path)
    store.save("m", {"model_id": "m"})
    damage(tmp_path / "models" / "m.json", "truncated")
    with pytest.raises(DamagedFile) as info:
        store.load("m")
    moved = quarantined_copy(tmp_path / "models" / "m.json", tmp_path)
    assert moved is not None
    assert str(info.value) == (
        f"model 'm': models/m.json is damaged (truncated: the JSON ends early); moved to quarantine/{moved.name}"
    )


def test_legacy_shard_still_loads(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "old.json").write_text(json.dumps({"model_id": "old", "weights": [1.0]}, indent=1))
    assert ModelStore(tmp_path).load("old") == {"model_id": "old", "weights": [1.0]}


@pytest.mark.parametrize("part", ["setup", "state"])
def test_damaged_checkpoint_is_reported_and_quarantined(tmp_path, part):
    cps = JobCheckpoints(tmp_path)
    cps.save_setup("j", {"job_id": "j", "target_fingerprint": "ab"})
    cps.save_state("j", {"iteration": 3}, durable=False)
    cps.save_setup("ok", {"job_id": "ok"})
    cps.save_state("ok", {"iteration": 1}, durable=False)
    (tmp_path / "jobs" / ".j.state.json.tmp123").write_text("{")  # a write a kill interrupted
    damage(tmp_path / "jobs" / f"j.{part}.json", "flipped" if part == "state" else "truncated")
    saved = {s.job_id: s for s in cps.load_all()}
    assert saved["ok"].problem == "" and saved["ok"].state == {"iteration": 1}
    moved = quarantined_copy(tmp_path / "jobs" / f"j.{part}.json", tmp_path)
    assert moved is not None
    reason = "checksum mismatch" if part == "state" else "truncated: the JSON ends early"
    assert saved["j"].problem == (
        f"job j: checkpoint jobs/j.{part}.json is damaged ({reason}); moved to quarantine/{moved.name}; "
        "the job cannot resume"
    )
    other = "state" if part == "setup" else "setup"
    assert getattr(saved["j"], part) is None and getattr(saved["j"], other) is not None
    assert not list((tmp_path / "jobs").glob(".*"))


def test_missing_state_is_a_problem_too(tmp_path):
    cps = JobCheckpoints(tmp_path)
    cps.save_setup("j", {"job_id": "j"})
    (saved,) = cps.load_all()
    assert saved.problem == "job j: checkpoint jobs/j.state.json is missing; the job cannot resume"
    assert saved.missing == {"state"}


@pytest.mark.parametrize("how", ["truncated", "empty", "garbled", "flipped"])
def test_damaged_key_file_is_one_config_line_and_left_in_place(tmp_path, how):
    backend = get_backend("ou")
    load_or_create_keypair(tmp_path, backend, 768, test_mode=True)
    path = tmp_path / KEY_FILE
    if how == "flipped":
        doc = json.loads(path.read_text())
        doc["body"]["p"] = doc["body"]["p"][:-1] + ("1" if doc["body"]["p"][-1] != "1" else "3")
        path.write_text(json.dumps(doc))
    else:
        damage(path, how)
    before = path.read_bytes()
    with pytest.raises(ConfigError) as info:
        load_or_create_keypair(tmp_path, backend, 768, test_mode=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"VFL_DATA_DIR: {tmp_path}: keys/private_key.json is damaged (")
    assert "the models trained with this party's key need it" in message
    assert "restore the file from a backup, or move it away to have a new key generated" in message
    assert path.read_bytes() == before and not (tmp_path / "quarantine").exists()


def test_legacy_key_file_still_loads(tmp_path):
    backend = get_backend("ou")
    key = load_or_create_keypair(tmp_path, backend, 768, test_mode=True)
    path = tmp_path / KEY_FILE
    path.write_text(json.dumps(key.to_dict()))  # as written before the envelope
    assert load_or_create_keypair(tmp_path, backend, 768, test_mode=True).public == key.public


def test_damaged_budgets_refuse_scoring_and_stay_in_place(tmp_path):
    budget = PredictionBudget(tmp_path, PassivePolicy(max_predict_ids_per_model=10))
    budget.charge("a", "m", 4)
    path = tmp_path / "budgets.json"
    damage(path, "truncated")
    with pytest.raises(DamagedFile) as info:
        budget.charge("a", "m", 1)
    assert str(info.value).startswith("budgets.json is damaged (truncated: the JSON ends early); it holds every")
    assert path.exists() and not (tmp_path / "quarantine").exists()  # moving it would reset every budget
