"""Model shards: each party's half of a trained model, in its own storage."""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

from vfl.common.errors import DamagedFile, InvalidArgument, NotFound
from vfl.common.storage import quarantine, quarantined_copy, read_record, relative_name, write_record

log = logging.getLogger("vfl.models")

_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
KIND = "model"


def check_job_id(job_id: str, what: str = "job_id") -> str:
    # fullmatch: "$" would also accept a trailing newline.
    if not _ID_RE.fullmatch(job_id) or job_id in (".", ".."):
        raise InvalidArgument(f"{what}: expected 1-64 characters of [A-Za-z0-9_.-], got {job_id[:80]!r}")
    return job_id


class ModelStore:
    """Checked records under <data_dir>/models/<model_id>.json, written
    atomically and durably. A damaged shard is moved to quarantine/ the
    first time it is read, and from then on refused with DATA_LOSS naming
    the model and where it went; the other shards are not affected."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._dir = data_dir / "models"
        self._quarantine_lock = threading.Lock()

    def _path(self, model_id: str) -> Path:
        return self._dir / f"{check_job_id(model_id, 'model_id')}.json"

    def save(self, model_id: str, shard: dict[str, Any]) -> None:
        write_record(self._path(model_id), KIND, shard)

    def load(self, model_id: str) -> dict[str, Any]:
        path = self._path(model_id)
        name = relative_name(path, self._data_dir)
        try:
            return read_record(path, KIND)
        except FileNotFoundError:
            moved = quarantined_copy(path, self._data_dir)
            if moved is None:
                raise NotFound(f"model_id: no model {model_id!r}") from None
            raise DamagedFile(
                path,
                "quarantined",
                f"model {model_id!r}: {name} was damaged and moved to {relative_name(moved, self._data_dir)}",
            ) from None
        except DamagedFile as exc:
            with self._quarantine_lock:
                moved = quarantine(path, self._data_dir, exc.reason)
            log.warning("event=model_damaged model=%s path=%s reason=%r", model_id, name, exc.reason)
            raise DamagedFile(
                path,
                exc.reason,
                f"model {model_id!r}: {name} is damaged ({exc.reason}); moved to "
                f"{relative_name(moved, self._data_dir)}",
            ) from None

    def load_all(self) -> list[dict[str, Any]]:
        """Every readable shard, sorted by id; a damaged one is quarantined
        and logged (by `load`) and left out, never failing the listing."""
        out = []
        for model_id in self.list_ids():
            try:
                out.append(self.load(model_id))
            except (DamagedFile, NotFound):
                continue
        return out

    def exists(self, model_id: str) -> bool:
        return self._path(model_id).exists()

    def list_ids(self) -> list[str]:
        if not self._dir.exists():
            return []
        # A foreign file whose name is no model id is not listed (nor read).
        stems = (p.stem for p in self._dir.glob("*.json"))
        return sorted(s for s in stems if _ID_RE.fullmatch(s) and s not in (".", ".."))
