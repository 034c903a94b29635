"""The output folder's commit protocol, the incremental index and the readers.

Layout of OUT (local path or s3://), documented in docs/output.md:

    OUT/faces/run_id=<RID>/part-*.parquet   committed face rows (hive partition run_id)
    OUT/files/run_id=<RID>/part-*.parquet   committed file rows
    OUT/_runs/<RID>.json                    run manifest; its presence = committed
    OUT/_staging/<RID>/{faces,files}/       a run in progress (invisible to readers)
    OUT/_staging/<RID>/READY.json           staging complete; commit may roll forward
    OUT/_lock                               held by the run in progress

A run writes only into its staging folder. When every file is accounted for it
writes READY.json, moves staging into faces/ and files/ (directory renames on
local disk, copies on S3) and writes the manifest last. ``read_faces`` and
``read_files`` only read runs with a manifest, and for each source only the
latest committed run that processed it. A run that died before READY leaves
only staging, which the next run deletes; one that died after READY is rolled
forward by the next run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import socket

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fer_batch import sink, sources

SKIP_STATUSES = ("ok", "skipped")  # --incremental re-processes files that ended in error


class LockedError(RuntimeError):
    """Another run holds OUT/_lock."""


def new_run_id() -> str:
    """Sortable by start time: 20261128T021745Z-3fa9c1."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Output:
    """An output folder: paths, the lock, staging, commit, recovery."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.uri = uri.rstrip("/")
        self.fs, self.root = sources.resolve(self.uri, endpoint_url)
        self.root = self.root.rstrip("/")

    def path(self, *parts) -> str:
        return "/".join([self.root, *parts])

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_json(self, path: str) -> dict:
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read())

    def write_json(self, path: str, obj: dict) -> None:
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
        self.fs.move(tmp, path)

    # --- lock: refuse concurrent runs into the same OUT
    def acquire(self, run_id: str, break_lock: bool = False) -> None:
        lock = self.path("_lock")
        self.fs.create_dir(self.root, recursive=True)
        if self.exists(lock) and not break_lock:
            held = self.read_json(lock)
            alive = held.get("host") != socket.gethostname() or _pid_alive(held.get("pid"))
            if alive:
                raise LockedError(
                    f"{self.uri} is in use by run {held.get('run_id')} (host {held.get('host')}, "
                    f"pid {held.get('pid')}, since {held.get('started')}). Concurrent runs into "
                    "one output are refused. If that run is dead, delete "
                    f"{self.uri}/_lock or pass --break-lock.")
        info = dict(run_id=run_id, host=socket.gethostname(), pid=os.getpid(), started=now_iso())
        if isinstance(self.fs, pafs.LocalFileSystem) and not break_lock:
            try:  # O_EXCL: two local runs cannot both take it
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, json.dumps(info).encode())
                os.close(fd)
                return
            except FileExistsError:
                os.remove(lock)  # a stale lock from a dead local process (checked above)
        self.write_json(lock, info)

    def release(self) -> None:
        try:
            self.fs.delete_file(self.path("_lock"))
        except (FileNotFoundError, OSError):
            pass

    # --- runs
    def committed_runs(self) -> dict[str, dict]:
        runs_dir = self.path("_runs")
        if not self.exists(runs_dir):
            return {}
        out = {}
        for info in self.fs.get_file_info(pafs.FileSelector(runs_dir)):
            if info.base_name.endswith(".json"):
                out[info.base_name[:-5]] = self.read_json(info.path)
        return dict(sorted(out.items()))

    def staging(self, run_id: str) -> str:
        return self.path("_staging", run_id)

    def recover(self) -> list[str]:
        """Roll forward commits that died after READY; delete dead runs' staging and any
        partition without a manifest. Returns what it did, one line each."""
        done = []
        staging_root = self.path("_staging")
        if self.exists(staging_root):
            for info in self.fs.get_file_info(pafs.FileSelector(staging_root)):
                rid = info.base_name
                if self.exists(f"{info.path}/READY.json"):
                    self.commit(rid, self.read_json(f"{info.path}/READY.json"))
                    done.append(f"rolled forward the commit of run {rid}")
                else:
                    self.fs.delete_dir(info.path)
                    done.append(f"discarded staging of unfinished run {rid}")
        committed = self.committed_runs()
        for table in ("faces", "files"):
            if not self.exists(self.path(table)):
                continue
            for info in self.fs.get_file_info(pafs.FileSelector(self.path(table))):
                rid = info.base_name.partition("run_id=")[2]
                if info.type == pafs.FileType.Directory and rid not in committed:
                    self.fs.delete_dir(info.path)
                    done.append(f"removed uncommitted {table}/run_id={rid}")
        return done

    def commit(self, run_id: str, manifest: dict) -> None:
        """Make a fully staged run visible: READY, move partitions, manifest last."""
        stage = self.staging(run_id)
        ready = f"{stage}/READY.json"
        if not self.exists(ready):
            self.write_json(ready, manifest)
        for table in ("faces", "files"):
            src, dst = f"{stage}/{table}", self.path(table, f"run_id={run_id}")
            if not self.exists(src):
                continue
            self.fs.create_dir(self.path(table), recursive=True)
            if isinstance(self.fs, pafs.LocalFileSystem) and not self.exists(dst):
                self.fs.move(src, dst)  # one rename: atomic on a local filesystem
            else:
                self.fs.create_dir(dst, recursive=True)
                for info in self.fs.get_file_info(pafs.FileSelector(src)):
                    self.fs.copy_file(info.path, f"{dst}/{info.base_name}")
                self.fs.delete_dir(src)
        self.write_json(self.path("_runs", f"{run_id}.json"), dict(manifest, state="committed",
                                                                    committed=now_iso()))
        self.fs.delete_dir(stage)

    def dedup_staged(self, run_id: str) -> int:
        """Drop rows written twice by retried Ray tasks (same key). Returns rows dropped."""
        dropped = 0
        for table, key in (("faces", sink.FACE_KEY), ("files", sink.FILE_KEY)):
            d = f"{self.staging(run_id)}/{table}"
            if not self.exists(d):
                continue
            ds = pds.dataset(d, filesystem=self.fs, format="parquet")
            keys = ds.to_table(columns=list(key))
            if keys.num_rows == 0:
                continue
            uniq = keys.group_by(list(key)).aggregate([]).num_rows
            if uniq == keys.num_rows:
                continue
            tbl = ds.to_table()
            tbl = tbl.append_column("_i", pa.array(range(tbl.num_rows)))
            first = tbl.group_by(list(key)).aggregate([("_i", "min")])["_i_min"]
            deduped = tbl.filter(pc.is_in(tbl["_i"], first)).drop_columns(["_i"])
            dropped += tbl.num_rows - deduped.num_rows
            for info in ds.files:
                self.fs.delete_file(info)
            pq.write_table(deduped, f"{d}/part-dedup.parquet", filesystem=self.fs,
                           compression="zstd")
        return dropped


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True


def _dataset(out: Output, table: str):
    runs = out.committed_runs()
    d = out.path(table)
    if not runs or not out.exists(d):
        return None, runs
    ds = pds.dataset(d, filesystem=out.fs, format="parquet", partitioning="hive")
    return ds, runs


def read_files(out_uri: str, *, latest: bool = True, endpoint_url: str | None = None,
               as_pandas: bool = False):
    """Files rows of committed runs. latest=True keeps, per source, the row of the most
    recent committed run that processed it (what --incremental compares against)."""
    out = Output(out_uri, endpoint_url)
    ds, runs = _dataset(out, "files")
    if ds is None:
        tbl = sink.FILE_SCHEMA.empty_table().append_column("run_id", pa.array([], pa.string()))
    else:
        tbl = ds.to_table(filter=pc.field("run_id").isin(list(runs)))
        tbl = tbl.set_column(tbl.schema.get_field_index("run_id"), "run_id",
                             pc.cast(tbl["run_id"], pa.string()))
        if latest and tbl.num_rows:
            tbl = tbl.sort_by([("source", "ascending"), ("run_id", "descending")])
            src = tbl["source"].to_pylist()
            keep = [i for i in range(len(src)) if i == 0 or src[i] != src[i - 1]]
            tbl = tbl.take(keep)
    return tbl.to_pandas() if as_pandas else tbl


def read_faces(out_uri: str, *, endpoint_url: str | None = None, as_pandas: bool = False,
               columns=None):
    """Face rows of committed runs, keeping for each source only the run that produced its
    latest files row (a changed file re-annotated tonight replaces last night's faces)."""
    out = Output(out_uri, endpoint_url)
    ds, runs = _dataset(out, "faces")
    if ds is None:
        return None if not as_pandas else __import__("pandas").DataFrame()
    latest = read_files(out_uri, endpoint_url=endpoint_url).select(["source", "run_id"])
    tbl = ds.to_table(columns=columns, filter=pc.field("run_id").isin(list(runs)))
    tbl = tbl.set_column(tbl.schema.get_field_index("run_id"), "run_id",
                         pc.cast(tbl["run_id"], pa.string()))
    tbl = tbl.join(latest, keys=["source", "run_id"], join_type="inner")
    tbl = tbl.sort_by([("source", "ascending"), ("frame_index", "ascending"),
                       ("face_index", "ascending")])
    return tbl.to_pandas() if as_pandas else tbl


def done_index(out_uri: str, endpoint_url: str | None = None) -> dict[str, tuple]:
    """source -> (size_bytes, mtime_ns) for files --incremental may skip."""
    tbl = read_files(out_uri, endpoint_url=endpoint_url)
    idx = {}
    for s, st, size, mt in zip(tbl["source"].to_pylist(), tbl["status"].to_pylist(),
                               tbl["size_bytes"].to_pylist(), tbl["mtime_ns"].to_pylist()):
        if st in SKIP_STATUSES:
            idx[s] = (size, mt)
    return idx
