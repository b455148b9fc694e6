"""CSV loading, id alignment and per-party standardisation."""

from __future__ import annotations

import csv
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import ConfigError, FailedPrecondition, InvalidArgument


@dataclass(frozen=True)
class PartyData:
    """One party's columns: ids, features, and (at A only) 0/1 labels."""

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


def load_party_csv(path: Path, id_column: str = "id", label_column: str | None = None) -> PartyData:
    """Load a party's CSV: an id column, optionally a 0/1 label column, and any
    number of numeric feature columns (every other column)."""
    if not path.is_file():
        raise ConfigError(f"VFL_DATA_CSV: no such file {path}")
    # Streamed row by row into a flat float array: peak memory is the data
    # itself (8 bytes a value), not a list of strings per row.
    ids: list[str] = []
    values = array("d")
    label_values = array("d")
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ConfigError(f"{path}: empty file, expected a header row") from None
        if id_column not in header:
            raise ConfigError(f"{path}: id column {id_column!r} not in header {header}")
        if label_column is not None and label_column not in header:
            raise ConfigError(f"{path}: label column {label_column!r} not in header {header}")
        id_idx = header.index(id_column)
        label_idx = header.index(label_column) if label_column is not None else None
        feat_idx = [i for i in range(len(header)) if i not in (id_idx, label_idx)]
        if not feat_idx:
            raise ConfigError(f"{path}: no feature columns besides {id_column!r}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ConfigError(f"{path}: line {line} has {len(row)} fields, header has {len(header)}")
            ids.append(row[id_idx].strip())
            try:
                values.extend(float(row[i]) for i in feat_idx)
            except ValueError:
                raise ConfigError(f"{path}: line {line} has a non-numeric feature value") from None
            if label_idx is not None:
                value = row[label_idx].strip()
                if value not in ("0", "1", "0.0", "1.0"):
                    raise ConfigError(f"{path}: line {line}: label must be 0 or 1")
                label_values.append(float(value))
    feats = np.frombuffer(values, dtype=np.float64).reshape(len(ids), len(feat_idx)).copy()
    labels = np.frombuffer(label_values, dtype=np.float64).copy() if label_idx is not None else np.empty(0)
    if not np.all(np.isfinite(feats)):
        raise ConfigError(f"{path}: feature values must be finite (no NaN or infinity)")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: duplicate ids in column {id_column!r}")
    return PartyData(
        ids=ids,
        features=feats,
        feature_names=[header[i] for i in feat_idx],
        labels=labels if label_idx is not None else None,
    )


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


def check_ids(ids: list[str], what: str) -> None:
    if not ids:
        raise InvalidArgument(f"{what}: expected at least one id")
    if len(set(ids)) != len(ids):
        raise InvalidArgument(f"{what}: ids must be unique")
