"""Atomic, owner-only files in a party's data directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from common.oserrors import storage_error


def ensure_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def atomic_write_text(path: Path, text: str, mode: int = 0o600, durable: bool = True) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a
    file. `durable` also flushes to the disk before the rename (survives a
    power cut, not only a killed process); per-iteration checkpoints skip
    that, which keeps it off every training step."""
    try:
        _write_then_rename(path, text, mode, durable)
    except OSError as exc:
        # Disk full, read-only, permissions: one line naming the directory.
        raise storage_error(exc, path.parent) from None


def _write_then_rename(path: Path, text: str, mode: int, durable: bool) -> None:
    if not path.parent.is_dir():
        ensure_private_dir(path.parent)
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
