"""CSV loading, id alignment and per-party standardisation."""

from __future__ import annotations

import csv
import math
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from vfl.common.errors import ConfigError, FailedPrecondition, InvalidArgument


@dataclass(frozen=True)
class PartyData:
    """One party's columns: ids, features, and (at A only) labels: 0/1 for
    logistic regression, any numbers within LABEL_BOUND for linear."""

    ids: list[str]
    features: np.ndarray  # rows x features, float64
    feature_names: list[str]
    labels: np.ndarray | None = None
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({i: r for r, i in enumerate(self.ids)})

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    def positions(self, ids: list[str], what: str) -> np.ndarray:
        """Row positions of `ids`; refuses with the count of missing ids."""
        missing = [i for i in ids if i not in self._index]
        if missing:
            raise FailedPrecondition(f"{what}: {len(missing)} of {len(ids)} ids are not in this party's data")
        return np.fromiter((self._index[i] for i in ids), dtype=np.int64, count=len(ids))


# Labels beyond this would let A's residual share u_A - y leave the
# fixed-point range every homomorphic sum is bounded by.
LABEL_BOUND = 2.0**16


def _text_lines(fh: BinaryIO, where: str) -> Iterator[str]:
    """The file's lines decoded as UTF-8 one by one, so that a bad byte is
    reported with its line (a BOM at the start is dropped)."""
    for line, raw in enumerate(fh, start=1):
        if b"\0" in raw:
            raise ConfigError(f"{where}: line {line}: binary data (a NUL byte); expected a UTF-8 CSV text file")
        try:
            yield raw.decode("utf-8-sig" if line == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{where}: line {line}, byte {exc.start + 1}: not UTF-8 text (0x{raw[exc.start]:02x}); "
                "expected a UTF-8 CSV"
            ) from None


def _shown(cell: str) -> str:
    """A cell for a message: the party's own file, shown to its own
    operator, shortened."""
    text = cell.strip()
    if not text:
        return "an empty cell"
    return repr(text if len(text) <= 24 else text[:21] + "...")


def _bad_feature(cell: str) -> str:
    try:
        float(cell)
    except ValueError:
        return f"got {_shown(cell)}"
    return f"got {_shown(cell)}, which is not finite"


def load_party_csv(
    path: Path, id_column: str = "id", label_column: str | None = None, option: str = "VFL_DATA_CSV"
) -> PartyData:
    """Load a party's CSV: an id column, optionally a 0/1 label column, and any
    number of numeric feature columns (every other column). A problem is one
    ConfigError naming `option`, the file, the line and the column."""
    where = f"{option}: {path}"
    if not path.exists():
        raise ConfigError(f"{where}: no such file")
    if not path.is_file():
        raise ConfigError(f"{where}: not a regular file; expected a CSV file")
    # Streamed row by row into a flat float array: peak memory is the data
    # itself (8 bytes a value), not a list of strings per row.
    ids: list[str] = []
    values = array("d")
    label_values = array("d")
    first_line: dict[str, int] = {}
    try:
        fh = path.open("rb")
    except PermissionError:
        raise ConfigError(f"{where}: permission denied; expected a file this service's user can read") from None
    with fh:
        reader = csv.reader(_text_lines(fh, where))
        try:
            header = [h.strip() for h in next(reader)]
            if id_column not in header:
                raise ConfigError(f"{where}: line 1: id column {id_column!r} not in header {header}")
            if label_column is not None and label_column not in header:
                raise ConfigError(f"{where}: line 1: label column {label_column!r} not in header {header}")
            id_idx = header.index(id_column)
            label_idx = header.index(label_column) if label_column is not None else None
            feat_idx = [i for i in range(len(header)) if i not in (id_idx, label_idx)]
            if not feat_idx:
                raise ConfigError(f"{where}: line 1: no feature columns besides {id_column!r}")
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    raise ConfigError(
                        f"{where}: line {line}: {len(row)} fields, expected {len(header)} as in the header"
                    )
                row_id = row[id_idx].strip()
                if not row_id:
                    raise ConfigError(f"{where}: line {line}, column {id_column!r}: empty id")
                if row_id in first_line:
                    raise ConfigError(
                        f"{where}: line {line}, column {id_column!r}: the id of line {first_line[row_id]} again; "
                        "expected unique ids"
                    )
                first_line[row_id] = line
                ids.append(row_id)
                try:
                    cells = [float(row[i]) for i in feat_idx]
                    if not all(map(math.isfinite, cells)):
                        raise ValueError
                except ValueError:
                    col = next(i for i in feat_idx if not _finite(row[i]))
                    why = _bad_feature(row[col])
                    raise ConfigError(
                        f"{where}: line {line}, column {header[col]!r}: expected a finite number, {why}"
                    ) from None
                values.extend(cells)
                if label_idx is not None:
                    value = row[label_idx].strip()
                    if not _finite(value) or abs(float(value)) > LABEL_BOUND:
                        raise ConfigError(
                            f"{where}: line {line}, column {label_column!r}: expected a label (0 or 1, or a number "
                            f"within +-{LABEL_BOUND:g} for linear regression), got {_shown(value)}"
                        )
                    label_values.append(float(value))
        except StopIteration:
            raise ConfigError(f"{where}: empty file; expected a header row") from None
        except csv.Error as exc:
            raise ConfigError(f"{where}: line {reader.line_num}: not valid CSV ({exc})") from None
    if not ids:
        raise ConfigError(f"{where}: a header and no data rows; expected at least one row")
    feats = np.frombuffer(values, dtype=np.float64).reshape(len(ids), len(feat_idx)).copy()
    labels = np.frombuffer(label_values, dtype=np.float64).copy() if label_idx is not None else np.empty(0)
    return PartyData(
        ids=ids,
        features=feats,
        feature_names=[header[i] for i in feat_idx],
        labels=labels if label_idx is not None else None,
    )


