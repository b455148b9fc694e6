"""The results file: a JSON list with one record per workload, case and backend.

A run of one workload replaces that workload's records and keeps the others,
so `make bench BENCH=breast` does not erase the sweep measured earlier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ORDER = ("primitives", "breast", "synthetic", "sweep", "psi", "parties", "poly5", "quality")

Record = dict[str, Any]


def load(path: Path) -> list[Record]:
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


def merge(existing: list[Record], workload: str, new: list[Record]) -> list[Record]:
    """Existing records of other workloads, then the new ones, in ORDER."""
    kept = [r for r in existing if r.get("name") != workload] + new
    rank = {name: i for i, name in enumerate(ORDER)}
    # sorted() is stable: within a workload the run order is kept.
    return sorted(kept, key=lambda r: rank.get(str(r.get("name")), len(ORDER)))


def save(path: Path, records: list[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(path)  # a run killed mid-write leaves the previous file intact
