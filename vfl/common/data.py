"""CSV loading, id alignment and per-party standardisation."""

from __future__ import annotations

import csv
import math
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

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
# What a bad cell of the fast readers is told it should have been.
FEATURE_EXPECTED = "expected a finite number"
LABEL_EXPECTED = f"expected a label (0 or 1, or a number within +-{LABEL_BOUND:g})"


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

    def unscaled(self, w: np.ndarray, b: float) -> tuple[np.ndarray, float]:
        """Weights and intercept on the raw features with the same linear form:
        w . (x - mean) / scale + b = (w / scale) . x + (b - w . mean / scale)."""
        raw = np.asarray(w, dtype=np.float64) / self.scale
        return raw, float(b) - float(raw @ self.mean)

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


# --- large tables: pyarrow, in chunks ----------------------------------------

FEATURE_DTYPES = ("float64", "float32")
PARQUET_SUFFIXES = (".parquet", ".pq")
CHUNK_ROWS = 65_536
_CSV_BLOCK_BYTES = 16 << 20


def load_party_table(
    path: Path,
    id_column: str = "id",
    label_column: str | None = None,
    option: str = "VFL_DATA_CSV",
    dtype: str = "float64",
) -> PartyData:
    """A party's table from CSV or Parquet (by suffix), read through pyarrow in
    chunks into one preallocated feature array of `dtype`: peak memory is the
    array and the ids, not a copy of the file. The same checks as
    load_party_csv; for a CSV that pyarrow's reader or a check refuses, the
    file is read again by load_party_csv, whose message names the line."""
    if dtype not in FEATURE_DTYPES:
        raise ConfigError(f"{option}: feature dtype {dtype!r}, expected one of {FEATURE_DTYPES}")
    where = f"{option}: {path}"
    if not path.exists():
        raise ConfigError(f"{where}: no such file")
    if not path.is_file():
        raise ConfigError(f"{where}: not a regular file; expected a CSV or Parquet file")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return _load_parquet(path, id_column, label_column, where, np.dtype(dtype))
    try:
        return _load_csv_arrow(path, id_column, label_column, where, np.dtype(dtype))
    except (_SlowPath, ConfigError, OSError):
        data = load_party_csv(path, id_column, label_column, option)
        return PartyData(data.ids, data.features.astype(dtype, copy=False), data.feature_names, data.labels)


class _SlowPath(Exception):
    """The fast reader refused the file: let load_party_csv say where."""


def _count_lines(path: Path) -> int:
    count = 0
    with path.open("rb") as fh:
        while block := fh.read(_CSV_BLOCK_BYTES):
            count += block.count(b"\n")
    return count + 1


@dataclass
class _Filling:
    """The preallocated table being filled chunk by chunk."""

    where: str
    features: np.ndarray
    labels: np.ndarray | None
    ids: list[str] = field(default_factory=list)
    rows: int = 0

    def add(self, ids: list[str], feats: list[np.ndarray], labels: np.ndarray | None, names: list[str]) -> None:
        n, start = len(ids), self.rows
        if start + n > self.features.shape[0]:
            raise _SlowPath
        for j, col in enumerate(feats):
            _put(self.features[:, j], start, col, self.where, names[j], FEATURE_EXPECTED, np.inf)
        if self.labels is not None and labels is not None:
            _put(self.labels, start, labels, self.where, "label", LABEL_EXPECTED, LABEL_BOUND)
        self.ids.extend(ids)
        self.rows += n

    def result(self, names: list[str]) -> PartyData:
        if not self.rows:
            raise ConfigError(f"{self.where}: no data rows; expected at least one row")
        ids = self.ids
        if any(not i for i in ids):
            first = next(k for k, i in enumerate(ids) if not i)
            raise ConfigError(f"{self.where}: data row {first + 1}: empty id")
        data = PartyData(
            ids=ids,
            # A view of the filled rows: no copy (the unused tail is at most a few lines).
            features=self.features[: self.rows],
            feature_names=names,
            labels=self.labels[: self.rows] if self.labels is not None else None,
        )
        if len(data._index) != len(ids):
            seen: dict[str, int] = {}
            for k, i in enumerate(ids):
                if i in seen:
                    raise ConfigError(
                        f"{self.where}: data row {k + 1}: the id of data row {seen[i] + 1} again; expected unique ids"
                    )
                seen[i] = k
        return data


