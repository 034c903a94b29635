"""runs.Output's staging clean-up and compaction work one file or one batch at a time, and
keep exactly the rows a whole-table computation keeps (issue 13, item 11)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fer_batch import finish, readers, runs, sink


def _files(sources, seconds) -> pa.Table:
    n = len(sources)
    cols = dict(source=list(sources), media_type=["image"] * n, status=["ok"] * n,
                error=[None] * n, size_bytes=[1] * n, mtime_ns=[1] * n, frames_decoded=[1] * n,
                faces=[0] * n, seconds=list(seconds), model_id=["m"] * n)
    return pa.table(cols, schema=sink.FILE_SCHEMA)


def test_dedup_keeps_first_rows_and_rewrites_only_files_with_duplicates(tmp_path):
    """Three staged parts, as three Ray tasks write them; a retried task wrote b and c again.
    The first copy of each key stays; the part without duplicates is not touched."""
    out = runs.Output(str(tmp_path / "out"))
    stage = out.staging("r1")
    empty = sink.FILE_SCHEMA.empty_table()
    parts = {"p1": _files(["a", "b"], [1, 2]), "p2": _files(["c"], [3]),
             "p3": _files(["b", "c", "d"], [20, 30, 4])}
    for name, tbl in parts.items():
        sink.write_tables(out.fs, stage, empty, tbl, name=name)
    untouched = Path(stage) / "files" / "part-p1.parquet"
    mtime = untouched.stat().st_mtime_ns

    assert finish.deduplicate(out, "r1") == 2
    got = pq.read_table(f"{stage}/files").to_pydict()
    assert sorted(zip(got["source"], got["seconds"])) == [("a", 1), ("b", 2), ("c", 3),
                                                          ("d", 4)]
    assert untouched.stat().st_mtime_ns == mtime
    assert finish.deduplicate(out, "r1") == 0  # idempotent


def test_copy_latest_streams_batches_into_one_file(tmp_path):
    """_copy_latest writes a run's latest rows batch by batch: more rows than one batch
    arrive whole and in order, and rows of sources a later run replaced are left out."""
    import pyarrow.dataset as pds
    root = tmp_path / "files"
    n = 20_000  # more than one 8192-row batch
    tbl = _files([f"s{i}" for i in range(n)], range(n))
    (root / "run_id=r1").mkdir(parents=True)
    pq.write_table(tbl, root / "run_id=r1" / "part-0.parquet", row_group_size=5000)
    latest = pa.table({"source": [f"s{i}" for i in range(n) if i % 3],
                       "run_id": ["r1"] * sum(1 for i in range(n) if i % 3)})
    ds = pds.dataset(str(root), format="parquet", partitioning="hive")
    out = runs.Output(str(tmp_path / "o"))
    written = readers._copy_latest(out, ds, "r1", latest, str(tmp_path / "o" / "part.parquet"),
                                   "files")
    got = pq.read_table(tmp_path / "o" / "part.parquet")
    assert written == got.num_rows == len(latest)
    assert got["source"].to_pylist() == latest["source"].to_pylist()
    assert "run_id" not in got.column_names