def read_id_column(path: Path, id_column: str, option: str) -> list[str]:
    """The ids of a CSV with an id column (other columns ignored), checked as
    load_party_csv checks a party's file."""
    where = f"{option}: {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file")
    with path.open("rb") as fh:
        reader = csv.reader(_text_lines(fh, where))
        try:
            header = [h.strip() for h in next(reader, [])]
            if id_column not in header:
                raise ConfigError(f"{where}: line 1: id column {id_column!r} not in header {header}")
            col = header.index(id_column)
            ids = [row[col].strip() for row in reader if row]
        except IndexError:
            raise ConfigError(f"{where}: line {reader.line_num}: fewer fields than the header") from None
        except csv.Error as exc:
            raise ConfigError(f"{where}: line {reader.line_num}: not valid CSV ({exc})") from None
    if not ids:
        raise ConfigError(f"{where}: no ids; expected at least one row")
    return ids


def _finite(cell: str) -> bool:
    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


@dataclass(frozen=True)
class Scaler:
    """Per-party standardisation with the party's own training statistics."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, enabled: bool = True) -> Scaler:
        if not enabled:
            return cls(np.zeros(x.shape[1]), np.ones(x.shape[1]))
        std = x.std(axis=0)
        return cls(x.mean(axis=0), np.where(std > 0, std, 1.0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        if x.shape[1] != self.mean.shape[0]:
            raise FailedPrecondition(
                f"features: the model expects {self.mean.shape[0]} features, the data has {x.shape[1]}"
            )
        return np.asarray((x - self.mean) / self.scale, dtype=np.float64)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> Scaler:
        return cls(np.array(d["mean"], dtype=np.float64), np.array(d["scale"], dtype=np.float64))


def check_ids(ids: Sequence[str], what: str) -> None:
    """At least one id, none empty, each listed once; the message counts
    them and names the first position, never an id."""
    if not ids:
        raise InvalidArgument(f"{what}: expected at least one id")
    empty = [k for k, i in enumerate(ids) if not i]
    if empty:
        raise InvalidArgument(f"{what}: {len(empty)} empty ids (the first at position {empty[0]})")
    if len(set(ids)) != len(ids):
        first: dict[str, int] = {}
        repeated = [k for k, i in enumerate(ids) if first.setdefault(i, k) != k]
        raise InvalidArgument(
            f"{what}: {len(repeated)} ids are listed more than once (the first repeat at position {repeated[0]})"
        )
