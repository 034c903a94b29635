"""Reading an output folder: the latest committed run per source, the incremental index,
and compaction. Committed runs only (runs.Output and its manifests): a run in progress or
set aside is never seen.

    read_files / read_faces / read_tracks   whole tables (pandas or Arrow), one listing
    iter_latest                             the same, streamed in record batches (report)
    done_index                              what --incremental may skip
    compact                                 many committed runs -> one, readers see one view
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from fer_batch import sink
from fer_batch.runs import Output, new_run_id, now_iso, partition_run_id

SKIP_STATUSES = ("ok", "skipped")  # --incremental re-processes files that ended in error


def _output(out, endpoint_url) -> Output:
    return out if isinstance(out, Output) else Output(out, endpoint_url)


def table_dataset(out: Output, table: str, runs=None) -> pds.Dataset:
    """OUT/<table> (faces, files, tracks) as one dataset whose schema is the union of the
    schemas of its files (of the runs `runs`, default all). Runs of models with other
    classes have other class columns; pyarrow alone would take the first file's columns and
    drop the rest. Here every run's class probabilities are read, null in the rows of runs
    whose model lacks the class."""
    d = out.path(table)
    first = pds.dataset(d, filesystem=out.fs, format="parquet", partitioning="hive")
    frags = [f for f in first.get_fragments()
             if runs is None or any(partition_run_id(part) in runs
                                    for part in f.path.split("/"))]
    schemas = [f.physical_schema for f in frags]
    if len({tuple(zip(s.names, map(str, s.types))) for s in schemas}) <= 1 and runs is None:
        return first  # one schema: nothing to unify
    return pds.dataset(d, filesystem=out.fs, format="parquet", partitioning="hive",
                       schema=pa.unify_schemas([*schemas, pa.schema([
                           first.schema.field("run_id")])]))


def _read_committed(out: Output, table: str, runs: dict, columns=None) -> pa.Table | None:
    """Rows of `table` in the runs of one listing (`runs`), run_id as a string; None when
    there is no such run or table. A run committed after that listing is not read."""
    d = out.path(table)
    if not runs or not out.exists(d):
        return None
    ds = table_dataset(out, table)
    tbl = ds.to_table(columns=columns, filter=pc.field("run_id").isin(list(runs)))
    return tbl.set_column(tbl.schema.get_field_index("run_id"), "run_id",
                          pc.cast(tbl["run_id"], pa.string()))


def read_files(out_uri, *, latest: bool = True, endpoint_url: str | None = None,
               as_pandas: bool = False, runs: dict | None = None):
    """Files rows of committed runs. latest=True keeps, per source, the row of the most
    recent committed run that processed it (what --incremental compares against).

    out_uri: OUT (local or s3://) or an Output. runs: a committed_runs() listing to read
    (the report reads every table from one listing); default: list them now, once."""
    out = _output(out_uri, endpoint_url)
    runs = out.committed_runs() if runs is None else runs
    tbl = _read_committed(out, "files", runs)
    if tbl is None:
        tbl = sink.FILE_SCHEMA.empty_table().append_column("run_id", pa.array([], pa.string()))
    elif latest and tbl.num_rows:
        tbl = tbl.sort_by([("source", "ascending"), ("run_id", "descending")])
        src = tbl["source"].to_pylist()
        keep = [i for i in range(len(src)) if i == 0 or src[i] != src[i - 1]]
        tbl = tbl.take(keep)
    return tbl.to_pandas() if as_pandas else tbl


def _read_latest(out_uri, table: str, sort_keys, endpoint_url, as_pandas, columns,
                 runs: dict | None):
    """Rows of a committed table, keeping for each source only the run that produced its
    latest files row. Both tables are read from one listing of the committed runs: a commit
    or compaction landing in between cannot make the two disagree (and rows vanish)."""
    out = _output(out_uri, endpoint_url)
    runs = out.committed_runs() if runs is None else runs
    if columns is not None:  # the filter and the sort below need their keys
        columns = list(dict.fromkeys([*columns, *sort_keys, "run_id"]))
    tbl = _read_committed(out, table, runs, columns)
    if tbl is None:
        return None if not as_pandas else __import__("pandas").DataFrame()
    latest = read_files(out, runs=runs).select(["source", "run_id"])
    tbl = keep_latest(tbl, latest).sort_by([(k, "ascending") for k in sort_keys])
    if columns is None:  # runs written before the one layout: their classes moved into it
        tbl = sink.conform(tbl)
    return tbl.to_pandas() if as_pandas else tbl


def keep_latest(tbl: pa.Table, latest: pa.Table) -> pa.Table:
    """Rows of tbl whose (source, run_id) is in latest. A filter, not a join: Arrow's hash
    join cannot carry list columns such as tracks' segments."""
    key = lambda t: pc.binary_join_element_wise(t["source"], t["run_id"], "\x00")  # noqa: E731
    return tbl.filter(pc.is_in(key(tbl), value_set=key(latest)))


def read_faces(out_uri, *, endpoint_url: str | None = None, as_pandas: bool = False,
               columns=None, runs: dict | None = None):
    """Face rows of committed runs, keeping for each source only the run that produced its
    latest files row (a changed file re-annotated tonight replaces last night's faces).
    out_uri and runs as in read_files."""
    return _read_latest(out_uri, "faces", ("source", "frame_index", "face_index"),
                        endpoint_url, as_pandas, columns, runs)


def read_tracks(out_uri, *, endpoint_url: str | None = None, as_pandas: bool = False,
                columns=None, runs: dict | None = None):
    """Tracks rows (tracks.py) of committed runs, latest run per source, like read_faces."""
    return _read_latest(out_uri, "tracks", ("source", "track_id"), endpoint_url, as_pandas,
                        columns, runs)


def iter_latest(out_uri, table: str, *, columns, runs: dict | None = None, filter=None,
                batch_rows: int | None = None, endpoint_url: str | None = None):
    """Rows of a committed table as they stream from disk, latest run per source as in
    read_faces, without ever holding the table: yields pa.Table pieces of at most
    batch_rows rows (pyarrow's scan batches; default pyarrow's), in no particular order.
    Memory: one batch plus the files table's (source, run_id).

    columns: the columns to read (source and run_id are added, run_id as a string);
    filter: a pyarrow.dataset expression, pushed down to the scan (e.g. on source);
    out_uri and runs as in read_files."""
    out = _output(out_uri, endpoint_url)
    runs = out.committed_runs() if runs is None else runs
    d = out.path(table)
    if not runs or not out.exists(d):
        return
    latest = read_files(out, runs=runs).select(["source", "run_id"])
    where = pc.field("run_id").isin(list(runs))
    where = where if filter is None else where & filter
    ds = table_dataset(out, table)
    scan = dict(columns=list(dict.fromkeys([*columns, "source", "run_id"])), filter=where)
    if batch_rows is not None:
        scan["batch_size"] = batch_rows
    for batch in ds.to_batches(**scan):
        tbl = pa.Table.from_batches([batch])
        tbl = tbl.set_column(tbl.schema.get_field_index("run_id"), "run_id",
                             pc.cast(tbl["run_id"], pa.string()))
        tbl = keep_latest(tbl, latest)
        if tbl.num_rows:
            yield tbl


def done_index(out_uri: str, endpoint_url: str | None = None,
               files: pa.Table | None = None) -> dict[str, tuple]:
    """source -> (size_bytes, mtime_ns) for files --incremental may skip. files: the latest
    files rows when the caller has read them (read_files)."""
    tbl = read_files(out_uri, endpoint_url=endpoint_url) if files is None else files
    idx = {}
    for s, st, size, mt in zip(tbl["source"].to_pylist(), tbl["status"].to_pylist(),
                               tbl["size_bytes"].to_pylist(), tbl["mtime_ns"].to_pylist()):
        if st in SKIP_STATUSES:
            idx[s] = (size, mt)
    return idx


def labelled_by(files: pa.Table) -> dict[str, str]:
    """source -> model_id of the model that labelled its latest ok row (files: read_files)."""
    return {s: m for s, st, m in zip(files["source"].to_pylist(), files["status"].to_pylist(),
                                     files["model_id"].to_pylist()) if st == "ok"}


def _copy_latest(out: Output, ds, run_id: str, latest: pa.Table, dest: str,
                 table: str) -> int:
    """Stream the rows of run_id in ds (OUT/<table>) whose (source, run_id) is in latest into
    one Parquet file at dest, batch by batch (memory: one record batch, whatever the table's
    size), faces and tracks in the one layout (sink.conform). Returns the rows written (0: no
    file)."""
    writer, n = None, 0
    for batch in ds.to_batches(filter=pc.field("run_id") == run_id, batch_size=8192):
        part = pa.Table.from_batches([batch])
        part = part.set_column(part.schema.get_field_index("run_id"), "run_id",
                               pc.cast(part["run_id"], pa.string()))
        part = keep_latest(part, latest)  # a join cannot carry segments
        part = part.select([c for c in part.column_names if c != "run_id"])
        if part.num_rows == 0:
            continue
        if table != "files":  # an older layout's class columns: into the one layout
            part = sink.conform(part)
        if writer is None:
            out.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            writer = pq.ParquetWriter(dest, part.schema, filesystem=out.fs, compression="zstd")
        writer.write_table(part)
        n += part.num_rows
    if writer is not None:
        writer.close()
    return n


def compact(out_uri: str, endpoint_url: str | None = None) -> str:
    """Merge every committed run of OUT into one new run holding, per source, the rows of its
    latest run (what read_faces/read_files return). The new run commits before the old ones
    are removed, so readers always see one complete view. Returns a one-line summary."""
    out = Output(out_uri, endpoint_url)
    out.require_ours("compact")  # a missing or foreign folder: one line, nothing written
    rid = new_run_id()
    out.acquire(rid)
    try:
        out.recover()
        old = out.committed_runs()
        if len(old) < 2:
            return f"{out.uri}: {len(old)} committed run(s), nothing to compact"
        latest = read_files(out, runs=old).select(["source", "run_id"])
        live = [r for r in old if r in set(latest["run_id"].to_pylist())]
        stage = out.staging(rid)
        rows = {}
        for table in ("faces", "files", "tracks"):
            if not out.exists(out.path(table)):
                continue
            ds = table_dataset(out, table, live)  # one schema (of the rows that stay)
            for old_id in old:
                n = _copy_latest(out, ds, old_id, latest, f"{stage}/{table}/part-{old_id}.parquet",
                                 table)
                if n:
                    rows[table] = rows.get(table, 0) + n
        last = old[list(old)[-1]]
        classes = []  # every class of the models whose rows stay, first seen first
        for r in live:
            classes += [c for c in old[r].get("classes", []) if c not in classes]
        manifest = dict(run_id=rid, started=now_iso(), finished=now_iso(), compacted_from=list(old),
                        model_id=last.get("model_id"), classes=classes or last.get("classes"),
                        models=sorted({str(old[r].get("model_id")) for r in live}),
                        config=last.get("config"), rows=rows)
        out.commit_or_set_aside(rid, manifest)
        for old_id in old:  # manifest first: from here on the old run is invisible
            out.fs.delete_file(out.path("_runs", f"{old_id}.json"))
            for table in ("faces", "files", "tracks"):
                p = out.path(table, f"run_id={old_id}")
                if out.exists(p):
                    out.fs.delete_dir(p)
        return f"{out.uri}: compacted {len(old)} runs into run {rid} ({rows})"
    finally:
        out.release()
