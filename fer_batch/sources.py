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
import stat

import pyarrow.fs as pafs

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
VIDEO_EXTS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm"})
MANIFEST_EXTS = frozenset({".txt", ".csv", ".lst"})  # a SOURCE file with these lists paths
MANIFEST_COLUMNS = ("uri", "path", "source")  # first CSV column found is the path


class SourceError(ValueError):
    """A SOURCE argument that cannot be listed (missing, unreadable, bad bucket)."""


def media_type(path: str) -> str | None:
    """'image' or 'video' by extension (case-insensitive), else None."""
    ext = posixpath.splitext(path.lower())[1]
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    return None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem(endpoint_url: str | None = None) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem; credentials and region come from the standard AWS chain.

    The endpoint is the CLI's --endpoint-url, else AWS_ENDPOINT_URL_S3, else
    AWS_ENDPOINT_URL (the AWS SDKs' standard variables), else AWS itself.
    """
    endpoint = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    kw = dict(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=8))
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kw["region"] = region
    return pafs.S3FileSystem(**kw)


def resolve(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    if is_s3(uri):
        return s3_filesystem(endpoint_url), uri[len("s3://"):]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def open_input(uri: str, endpoint_url: str | None = None):
    """A seekable binary file for ``uri`` (S3 reads are ranged, never a whole download)."""
    fs, path = resolve(uri, endpoint_url)
    return fs.open_input_file(path)


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    with open_input(uri, endpoint_url) as f:
        return f.read()


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


def _walk_local(root: str):
    """Yield entries under a local folder; symlinks are followed once, loops are reported."""
    seen_dirs = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            real = os.path.realpath(folder)
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
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(child.path)
            elif stat.S_ISREG(st.st_mode):
                yield _entry(child.path, st.st_size, st.st_mtime_ns)
        stack.extend(reversed(subdirs))


def _walk(fs: pafs.FileSystem, path: str, scheme: str):
    if isinstance(fs, pafs.LocalFileSystem):
        yield from _walk_local(path)
        return
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    for info in sorted(infos, key=lambda i: i.path):
        if info.type == pafs.FileType.File and not info.path.endswith("/"):
            yield _entry(scheme + info.path, info.size, info.mtime_ns)


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
        if is_s3(p) or os.path.isabs(p):
            out.append(p)
        else:
            out.append(f"{base}/{p}" if is_s3(base) else os.path.join(base, p))
    return out


def _stat_one(uri: str, endpoint_url: str | None) -> dict:
    fs, path = resolve(uri, endpoint_url)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        return _entry(uri, None, None, f"cannot stat: {e}")
    if info.type == pafs.FileType.NotFound:
        return _entry(uri, None, None, "listed in a manifest but not found")
    return _entry(uri if is_s3(uri) else path, info.size, info.mtime_ns)


def list_files(sources, endpoint_url: str | None = None) -> list[dict]:
    """Expand SOURCE arguments into one entry per file.

    Parameters
    ----------
    sources: local paths or s3:// URIs of files, folders or manifests (.txt/.csv/.lst).
    endpoint_url: optional S3 endpoint (see ``s3_filesystem``).

    Returns
    -------
    list of dicts {uri, media_type ('image'|'video'|'other'), size_bytes, mtime_ns,
    status ('pending'|'skipped'|'error'), error}, sorted and without duplicates.

    Raises SourceError when a SOURCE itself does not exist or cannot be listed.
    """
    entries: dict[str, dict] = {}
    for src in sources:
        fs, path = resolve(src, endpoint_url)
        scheme = "s3://" if is_s3(src) else ""
        try:
            info = fs.get_file_info(path)
        except OSError as e:
            raise SourceError(f"cannot read source {src}: {e}") from None
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"source not found: {src}")
        if info.type == pafs.FileType.Directory:
            found = _walk(fs, path, scheme)
        elif posixpath.splitext(path.lower())[1] in MANIFEST_EXTS:
            try:
                found = (_stat_one(u, endpoint_url) for u in _read_manifest(src, endpoint_url))
            except (OSError, UnicodeDecodeError) as e:
                raise SourceError(f"cannot read manifest {src}: {e}") from None
        else:
            found = [_entry(scheme + path, info.size, info.mtime_ns)]
        for e in found:
            entries.setdefault(e["uri"], e)
    return sorted(entries.values(), key=lambda e: e["uri"])
