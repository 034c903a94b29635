"""The output folder's commit protocol (the readers are readers.py).

Layout of OUT (local path or s3://), documented in docs/output.md:

    OUT/faces/run_id=<RID>/part-*.parquet   committed face rows (hive partition run_id)
    OUT/files/run_id=<RID>/part-*.parquet   committed file rows
    OUT/tracks/run_id=<RID>/part-*.parquet  committed face tracks (tracks.py), one row each
    OUT/_runs/<RID>.json                    run manifest; its presence = committed
    OUT/_staging/<RID>/{faces,files}/       a run in progress (invisible to readers)
    OUT/_staging/<RID>/READY.json           staging complete; commit may roll forward
    OUT/_lock                               held by the run in progress
    OUT/_fer-batch.json                     marker: this folder is a fer-batch output
    OUT/_failed/<RID>/                      a run whose commit could not complete, set aside

fer-batch deletes and moves only what it wrote: names that match RUN_ID_PATTERN under
_staging/, faces/, files/ and tracks/, and its own markers. A non-empty folder without
the marker (or an older fer-batch layout) is refused as an output (``claim``).

A run writes only into its staging folder. When every file is accounted for and its
staged rows are final (finish.py: deduplicated, segments folded, faces tracked), it
writes READY.json, moves staging into faces/, files/ and tracks/ (directory renames on
local disk, copies on S3) and writes the manifest last. Readers (readers.py)
only read runs with a manifest, and for each source only the
latest committed run that processed it. A run that died before READY leaves
only staging, which the next run deletes; one that died after READY is rolled
forward by the next run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import socket
import time

import pyarrow.fs as pafs

from fer_batch import storage

RUN_ID_PATTERN = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")  # new_run_id(); nothing else is ours
MARKER = "_fer-batch.json"  # written into an output folder when fer-batch first uses it
MARKER_FORMAT = "fer-batch-output/1"
TABLES = ("faces", "files", "tracks")
LOCK_SETTLE_S = 1.0  # S3: wait before reading the lock back; a run racing us has written by then
IGNORED_NAMES = frozenset({".DS_Store", "Thumbs.db", "lost+found"})  # do not make a folder "used"


class LockedError(RuntimeError):
    """Another run holds OUT/_lock."""


class ForeignOutputError(ValueError):
    """The output folder holds files that fer-batch did not write."""


class CommitError(RuntimeError):
    """A staged run could not be committed; it was set aside under OUT/_failed/RID."""


def is_run_id(name: str) -> bool:
    """True for names new_run_id() makes (20261128T021745Z-3fa9c1), False for anything else."""
    return bool(RUN_ID_PATTERN.match(name))


def partition_run_id(name: str) -> str | None:
    """'run_id=RID' -> RID when RID is a run id; None for any other folder name."""
    key, sep, rid = name.partition("=")
    return rid if key == "run_id" and sep and is_run_id(rid) else None


def new_run_id() -> str:
    """Sortable by start time: 20261128T021745Z-3fa9c1."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Output:
    """An output folder: paths, the lock, staging, commit, recovery."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.uri = uri.rstrip("/")
        self.fs, self.root = storage.resolve(self.uri, endpoint_url)
        self.root = self.root.rstrip("/")
        self.lock_owner: str | None = None  # owner_id of OUT/_lock once acquire() took it
        self.is_local = not storage.is_s3(self.uri)  # local disk: O_EXCL and rename work

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

    # --- ownership: never work in a folder that fer-batch did not create
    def children(self, path: str | None = None) -> list:
        """FileInfo of the entries directly under path (default: the root); [] when it is
        absent or not a folder."""
        path = path or self.root
        if self.fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return [i for i in self.fs.get_file_info(pafs.FileSelector(path)) if i.base_name]

    def looks_like_ours(self) -> bool:
        """True when the folder has the marker, or the layout of an older fer-batch that
        wrote none: a manifest _runs/RID.json, a staging folder _staging/RID, or a partition
        faces|files|tracks/run_id=RID."""
        if self.exists(self.path(MARKER)):
            return True
        if any(i.base_name.endswith(".json") and is_run_id(i.base_name[:-5])
               for i in self.children(self.path("_runs"))):
            return True
        if any(is_run_id(i.base_name) for i in self.children(self.path("_staging"))):
            return True
        return any(partition_run_id(i.base_name) for t in TABLES
                   for i in self.children(self.path(t)))

    def check_ours(self) -> bool:
        """Raise ForeignOutputError for a non-empty folder that is not a fer-batch output.
        Returns True when the folder is ours already, False when it is new or empty."""
        if self.looks_like_ours():
            return True
        found = sorted(i.base_name for i in self.children() if i.base_name not in IGNORED_NAMES)
        if found:
            shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            raise ForeignOutputError(
                f"output {self.uri} is not empty ({shown}) and is not a fer-batch output (no "
                f"{MARKER}); fer-batch refuses to write into it so that nothing of yours is "
                "moved or deleted. Pass a new or empty folder as --output.")
        return False

    def require_ours(self, command: str) -> None:
        """For commands that read an existing output (report, compact): raise
        FileNotFoundError when the folder is missing, ForeignOutputError when it is not a
        fer-batch output, each one line naming the folder and the fix. Writes nothing."""
        if self.fs.get_file_info(self.root).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"{self.uri}: no such folder; `fer-batch {command}` "
                                    "takes the --output folder of `fer-batch annotate`")
        if not self.looks_like_ours():
            raise ForeignOutputError(f"{self.uri} is not a fer-batch output (no {MARKER}); "
                                     f"`fer-batch {command}` takes the --output folder of "
                                     "`fer-batch annotate`, and writes nothing elsewhere")

    def claim(self) -> None:
        """check_ours, then write the marker (once) so later runs know the folder is ours."""
        self.check_ours()
        if not self.exists(self.path(MARKER)):
            self.write_json(self.path(MARKER), dict(
                format=MARKER_FORMAT, created=now_iso(),
                note="written by fer-batch: this folder is a fer-batch output. fer-batch "
                     "deletes or moves only what it wrote here (run ids, staging, markers)."))

    # --- lock: refuse concurrent runs into the same OUT
    def acquire(self, run_id: str, break_lock: bool = False) -> None:
        """Take OUT/_lock for run_id, or raise LockedError naming the run that holds it.

        The lock names its owner (``owner_id``: run id, host, pid); only that owner releases
        it. Locally the lock is created with O_EXCL, and a stale one (its process is dead, or
        break_lock) is taken over by renaming it aside first: of two runs that both judge it
        stale, one rename succeeds and the other run is refused, and no run ever deletes a
        lock that another has just written. S3 has no exclusive create: the lock is written,
        read back after LOCK_SETTLE_S and kept only when it still names this run."""
        lock = self.path("_lock")
        self.claim()  # before the lock: a foreign folder is refused before anything is written
        held = self._read_lock() if self.exists(lock) else None
        if held is not None and not break_lock and _lock_alive(held):
            raise self._locked(held)
        info = dict(run_id=run_id, host=socket.gethostname(), pid=os.getpid(),
                    started=now_iso())
        info["owner"] = owner_id(info)
        if self.is_local:
            if held is not None:
                self._move_stale_lock(lock, held)
            if not _create_exclusive(lock, json.dumps(info).encode()):
                raise self._locked(self._read_lock())  # another run took it first
        else:
            self.write_json(lock, info)
            time.sleep(LOCK_SETTLE_S)  # a run that wrote just after us has written by now
            now = self._read_lock()
            if now.get("owner") != info["owner"]:
                raise self._locked(now)
        self.lock_owner = info["owner"]

    def _read_lock(self) -> dict:
        """The lock's JSON; a lock being written or damaged reads as held by an unknown run."""
        try:
            held = self.read_json(self.path("_lock"))
            return held if isinstance(held, dict) else {}
        except FileNotFoundError:
            return {"released": True}
        except (OSError, ValueError):
            return {}

    def _move_stale_lock(self, lock: str, stale: dict) -> None:
        """Rename the stale lock aside (atomic: one of several runs succeeds), check that what
        was moved is the lock judged stale, and delete it. Raise LockedError when another
        run took the lock over in between (its lock is put back)."""
        aside = f"{lock}.stale-{secrets.token_hex(4)}"
        try:
            os.rename(lock, aside)
        except FileNotFoundError:
            return  # another run moved it: the O_EXCL create decides who gets the lock
        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read() or b"{}")
        except (OSError, ValueError):
            moved = {}
        if owner_id(moved) != owner_id(stale):  # a live lock, written after we judged
            try:
                os.link(aside, lock)  # back in place, unless yet another lock is there
            except FileExistsError:
                pass
            os.remove(aside)
            raise self._locked(moved)
        os.remove(aside)

    def _locked(self, held: dict) -> LockedError:
        if not held:
            return LockedError(
                f"{self.uri}/_lock is being written or is damaged (not readable as a lock). "
                "If no run is using this output, delete it or pass --break-lock.")
        return LockedError(
            f"{self.uri} is in use by run {held.get('run_id')} (host {held.get('host')}, "
            f"pid {held.get('pid')}, since {held.get('started')}). Concurrent runs into "
            f"one output are refused. If that run is dead, delete {self.uri}/_lock or pass "
            "--break-lock.")

    def holds_lock(self) -> bool:
        """True when OUT/_lock still names this Output's owner (taken by ``acquire``)."""
        return self.lock_owner is not None and self._read_lock().get("owner") == self.lock_owner

    def release(self) -> None:
        """Delete OUT/_lock when this Output took it; a lock that names another owner (a run
        that broke ours with --break-lock) is left alone."""
        if not self.holds_lock():
            return
        try:
            self.fs.delete_file(self.path("_lock"))
        except (FileNotFoundError, OSError):
            pass
        self.lock_owner = None

    # --- runs
    def committed_runs(self) -> dict[str, dict]:
        out = {}
        for info in self.children(self.path("_runs")):
            if info.base_name.endswith(".json") and is_run_id(info.base_name[:-5]):
                out[info.base_name[:-5]] = self.read_json(info.path)
        return dict(sorted(out.items()))

    def staging(self, run_id: str) -> str:
        return self.path("_staging", run_id)

    def recover(self) -> list[str]:
        """Roll forward commits that died after READY; delete dead runs' staging and any
        partition without a manifest; set aside (``set_aside``) a commit that fails. Touches
        only names that match RUN_ID_PATTERN: anything else under OUT is left alone. Returns
        what it did, one line each."""
        done = []
        committed = self.committed_runs()
        for info in self.children(self.path("_staging")):
            rid = info.base_name
            if info.type != pafs.FileType.Directory or not is_run_id(rid):
                done.append(f"left alone _staging/{rid}: not written by fer-batch")
                continue
            if rid in committed:  # committed; died while deleting its staging
                self.fs.delete_dir(info.path)
                done.append(f"removed leftover staging of committed run {rid}")
            elif self.exists(f"{info.path}/READY.json"):
                try:
                    self.commit(rid, self.read_json(f"{info.path}/READY.json"))
                    done.append(f"rolled forward the commit of run {rid}")
                except Exception as e:  # noqa: BLE001 -- any cause: never retried forever
                    done.append(self.set_aside(rid, e))
            else:
                self.fs.delete_dir(info.path)
                done.append(f"discarded staging of unfinished run {rid}")
        committed = self.committed_runs()
        for table in TABLES:
            for info in self.children(self.path(table)):
                rid = partition_run_id(info.base_name)
                if info.type == pafs.FileType.Directory and rid and rid not in committed:
                    self.fs.delete_dir(info.path)
                    done.append(f"removed uncommitted {table}/run_id={rid}")
        return done

    def set_aside(self, run_id: str, error: BaseException) -> str:
        """Move a run whose commit failed out of the way: its staging and any partition it
        had already moved go to OUT/_failed/RID, with FAILED.json saying why. Readers and
        recovery never look there, so later runs are not held up by it. Returns one line."""
        failed = self.path("_failed", run_id)
        cause = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:500]}" \
            if str(error).strip() else type(error).__name__
        self.fs.create_dir(failed, recursive=True)
        moved = []
        if self.exists(self.staging(run_id)):
            move_dir(self.fs, self.staging(run_id), f"{failed}/staging")
            moved.append("staging")
        for table in TABLES:
            part = self.path(table, f"run_id={run_id}")
            if self.exists(part):
                move_dir(self.fs, part, f"{failed}/{table}")
                moved.append(f"{table}/run_id={run_id}")
        self.write_json(f"{failed}/FAILED.json", dict(
            run_id=run_id, error=cause, set_aside=now_iso(), moved=moved,
            hint="the commit of this run failed; its rows are kept here and readers ignore "
                 "them. Its files are processed again by the next run. Delete this folder "
                 "when you no longer need it."))
        return (f"set aside run {run_id}: its commit failed ({cause}); its staged rows are in "
                f"{self.uri}/_failed/{run_id} and later runs redo its files")

    def commit(self, run_id: str, manifest: dict) -> None:
        """Make a fully staged run visible: READY, move partitions, manifest last. Only moves
        and writes: what the rows become was settled before (finish.py), so a commit rolled
        forward after a crash moves the same rows. Raises
        LockedError, committing nothing, when this Output took the lock and another run has
        since taken it over (--break-lock): that run may have discarded our staging."""
        if self.lock_owner is not None and not self.holds_lock():
            held = self._read_lock()
            raise LockedError(f"{self.uri}/_lock was taken over by run {held.get('run_id')} "
                              f"(host {held.get('host')}, pid {held.get('pid')}) while run "
                              f"{run_id} was working; nothing of run {run_id} was committed. "
                              "Run the same command again when that run has finished.")
        stage = self.staging(run_id)
        ready = f"{stage}/READY.json"
        if not self.exists(ready):
            self.write_json(ready, manifest)
        for table in ("faces", "files", "tracks"):
            src, dst = f"{stage}/{table}", self.path(table, f"run_id={run_id}")
            if not self.exists(src):
                continue
            self.fs.create_dir(self.path(table), recursive=True)
            move_dir(self.fs, src, dst)
        self.write_json(self.path("_runs", f"{run_id}.json"), dict(manifest, state="committed",
                                                                    committed=now_iso()))
        self.fs.delete_dir(stage)

    def commit_or_set_aside(self, run_id: str, manifest: dict) -> None:
        """commit; when it fails, set the run aside (``set_aside``) and raise CommitError
        naming where its rows are, so no later run retries the same failing commit."""
        try:
            self.commit(run_id, manifest)
        except LockedError:  # the output is another run's now: leave it as that run has it
            raise
        except Exception as e:  # noqa: BLE001 -- any cause: the output must stay usable
            try:
                line = self.set_aside(run_id, e)
            except Exception:  # noqa: BLE001 -- the output itself is broken: report the cause
                raise e from None
            raise CommitError(f"{line}. Fix the cause and run the same command again.") from e


