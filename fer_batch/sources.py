"""Input URIs (local paths or s3://) -> file entries {uri, size_bytes, mtime_ns, media_type}.

Every file found under a SOURCE becomes exactly one entry. Files whose
extension is neither an image nor a video are kept as entries with
``status="skipped"`` so the files table can account for them. All I/O goes
through pyarrow's filesystem interface (``open_input``), so local disk and
S3 are the same code below the listing.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import os
import posixpath
import re
import stat
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
VIDEO_EXTS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm"})
MANIFEST_EXTS = frozenset({".txt", ".csv", ".lst"})  # a SOURCE file with these lists paths
MANIFEST_COLUMNS = ("uri", "path", "source")  # first CSV column found is the path
S3_MAX_ATTEMPTS = 8  # per request: 5xx, SlowDown, resets; AWS standard backoff: ~30 s in all
S3_PREFLIGHT_ATTEMPTS = 3  # pre-flight checks: a wrong endpoint fails in ~2 s, not ~60 s
S3_READ_MIN = 256 * 1024  # first ranged GET of a stream, bytes: a probe reads little
S3_READ_MAX = 8 * 1024 * 1024  # sequential GETs double up to this; AWS suggests 8-16 MB ranges
STAT_THREADS = 16  # parallel HEADs for the entries of a manifest (one request each on S3)
CREDENTIAL_PARAMS = frozenset({  # query keys that carry a secret (lower case): a URL with any
    "x-amz-signature", "x-amz-credential", "x-amz-security-token",  # S3 presigned (SigV4)
    "signature", "awsaccesskeyid",  # S3 presigned (SigV2)
    "x-goog-signature", "x-goog-credential", "googleaccessid",  # GCS signed URLs
    "sig",  # Azure SAS
    "token", "access_token", "security-token", "key", "api_key", "apikey", "auth"})
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # http://, https://, file://, s3://
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
                   "AWS_CONFIG_FILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


class SourceError(ValueError):
    """A SOURCE argument that cannot be listed (missing, unreadable, bad bucket)."""


def strip_credentials(uri: str) -> str:
    """uri without its query string when the query carries a credential (a presigned URL:
    X-Amz-Signature, X-Amz-Credential, Signature, AWSAccessKeyId, token, ...; see
    CREDENTIAL_PARAMS), so that no secret reaches the source column, a message or the
    report. Any other uri is returned unchanged (a file may be named 'what?.jpg')."""
    base, sep, query = uri.partition("?")
    if not sep:
        return uri
    keys = {part.partition("=")[0].strip().lower()
            for part in re.split(r"[&;]", query.split("#", 1)[0])}
    return base if keys & CREDENTIAL_PARAMS else uri


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


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint: --endpoint-url, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (the
    AWS SDKs' standard variables), else None (AWS itself)."""
    return (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def s3_filesystem(endpoint_url: str | None = None) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem; credentials and region come from the standard AWS chain.

    Credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY(/AWS_SESSION_TOKEN), else the
    profile AWS_PROFILE in ~/.aws/credentials and ~/.aws/config (SSO, credential_process,
    role_arn), else web identity (EKS IRSA), else the ECS container or EC2 instance role,
    all resolved by the AWS SDK inside pyarrow. The endpoint is ``s3_endpoint``; the region
    AWS_REGION, else AWS_DEFAULT_REGION, else the profile's, else us-east-1. Transient
    failures (5xx, SlowDown, connection resets, cut-off bodies) are retried with backoff,
    S3_MAX_ATTEMPTS tries per request. One filesystem is kept per setting and process.
    """
    return _s3_filesystem(*_s3_settings(endpoint_url), S3_MAX_ATTEMPTS)


def _s3_settings(endpoint_url: str | None) -> tuple:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    creds = hash(tuple(os.environ.get(k) for k in CREDENTIAL_VARS))  # new env, new client
    return s3_endpoint(endpoint_url), region, creds


@functools.lru_cache(maxsize=16)
def _s3_filesystem(endpoint: str | None, region: str | None, _creds: int,
                   attempts: int) -> pafs.S3FileSystem:
    kw = dict(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))
    if endpoint:
        scheme, _, host = endpoint.rstrip("/").partition("://")
        kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if region:
        kw["region"] = region
    return pafs.S3FileSystem(**kw)


def resolve(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    if is_s3(uri):
        return s3_filesystem(endpoint_url), uri[len("s3://"):]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


class RangeReader(io.RawIOBase):
    """A seekable read-only file over an S3 object, read with ranged GETs through pyarrow.

    Consecutive reads fetch growing ranges (S3_READ_MIN doubling up to S3_READ_MAX), so a
    decoder that reads 32 KiB at a time costs a few requests per 8 MiB instead of one per
    32 KiB, a probe of the header costs one small request, and memory stays bounded by two
    ranges whatever the object's size. A seek elsewhere (an MP4 index at the end) starts
    again from S3_READ_MIN and keeps the previous range, so jumping back costs nothing.
    """

    def __init__(self, f):
        self.f, self.length, self.pos = f, f.size(), 0
        self.ranges: list[tuple[int, bytes]] = []  # (start, data), most recent last
        self.next_size = S3_READ_MIN

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def size(self) -> int:
        return self.length

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        if base + offset < 0:
            raise OSError(f"negative seek position {base + offset}")
        self.pos = base + offset
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.length if n is None or n < 0 else min(self.length, self.pos + n)
        out = []
        while self.pos < end:
            hit = next(((s, d) for s, d in self.ranges if s <= self.pos < s + len(d)), None)
            if hit is None:
                hit = self._fetch(end)
                if not hit[1]:
                    break  # the object shrank since it was opened: end of file
            start, data = hit
            chunk = data[self.pos - start:end - start]
            out.append(chunk)
            self.pos += len(chunk)
        return b"".join(out)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def _fetch(self, end: int) -> tuple[int, bytes]:
        sequential = any(s + len(d) == self.pos for s, d in self.ranges)
        self.next_size = min(2 * self.next_size, S3_READ_MAX) if sequential else S3_READ_MIN
        size = min(max(self.next_size, end - self.pos), self.length - self.pos)
        hit = (self.pos, self.f.read_at(size, self.pos))
        self.ranges = [*self.ranges[-1:], hit]
        return hit

    def close(self) -> None:
        if not self.closed:
            self.f.close()
            self.ranges = []
        super().close()


def utf8_name(path: str) -> bool:
    """False for a local name that is not valid UTF-8 (its bad bytes are surrogates in str,
    PEP 383): pyarrow cannot pass such a name to the OS, Python's own open() can."""
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def open_input(uri: str, endpoint_url: str | None = None):
    """A seekable binary file for ``uri``: a local file, or a RangeReader over S3 (ranged
    GETs, never a whole download)."""
    fs, path = resolve(uri, endpoint_url)
    if not is_s3(uri) and not utf8_name(path):
        return open(path, "rb")
    f = fs.open_input_file(path)
    return RangeReader(f) if is_s3(uri) else f


@contextlib.contextmanager
def local_output(uri: str, endpoint_url: str | None = None):
    """A local folder to write an output folder's files into: uri itself when local
    (created), else a temporary folder whose files are copied under the s3:// uri when the
    block ends without an error (train's and evaluate's outputs; annotate writes through
    runs.Output)."""
    if not is_s3(uri):
        os.makedirs(uri, exist_ok=True)
        yield uri
        return
    import tempfile
    with tempfile.TemporaryDirectory(prefix="fer-batch-out-") as tmp:
        yield tmp
        fs, path = resolve(uri, endpoint_url)
        pafs.copy_files(tmp, path, destination_filesystem=fs)


class TooLargeError(ValueError):
    """A file over the size limit of a whole read (--max-image-bytes)."""


def read_bytes(uri: str, endpoint_url: str | None = None, max_bytes: int = 0) -> bytes:
    """The whole file. max_bytes > 0: refuse a larger one (TooLargeError) before reading it,
    and read no more than max_bytes + 1 bytes should it have grown since it was listed."""
    fs, path = resolve(uri, endpoint_url)
    if not is_s3(uri) and not utf8_name(path):
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
    else:
        f = fs.open_input_file(path)  # one GET of the whole object on S3
        size = f.size()
    with f:
        if max_bytes and size > max_bytes:
            raise TooLargeError(f"file is {size:,} bytes, over the limit of {max_bytes:,} "
                                "(--max-image-bytes): not read")
        data = f.read(max_bytes + 1) if max_bytes else f.read()
    if max_bytes and len(data) > max_bytes:
        raise TooLargeError(f"file grew past the limit of {max_bytes:,} bytes while read "
                            "(--max-image-bytes): not read")
    return data


# --- pre-flight: one clear message for a wrong bucket, endpoint or credentials

def redact(text: str) -> str:
    """text with the secret key and session token of the environment replaced by ***."""
    for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        v = os.environ.get(k)
        if v and len(v) >= 4:
            text = text.replace(v, "***")
    return text


def describe_credentials() -> str:
    """Where the AWS credential chain finds credentials, without the secret: e.g.
    "access key ...WXYZ from env". botocore's chain has the same order as pyarrow's SDK."""
    try:
        import botocore.session
        creds = botocore.session.get_session().get_credentials()
    except Exception as e:  # ProfileNotFound, a broken config file, ...
        return f"the AWS credential chain failed: {redact(str(e))}"
    if creds is None:
        return ("none found (looked for AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
                "in ~/.aws, web identity, container and instance roles)")
    return f"access key ...{(creds.access_key or '')[-4:]} from {creds.method}"


S3_ERROR_HINTS = {  # S3 error code -> what to fix
    "NoCredentials": "no AWS credentials were found, so requests went unsigned",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "InvalidAccessKeyId": "the access key is not known to this endpoint",
    "ExpiredToken": "the session token has expired; refresh the credentials",
    "AccessDenied": "access denied: these credentials lack permission (or are missing)",
    "NoSuchBucket": "the bucket does not exist",
    "PermanentRedirect": "the bucket is in another region: set AWS_REGION to its region",
    "AuthorizationHeaderMalformed": "the bucket is in another region: set AWS_REGION",
    "WrongRegion": "the bucket is in another region: set AWS_REGION to its region",
    "EndpointConnectionError": "cannot connect to the endpoint (--endpoint-url, "
                               "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL)",
}


def diagnose_s3(uri: str, endpoint_url: str | None = None) -> tuple[str, str] | None:
    """(error code, message) of one small ListObjectsV2 under ``uri``, made with boto3.

    pyarrow checks objects with HEAD requests, whose error answers have no body: a wrong
    secret, an unknown key and a missing permission all read ACCESS_DENIED there. A listing
    returns the server's error code. None when the listing works (the failure, if any, is
    specific to the object).
    """
    import boto3
    import botocore.config
    import botocore.exceptions
    bucket, _, key = uri[len("s3://"):].partition("/")
    config = botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=5,
                                    read_timeout=15)
    try:
        client = boto3.session.Session().client("s3", endpoint_url=s3_endpoint(endpoint_url),
                                                config=config)
        client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        region = client.head_bucket(Bucket=bucket)["ResponseMetadata"]["HTTPHeaders"].get(
            "x-amz-bucket-region")
        if region and client.meta.region_name not in (region, "aws-global"):
            return "WrongRegion", f"bucket {bucket} is in {region}"
    except botocore.exceptions.NoCredentialsError as e:
        return "NoCredentials", str(e)
    except botocore.exceptions.EndpointConnectionError as e:
        return "EndpointConnectionError", str(e)
    except botocore.exceptions.ClientError as e:
        err = e.response.get("Error", {})
        return str(err.get("Code", "")), str(err.get("Message", ""))
    except Exception as e:  # a malformed endpoint, a broken config file, ...
        return type(e).__name__, str(e)
    return None