class _BadCell(ConfigError, _SlowPath):
    def __init__(self, where: str, row: int, column: str, expected: str) -> None:
        super().__init__(f"{where}: data row {row}, column {column!r}: {expected}")


def _columns(header: list[str], id_column: str, label_column: str | None, where: str) -> list[str]:
    if id_column not in header:
        raise ConfigError(f"{where}: id column {id_column!r} not in the columns {header}")
    if label_column is not None and label_column not in header:
        raise ConfigError(f"{where}: label column {label_column!r} not in the columns {header}")
    names = [h for h in header if h not in (id_column, label_column)]
    if not names:
        raise ConfigError(f"{where}: no feature columns besides {id_column!r}")
    return names


def _load_parquet(path: Path, id_column: str, label_column: str | None, where: str, dtype: np.dtype) -> PartyData:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # Read by buffered column chunks: pre-buffering would hold whole row groups' bytes at once.
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"{where}: not a readable Parquet file ({str(exc)[:120]})") from None
    schema = pf.schema_arrow
    names = _columns(list(schema.names), id_column, label_column, where)
    for name in [*names, *([label_column] if label_column else [])]:
        kind = schema.field(name).type
        if not (pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_boolean(kind)):
            raise ConfigError(f"{where}: column {name!r} is of type {kind}; expected numbers")
    n = pf.metadata.num_rows
    # Column by column: the reader then holds one column's chunk at a time,
    # not a row group of every column (a third of the peak at 10^6 x 20).
    features = np.empty((n, len(names)), dtype)
    labels = np.empty(n) if label_column else None
    for j, name in enumerate(names):
        _fill_column(pf, name, features[:, j], where, FEATURE_EXPECTED, np.inf)
    if label_column and labels is not None:
        _fill_column(pf, label_column, labels, where, LABEL_EXPECTED, LABEL_BOUND)
    ids: list[str] = []
    for batch in pf.iter_batches(batch_size=CHUNK_ROWS, columns=[id_column], use_threads=False):
        ids.extend("" if i is None else str(i).strip() for i in batch.column(0).to_pylist())
    pa.default_memory_pool().release_unused()  # the chunks' buffers, kept by the allocator otherwise
    fill = _Filling(where, features, labels, ids, n)
    return fill.result(names)


def _fill_column(pf: Any, name: str, out: np.ndarray, where: str, expected: str, bound: float) -> None:
    start = 0
    for batch in pf.iter_batches(batch_size=CHUNK_ROWS, columns=[name], use_threads=False):
        col = _float_column(batch.column(0))
        _put(out, start, col, where, name, expected, bound)
        start += len(col)


def _put(out: np.ndarray, start: int, col: np.ndarray, where: str, name: str, expected: str, bound: float) -> None:
    """out[start:] = col, or _BadCell naming the first value that is not finite
    or beyond +-bound, by its data row (1-based) and column."""
    bad = ~np.isfinite(col) | (np.abs(col) > bound)
    if bad.any():
        raise _BadCell(where, start + int(np.flatnonzero(bad)[0]) + 1, name, expected)
    out[start : start + len(col)] = col


def _float_column(column: Any) -> np.ndarray:
    # Nulls become NaN, which the finiteness check refuses with the row.
    return np.asarray(column.cast("float64").to_numpy(zero_copy_only=False), dtype=np.float64)


def _load_csv_arrow(path: Path, id_column: str, label_column: str | None, where: str, dtype: np.dtype) -> PartyData:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with path.open("rb") as fh:
        try:
            header = [h.strip() for h in next(csv.reader([fh.readline().decode("utf-8-sig")]))]
        except (StopIteration, UnicodeDecodeError, csv.Error):
            raise _SlowPath from None
    names = _columns(header, id_column, label_column, where)
    if len(set(header)) != len(header):
        raise _SlowPath
    types = {h: pa.float64() for h in header} | {id_column: pa.string()}
    n = _count_lines(path)
    fill = _Filling(where, np.empty((n, len(names)), dtype), np.empty(n) if label_column else None)
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES, column_names=header, skip_rows=1),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
        )
        for batch in reader:
            ids = [i.strip() for i in batch.column(id_column).to_pylist()]
            feats = [_float_column(batch.column(c)) for c in names]
            labels = _float_column(batch.column(label_column)) if label_column else None
            fill.add(ids, feats, labels, names)
    except (pa.ArrowException, UnicodeDecodeError):
        raise _SlowPath from None
    pa.default_memory_pool().release_unused()
    return fill.result(names)
