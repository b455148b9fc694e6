"""Running jobs on disk, so that a party killed mid-training resumes them.

Per job, under <data_dir>/jobs/: `<job>.setup.json`, written once when the
job starts (config, keys' fingerprints, the job's ids), and `<job>.state.json`,
rewritten atomically after every iteration (weights, iteration, what a
retried step needs replayed). Both are owner-only, like the model shards;
they hold no private key. Removed when the job ends.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from common.models import check_job_id
from common.storage import atomic_write_text

log = logging.getLogger("vfl.checkpoint")


class JobCheckpoints:
    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir / "jobs"

    def _path(self, job_id: str, kind: str) -> Path:
        return self._dir / f"{check_job_id(job_id)}.{kind}.json"

    def save_setup(self, job_id: str, setup: dict[str, Any]) -> None:
        atomic_write_text(self._path(job_id, "setup"), json.dumps(setup))

    def save_state(self, job_id: str, state: dict[str, Any], durable: bool = False) -> None:
        # Atomic (rename) but, by default, not fsynced, to keep a disk flush
        # off every training step: it survives a killed process. After a
        # power cut the parties may disagree on the iteration; the job then
        # fails with a clear error instead of resuming. `durable` is for the
        # counters that must survive anything (B's decryptions released).
        atomic_write_text(self._path(job_id, "state"), json.dumps(state), durable=durable)

    def remove(self, job_id: str) -> None:
        for kind in ("state", "setup"):
            self._path(job_id, kind).unlink(missing_ok=True)

    def load_all(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(setup, state) of every job that was running; a job with an
        unreadable checkpoint is logged and skipped, never half-restored."""
        out = []
        for setup_path in sorted(self._dir.glob("*.setup.json")):
            state_path = setup_path.with_name(setup_path.name.replace(".setup.json", ".state.json"))
            try:
                out.append((json.loads(setup_path.read_text()), json.loads(state_path.read_text())))
            except (OSError, ValueError) as exc:
                log.warning("event=checkpoint_unreadable path=%s error=%s", setup_path.name, type(exc).__name__)
        return out
