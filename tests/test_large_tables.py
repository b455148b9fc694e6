"""A party's table through pyarrow, in chunks (`load_party_table`): CSV and
Parquet give what the reference CSV reader gives, in float64 or float32; a
bad cell is one line naming the file, the row and the column; and the
memory a load takes is bounded by the data held, not by copies of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vfl.cli.main import BUNDLED_ACTIVE, BUNDLED_PASSIVE
from vfl.common.data import load_party_csv, load_party_table
from vfl.common.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _parquet(path: Path, columns: dict[str, object], row_group_size: int = 50) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def _as_parquet(csv_path: Path, out: Path) -> Path:
    data = load_party_csv(csv_path, "id", "y" if csv_path == BUNDLED_ACTIVE else None)
    cols: dict[str, object] = {"id": data.ids}
    cols |= {n: data.features[:, j] for j, n in enumerate(data.feature_names)}
    if data.labels is not None:
        cols["y"] = data.labels.astype(np.int64)
    return _parquet(out, cols)


@pytest.mark.parametrize("source", [BUNDLED_ACTIVE, BUNDLED_PASSIVE], ids=["active", "passive"])
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_table_is_the_reference_csv(tmp_path: Path, source: Path, fmt: str, dtype: str) -> None:
    label = "y" if source == BUNDLED_ACTIVE else None
    want = load_party_csv(source, "id", label)
    path = source if fmt == "csv" else _as_parquet(source, tmp_path / "t.parquet")
    got = load_party_table(path, "id", label, dtype=dtype)
    assert got.ids == want.ids
    assert got.feature_names == want.feature_names
    assert got.features.dtype == np.dtype(dtype)
    assert np.array_equal(got.features, want.features.astype(dtype))
    if label:
        assert got.labels is not None and want.labels is not None
        assert np.array_equal(got.labels, want.labels)
    assert got.positions(want.ids[:3], "ids").tolist() == [0, 1, 2]


def test_parquet_non_finite_cell_names_row_and_column(tmp_path: Path) -> None:
    x = np.arange(200, dtype=np.float64)
    x[137] = np.nan
    path = _parquet(tmp_path / "p.parquet", {"id": [str(i) for i in range(200)], "a": np.ones(200), "b": x})
    with pytest.raises(ConfigError, match=r"p\.parquet: data row 138, column 'b': expected a finite number"):
        load_party_table(path)


def test_parquet_duplicate_id_names_both_rows(tmp_path: Path) -> None:
    ids = [str(i) for i in range(120)]
    ids[99] = ids[7]
    path = _parquet(tmp_path / "p.parquet", {"id": ids, "a": np.ones(120)})
    with pytest.raises(ConfigError, match=r"data row 100: the id of data row 8 again"):
        load_party_table(path)


def test_parquet_text_feature_column_is_refused_by_name(tmp_path: Path) -> None:
    path = _parquet(tmp_path / "p.parquet", {"id": ["1", "2"], "a": ["x", "y"]})
    with pytest.raises(ConfigError, match=r"column 'a' is of type string; expected numbers"):
        load_party_table(path)


def test_parquet_missing_id_column_and_unreadable_file(tmp_path: Path) -> None:
    path = _parquet(tmp_path / "p.parquet", {"key": ["1", "2"], "a": [1.0, 2.0]})
    with pytest.raises(ConfigError, match=r"id column 'id' not in the columns \['key', 'a'\]"):
        load_party_table(path)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(ConfigError, match=r"junk\.parquet: not a readable Parquet file"):
        load_party_table(junk)


def test_csv_bad_cell_still_names_the_line(tmp_path: Path) -> None:
    lines = BUNDLED_PASSIVE.read_text().splitlines()
    cells = lines[3].split(",")
    cells[2] = "abc"
    lines[3] = ",".join(cells)
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"bad\.csv: line 4, column 'x1': expected a finite number, got 'abc'"):
        load_party_table(path)


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"feature dtype 'int8', expected one of"):
        load_party_table(BUNDLED_PASSIVE, dtype="int8")


def test_memory_of_a_parquet_load_is_bounded_by_the_data(tmp_path: Path) -> None:
    """200,000 x 20 from Parquet in a fresh process (pyarrow imported first):
    the peak resident memory the load adds stays within 1.25 x what it must
    hold (the float32 features, the id strings and their index) plus 40 MiB
    of reader buffers. Reading the whole table first, or a row group of every
    column at a time, breaks it."""
    rows = 200_000
    rng = np.random.default_rng(0)
    cols: dict[str, object] = {"id": [f"c{i:09d}" for i in range(rows)]}
    cols |= {f"x{j}": rng.standard_normal(rows) for j in range(20)}
    path = _parquet(tmp_path / "big.parquet", cols, row_group_size=65_536)
    probe = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "def hwm():\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "import pyarrow.parquet\n"
        "from vfl.common.data import load_party_table\n"
        "base = hwm()\n"
        f"d = load_party_table(Path({str(path)!r}), dtype='float32')\n"
        "held = d.features.nbytes + sum(sys.getsizeof(i) for i in d.ids) + sys.getsizeof(d.ids)\n"
        "held += sys.getsizeof(d._index) + sum(sys.getsizeof(v) for v in d._index.values())\n"
        "print(json.dumps({'added': hwm() - base, 'held': held}))\n"
    )
    got = json.loads(subprocess.check_output([sys.executable, "-c", probe], cwd=ROOT, text=True))
    assert got["added"] <= 1.25 * got["held"] + (40 << 20), got
