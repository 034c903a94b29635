"""Input URIs (local paths or s3://) -> file entries {uri, size_bytes, mtime_ns, media_type}.

Every file found under a SOURCE becomes exactly one entry. Files whose
extension is neither an image nor a video are kept as entries with
``status="skipped"`` so the files table can account for them. All I/O goes
through pyarrow's filesystem interface (``open_input``), so local disk and
S3 are the same code below the listing.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re
import stat
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs

from fer_batch.storage import (SourceError, check_access, explain_s3_error, is_s3,
                               read_bytes, resolve, strip_credentials)

# every format decode.decode_image reads (docs/failures.md): an animated GIF gives its first
# frame, a multi-page TIFF its first page
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                        ".pnm", ".pgm", ".ppm", ".pbm"})
VIDEO_EXTS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm"})
MANIFEST_EXTS = frozenset({".txt", ".csv", ".lst"})  # a SOURCE file with these lists paths
MANIFEST_COLUMNS = ("uri", "path", "source")  # first CSV column found is the path
STAT_THREADS = 16  # parallel HEADs for the entries of a manifest (one request each on S3)
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # http://, https://, file://, s3://


def media_type(path: str) -> str | None:
    """'image' or 'video' by extension (case-insensitive), else None."""
    ext = posixpath.splitext(path.lower())[1]
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    return None


def _entry(uri: str, size: int | None, mtime_ns: int | None, error: str | None = None) -> dict:
    kind = media_type(uri)
    if error:
        status = "error"
    elif kind is None:
        status, error = "skipped", "not an image or video extension"
    else:
        status = "pending"
    return dict(uri=uri, media_type=kind or "other", size_bytes=size, mtime_ns=mtime_ns,
                status=status, error=error)


def _under(path: str, root: str) -> bool:
    """True when path is root or lies below it (both absolute, or both s3://)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def exclusion_roots(uris) -> tuple:
    """Real local paths and s3:// URIs (no trailing /) of folders to leave out of a listing."""
    return tuple(u.rstrip("/") if is_s3(u) else os.path.realpath(u) for u in uris if u)


def excluded(uri: str, roots) -> bool:
    """True when uri lies in one of ``exclusion_roots``' folders (symlinks resolved)."""
    if not roots:
        return False
    path = uri.rstrip("/") if is_s3(uri) else os.path.realpath(uri)
    return any(_under(path, r) for r in roots)


def _outside_link(path: str, tree: str) -> dict:
    """The skipped entry of a symlink that leaves the source tree (not followed)."""
    e = _entry(path, None, None)
    e.update(status="skipped", error=f"symlink to {os.path.realpath(path)}, outside the "
             "source folder: not followed (--follow-symlinks follows it)")
    return e


def _walk_local(root: str, skip: tuple = (), follow_symlinks: bool = False):
    """Yield entries under a local folder; symlinks within it are followed once, loops are
    reported. A symlink that leaves the folder is a skipped entry unless follow_symlinks
    (a link to / or to another user's files must not widen what a run reads). Folders under
    a path of skip (real paths) are not entered."""
    tree = os.path.realpath(root)
    seen_dirs = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            real = os.path.realpath(folder)
            if any(_under(real, r) for r in skip):
                continue
            if real in seen_dirs:
                yield _entry(folder, None, None, f"symlink loop: {folder} -> {real} already listed")
                continue
            seen_dirs.add(real)
            children = sorted(os.scandir(folder), key=lambda d: d.name)
        except OSError as e:
            yield _entry(folder, None, None, f"cannot list folder: {e.strerror or e}")
            continue
        subdirs = []
        for child in children:
            try:
                st = os.stat(child.path)  # follows symlinks
            except OSError as e:
                yield _entry(child.path, None, None, f"cannot stat: {e.strerror or e} "
                             "(broken symlink or vanished file)")
                continue
            if (not follow_symlinks and child.is_symlink()
                    and not _under(os.path.realpath(child.path), tree)):
                if not (skip and excluded(child.path, skip)):
                    yield _outside_link(child.path, tree)
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(child.path)
            elif stat.S_ISREG(st.st_mode):
                if skip and child.is_symlink() and excluded(child.path, skip):
                    continue
                yield _entry(child.path, st.st_size, st.st_mtime_ns)
            else:  # never opened: reading a FIFO would block the worker forever
                yield _entry(child.path, None, None, "not a regular file (FIFO, socket or "
                             "device): not read")
        stack.extend(reversed(subdirs))


def _walk(fs: pafs.FileSystem, path: str, scheme: str, skip: tuple = (),
          follow_symlinks: bool = False):
    if isinstance(fs, pafs.LocalFileSystem):
        yield from _walk_local(path, skip, follow_symlinks)
        return
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    for info in sorted(infos, key=lambda i: i.path):
        if info.type == pafs.FileType.File and not info.path.endswith("/"):
            if not any(_under(scheme + info.path, r) for r in skip):
                yield _entry(scheme + info.path, info.size, info.mtime_ns)


def _local_info(path: str):
    """get_file_info for a local path by os.stat, so a name that is not valid UTF-8 works:
    an object with .type, .size and .mtime_ns."""
    import types
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return types.SimpleNamespace(type=pafs.FileType.NotFound, size=None, mtime_ns=None)
    kind = pafs.FileType.Directory if stat.S_ISDIR(st.st_mode) else pafs.FileType.File
    return types.SimpleNamespace(type=kind, size=st.st_size, mtime_ns=st.st_mtime_ns)


def _read_manifest(uri: str, endpoint_url: str | None) -> list[str]:
    text = read_bytes(uri, endpoint_url).decode("utf-8-sig")
    base = uri.rsplit("/", 1)[0] if is_s3(uri) else os.path.dirname(os.path.abspath(uri))
    if uri.lower().endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
        cols = [c for c in MANIFEST_COLUMNS if rows and c in rows[0]]
        if rows and not cols:
            raise SourceError(f"manifest {uri}: no column named one of {MANIFEST_COLUMNS}")
        paths = [r[cols[0]].strip() for r in rows] if rows else []
    else:
        paths = [ln.strip() for ln in text.splitlines()]
    paths = [p for p in paths if p and not p.startswith("#")]
    out = []
    for p in paths:
        if URL_SCHEME.match(p) or os.path.isabs(p):
            out.append(p)
        else:
            out.append(f"{base}/{p}" if is_s3(base) else os.path.join(base, p))
    return out


def _manifest_entry(uri: str, manifest: str, endpoint_url: str | None) -> dict:
    """The entry of one manifest line: stat'ed when it names a file fer-batch may read,
    else an error entry that says why. A credential-bearing query string is dropped first
    (strip_credentials), so the secret is stored nowhere."""
    uri = strip_credentials(uri)
    if URL_SCHEME.match(uri) and not is_s3(uri):
        return _entry(uri, None, None, "a URL: fer-batch reads local paths and s3:// URIs "
                      "only (list the s3:// URI instead of a presigned or http link)")
    if is_s3(manifest) and not is_s3(uri):
        return _entry(uri, None, None, "a local path in an S3 manifest: not read (each "
                      "worker would read its own disk); list s3:// URIs or keys relative "
                      "to the manifest")
    return _stat_one(uri, endpoint_url)


def _stat_one(uri: str, endpoint_url: str | None) -> dict:
    fs, path = resolve(uri, endpoint_url)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        return _entry(uri, None, None, f"cannot stat: {e}")
    if info.type == pafs.FileType.NotFound:
        return _entry(uri, None, None, "listed in a manifest but not found")
    return _entry(uri if is_s3(uri) else path, info.size, info.mtime_ns)


def list_files(sources, endpoint_url: str | None = None, exclude=(),
               follow_symlinks: bool = False) -> list[dict]:
    """Expand SOURCE arguments into one entry per file.

    Parameters
    ----------
    sources: local paths or s3:// URIs of files, folders or manifests (.txt/.csv/.lst).
    endpoint_url: optional S3 endpoint (see ``s3_filesystem``).
    exclude: folders (local or s3://) whose files are left out, whichever SOURCE holds
        them: the run's own output folder when it lies inside a source folder.
    follow_symlinks: follow symlinks that leave a SOURCE folder (default: each is a
        skipped entry, the link not read).

    Returns
    -------
    list of dicts {uri, media_type ('image'|'video'|'other'), size_bytes, mtime_ns,
    status ('pending'|'skipped'|'error'), error}, sorted and without duplicates.

    Raises SourceError when a SOURCE itself does not exist or cannot be listed.
    """
    entries: dict[str, dict] = {}
    skip = exclusion_roots(exclude)
    for src in sources:
        if URL_SCHEME.match(src) and not is_s3(src):
            raise SourceError(f"source {strip_credentials(src)} is a URL: fer-batch reads "
                              "local paths and s3:// URIs only")
        src = strip_credentials(src)  # a presigned s3:// URI: its object, without the secret
        fs, path = resolve(src, endpoint_url)
        scheme = "s3://" if is_s3(src) else ""
        try:
            info = fs.get_file_info(path) if is_s3(src) else _local_info(path)
            if info.type == pafs.FileType.NotFound:
                check_access(src, endpoint_url)  # names a missing bucket; else "not found"
            if info.type == pafs.FileType.Directory:
                found = list(_walk(fs, path, scheme, skip, follow_symlinks))  # S3: paginated
            elif posixpath.splitext(path.lower())[1] in MANIFEST_EXTS:
                try:
                    uris = _read_manifest(src, endpoint_url)
                except UnicodeDecodeError as e:
                    raise SourceError(f"cannot read manifest {src}: {e}") from None
                with ThreadPoolExecutor(STAT_THREADS) as pool:  # one HEAD per entry on S3
                    found = list(pool.map(lambda u: _manifest_entry(u, src, endpoint_url),
                                          uris))
            else:
                found = [_entry(scheme + path, info.size, info.mtime_ns)]
            if skip and info.type != pafs.FileType.Directory:  # walks skip on their own
                found = [e for e in found if not excluded(e["uri"], skip)]
        except OSError as e:
            raise SourceError(explain_s3_error(src, e, endpoint_url) if is_s3(src) else
                              f"cannot read source {src}: {e}") from None
        for e in found:
            entries.setdefault(e["uri"], e)
    return sorted(entries.values(), key=lambda e: e["uri"])
