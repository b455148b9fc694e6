"""Atomic, owner-only files in a party's data directory, each a checked record.

Every JSON file a party keeps (its private key, model shards, job
checkpoints, B's prediction budgets) is one envelope:

    {"format": "vfl/<kind>", "version": 1, "sha256": "<hex>", "body": {...}}

where sha256 is over the canonical JSON of the body (sorted keys, no
spaces). `read_record` refuses a file that is not JSON or is truncated, is
another kind of record, has an unknown version or a checksum mismatch, with
`DamagedFile` naming the file and what is wrong (never its content). Files
written before the envelope (plain JSON, "version 0") are still read.
A damaged file is moved to <data_dir>/quarantine/ by `quarantine`, never
deleted: it may be all that is left to recover from.
"""

from __future__ import annotations

import datetime
import errno
import glob
import hashlib
import hmac
import json
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

from vfl.common.errors import DamagedFile
from vfl.common.oserrors import storage_error

log = logging.getLogger("vfl.storage")

RECORD_VERSION = 1
QUARANTINE_DIR = "quarantine"
_ENVELOPE_KEYS = ("format", "version", "sha256", "body")
_FORMAT_RE = re.compile(r"vfl/[a-z0-9-]{1,32}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_STAMP_FORMAT = "%Y%m%dT%H%M%S.%fZ"
_STAMP_RE = re.compile(r"\d{8}T\d{6}\.\d{6}Z")
_legacy_seen: set[Path] = set()
_legacy_lock = threading.Lock()


def ensure_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename, a new file) to the disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems cannot fsync a directory; their renames are as
        # durable as they get.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str, mode: int = 0o600, durable: bool = True) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a
    file. `durable` also flushes the file before the rename and the directory
    after it (survives a power cut, not only a killed process)."""
    try:
        _write_then_rename(path, text, mode, durable)
    except OSError as exc:
        # Disk full, read-only, permissions: one line naming the directory.
        raise storage_error(exc, path.parent) from None


def _write_then_rename(path: Path, text: str, mode: int, durable: bool) -> None:
    if not path.parent.is_dir():
        ensure_private_dir(path.parent)
        if durable:
            fsync_dir(path.parent.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def remove_temp_files(directory: Path) -> int:
    """Delete what a process killed mid-write left (`.<name>.<random>`, never
    renamed into place, so never a complete file). Returns how many."""
    removed = 0
    for tmp in directory.glob(".*.json.*"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


# --- records -----------------------------------------------------------------


def canonical_json(body: Any) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def _digest(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()


def encode_record(kind: str, body: dict[str, Any]) -> str:
    """The envelope's text; the body serialised once, canonically."""
    canonical = canonical_json(body)
    head = json.dumps({"format": f"vfl/{kind}", "version": RECORD_VERSION, "sha256": _digest(canonical)})
    return f'{head[:-1]}, "body": {canonical}}}\n'


def write_record(path: Path, kind: str, body: dict[str, Any], durable: bool = True, mode: int = 0o600) -> None:
    atomic_write_text(path, encode_record(kind, body), mode=mode, durable=durable)


def read_record(path: Path, kind: str) -> dict[str, Any]:
    """The body of the record of `kind` at `path` (a legacy plain-JSON file:
    all of it). FileNotFoundError if there is none; DamagedFile if it fails
    a check."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        if exc.errno == errno.EIO:
            raise DamagedFile(path, "unreadable (I/O error)") from None
        raise
    return decode_record(raw, path, kind)


def decode_record(raw: bytes, path: Path, kind: str) -> dict[str, Any]:
    expected = f"vfl/{kind}"
    if not raw.strip():
        raise DamagedFile(path, "empty file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedFile(path, "garbled: not UTF-8 text") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        # Every record ends with its closing brace: a text that does not (or
        # that ends inside a value) was cut short.
        end = text.rstrip()
        if exc.pos >= len(end) or not end.endswith("}"):
            raise DamagedFile(path, "truncated: the JSON ends early") from None
        raise DamagedFile(path, f"not valid JSON at line {exc.lineno}, column {exc.colno}") from None
    except (ValueError, RecursionError):
        raise DamagedFile(path, "not valid JSON") from None
    if not isinstance(doc, dict):
        raise DamagedFile(path, f"not a {expected} record (expected a JSON object)")
    if not any(k in doc for k in _ENVELOPE_KEYS):
        _note_legacy(path, kind)
        return doc
    fmt = doc.get("format")
    if fmt != expected:
        # The field is ours, not the payload's; still, only a well-formed name is echoed.
        seen = f"is {fmt!r}" if isinstance(fmt, str) and _FORMAT_RE.fullmatch(fmt) else "is missing or garbled"
        raise DamagedFile(path, f"wrong format: expected {expected!r}, the format field {seen}")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise DamagedFile(path, "the version field is not an integer")
    if not 1 <= version <= RECORD_VERSION:
        raise DamagedFile(path, f"unknown version {version}; this build reads versions up to {RECORD_VERSION}")
    recorded, body = doc.get("sha256"), doc.get("body")
    if not isinstance(recorded, str) or not _HEX64_RE.fullmatch(recorded):
        raise DamagedFile(path, "the sha256 field is missing or not 64 hex digits")
    if not isinstance(body, dict):
        raise DamagedFile(path, "the body field is missing or not a JSON object")
    if not hmac.compare_digest(_digest(canonical_json(body)), recorded):
        raise DamagedFile(path, "checksum mismatch")
    return body


def _note_legacy(path: Path, kind: str) -> None:
    with _legacy_lock:
        if path in _legacy_seen:
            return
        _legacy_seen.add(path)
    log.info("event=legacy_file path=%s kind=%s version=0: plain JSON without format or checksum", path, kind)


# --- quarantine ----------------------------------------------------------------


def relative_name(path: Path, data_dir: Path) -> str:
    """`path` as the operator finds it under VFL_DATA_DIR (e.g. models/m.json)."""
    try:
        return str(path.relative_to(data_dir))
    except ValueError:
        return str(path)


def quarantine(path: Path, data_dir: Path, reason: str) -> Path:
    """Move a damaged file to <data_dir>/quarantine/<name>.<UTC timestamp>
    (owner-only), durably. A file another thread moved already: its newest
    quarantined copy."""
    qdir = data_dir / QUARANTINE_DIR
    stamp = datetime.datetime.now(datetime.UTC).strftime(_STAMP_FORMAT)
    dest = qdir / f"{path.name}.{stamp}"
    try:
        ensure_private_dir(qdir)
        try:
            os.replace(path, dest)
        except FileNotFoundError:
            moved = quarantined_copy(path, data_dir)
            if moved is None:
                raise
            return moved
        fsync_dir(path.parent)
        fsync_dir(qdir)
    except OSError as exc:
        raise storage_error(exc, qdir) from None
    log.warning(
        "event=file_quarantined path=%s to=%s reason=%r",
        relative_name(path, data_dir),
        relative_name(dest, data_dir),
        reason,
    )
    return dest


def quarantined_copy(path: Path, data_dir: Path) -> Path | None:
    """The newest quarantined copy of `path`, if any (timestamps sort)."""
    prefix = f"{path.name}."
    copies = sorted(
        p
        for p in (data_dir / QUARANTINE_DIR).glob(f"{glob.escape(prefix)}*")
        if _STAMP_RE.fullmatch(p.name.removeprefix(prefix))
    )
    return copies[-1] if copies else None