def move_dir(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Move folder src to dst: one rename on local disk when dst is new (atomic), else
    copy the files (S3 has no rename) and delete src."""
    if isinstance(fs, pafs.LocalFileSystem) and fs.get_file_info(dst).type == \
            pafs.FileType.NotFound:
        fs.move(src, dst)
        return
    fs.create_dir(dst, recursive=True)
    for info in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type == pafs.FileType.File:
            rel = info.path[len(src.rstrip("/")) + 1:]
            if "/" in rel:
                fs.create_dir(f"{dst}/{rel.rsplit('/', 1)[0]}", recursive=True)
            fs.copy_file(info.path, f"{dst}/{rel}")
    fs.delete_dir(src)


def owner_id(info: dict) -> str:
    """The lock owner of a lock's JSON: run id, host and pid (older locks carry no owner
    field; theirs is rebuilt from the same three)."""
    return info.get("owner") or f"{info.get('run_id')}/{info.get('host')}/{info.get('pid')}"


def _lock_alive(held: dict) -> bool:
    """False only for a lock that is known to be stale: written on this host by a process
    that no longer exists, or gone. A lock from another host, or one that cannot be read,
    counts as held (--break-lock takes it over)."""
    if held.get("released"):
        return False
    if not held:
        return True
    return held.get("host") != socket.gethostname() or _pid_alive(held.get("pid"))


def _create_exclusive(path: str, data: bytes) -> bool:
    """Create path holding data; False when it exists (O_EXCL: one of several runs wins)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return True


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
