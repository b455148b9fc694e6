"""Model shards: each party's half of a trained model, in its own storage."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from common.errors import InvalidArgument, NotFound
from common.storage import atomic_write_text

_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_job_id(job_id: str, what: str = "job_id") -> str:
    # fullmatch: "$" would also accept a trailing newline.
    if not _ID_RE.fullmatch(job_id) or job_id in (".", ".."):
        raise InvalidArgument(f"{what}: expected 1-64 characters of [A-Za-z0-9_.-], got {job_id[:80]!r}")
    return job_id


class ModelStore:
    """JSON shards under <data_dir>/models/<model_id>.json, written atomically."""

    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir / "models"

    def _path(self, model_id: str) -> Path:
        return self._dir / f"{check_job_id(model_id, 'model_id')}.json"

    def save(self, model_id: str, shard: dict[str, Any]) -> None:
        atomic_write_text(self._path(model_id), json.dumps(shard, indent=1))

    def load(self, model_id: str) -> dict[str, Any]:
        path = self._path(model_id)
        if not path.exists():
            raise NotFound(f"model_id: no model {model_id!r}")
        shard: dict[str, Any] = json.loads(path.read_text())
        return shard

    def exists(self, model_id: str) -> bool:
        return self._path(model_id).exists()

    def list_ids(self) -> list[str]:
        if not self._dir.exists():
            return []
        return sorted(p.stem for p in self._dir.glob("*.json"))