def explain_s3_error(uri: str, error: Exception | str, endpoint_url: str | None = None) -> str:
    """One line for an S3 access failure: the likely cause, the endpoint, the region and
    where the credentials came from, then pyarrow's own message. Never contains a secret."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    found = diagnose_s3(uri, endpoint_url)
    if found:
        code, detail = found
        cause = S3_ERROR_HINTS.get(code, f"{code}: {detail}")
    else:
        cause = "the object cannot be read"
    endpoint = s3_endpoint(endpoint_url) or "AWS S3"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "not set"
    return redact(f"cannot access {uri}: {cause}. Endpoint {endpoint}, region {region}, "
                  f"credentials: {describe_credentials()}. ({text})")


def check_access(uri: str, endpoint_url: str | None = None, *, kind: str = "source") -> None:
    """Fail fast, before any work, when ``uri`` cannot be used.

    kind: "source" (must exist), "model" (must be a file) or "output" (on S3 its bucket
    must exist; folders are created). S3 requests here are tried S3_PREFLIGHT_ATTEMPTS
    times, so a wrong endpoint fails in seconds. Raises SourceError with one line that
    names the URI and the fix (bucket, endpoint, region or credentials on S3).
    """
    uri = strip_credentials(uri)  # checked (and named in messages) without its secret
    if not is_s3(uri):
        if kind != "output" and not os.path.exists(uri):
            raise SourceError(f"{kind} not found: {uri}")
        return
    fs = _s3_filesystem(*_s3_settings(endpoint_url), S3_PREFLIGHT_ATTEMPTS)
    path = uri[len("s3://"):].rstrip("/")
    bucket_name = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket_name if kind == "output" else path)
        bucket = fs.get_file_info(bucket_name) if info.type == pafs.FileType.NotFound else None
    except OSError as e:
        raise SourceError(explain_s3_error(uri, e, endpoint_url)) from None
    if bucket is not None and bucket.type == pafs.FileType.NotFound:
        raise SourceError(f"{kind} {uri}: bucket '{bucket_name}' does not exist at "
                          f"{s3_endpoint(endpoint_url) or 'AWS S3'} (or is not visible with "
                          f"credentials: {describe_credentials()})")
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"{kind} not found: {uri}")
    if kind == "model" and info.type != pafs.FileType.File:
        raise SourceError(f"model {uri} is a folder; pass the checkpoint file (model.pt)")


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
