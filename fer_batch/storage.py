"""Bytes in and out of local disk and S3, behind one interface (pyarrow's filesystems).

    resolve(uri) -> (filesystem, path)     local path or s3://bucket/key
    open_input / read_bytes                ranged reads (RangeReader on S3), size limits
    local_output                           a local folder that lands under an s3:// output
    check_access                           pre-flight: one clear message for a wrong bucket,
                                           endpoint or credentials, before Ray starts

Credentials come from the standard AWS chain (pyarrow's SDK, botocore for the messages);
secrets never appear in a message (``redact``).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os

import re

import pyarrow.fs as pafs

S3_MAX_ATTEMPTS = 8  # per request: 5xx, SlowDown, resets; AWS standard backoff: ~30 s in all
S3_PREFLIGHT_ATTEMPTS = 3  # pre-flight checks: a wrong endpoint fails in ~2 s, not ~60 s
S3_READ_MIN = 256 * 1024  # first ranged GET of a stream, bytes: a probe reads little
S3_READ_MAX = 8 * 1024 * 1024  # sequential GETs double up to this; AWS suggests 8-16 MB ranges
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
                   "AWS_CONFIG_FILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


CREDENTIAL_PARAMS = frozenset({  # query keys that carry a secret (lower case): a URL with any
    "x-amz-signature", "x-amz-credential", "x-amz-security-token",  # S3 presigned (SigV4)
    "signature", "awsaccesskeyid",  # S3 presigned (SigV2)
    "x-goog-signature", "x-goog-credential", "googleaccessid",  # GCS signed URLs
    "sig",  # Azure SAS
    "token", "access_token", "security-token", "key", "api_key", "apikey", "auth"})

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


# pyarrow reads a GetObject answer into a buffer the size of the range it asked for; an
# error answer with a longer body (S3's AccessDenied XML) overflows it, and the AWS SDK then
# reports only INTERNAL_FAILURE with this text, which it does not retry either.
MASKED_GET_ERROR = "Failed to flush response stream"


def get_range(uri: str, start: int, size: int, endpoint_url: str | None = None) -> bytes:
    """Bytes [start, start + size) of an S3 object, read with one ranged GET through boto3
    (the same credential chain and endpoint): what ``read_at`` falls back on when pyarrow's
    GetObject failed with MASKED_GET_ERROR. A transient failure then reads; a refusal raises
    OSError naming S3's own error, e.g. "AWS Error ACCESS_DENIED during GetObject operation
    (HTTP 403 AccessDenied: Access Denied)"."""
    import boto3
    import botocore.exceptions
    bucket, _, key = uri[len("s3://"):].partition("/")
    client = boto3.session.Session().client("s3", endpoint_url=s3_endpoint(endpoint_url))
    try:
        answer = client.get_object(Bucket=bucket, Key=key,
                                   Range=f"bytes={start}-{start + max(size, 1) - 1}")
        return answer["Body"].read()[:size]
    except botocore.exceptions.ClientError as e:
        err, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
        code = str(err.get("Code", "Unknown"))
        if code == "InvalidRange":  # a range at or past the end of the object (it shrank)
            return b""
        sdk_name = re.sub(r"(?<!^)(?=[A-Z])", "_", code).upper()  # AccessDenied -> ACCESS_DENIED
        raise OSError(redact(f"AWS Error {sdk_name} during GetObject operation (HTTP "
                             f"{meta.get('HTTPStatusCode', '?')} {code}: "
                             f"{err.get('Message', '')})")) from None


def read_at(f, uri: str, size: int, offset: int, endpoint_url: str | None = None) -> bytes:
    """f.read_at(size, offset) of a pyarrow S3 file, with S3's real answer when pyarrow
    masked it (MASKED_GET_ERROR): get_range asks again."""
    try:
        return f.read_at(size, offset)
    except OSError as e:
        if MASKED_GET_ERROR not in str(e):
            raise
        return get_range(uri, offset, size, endpoint_url)


class RangeReader(io.RawIOBase):
    """A seekable read-only file over an S3 object, read with ranged GETs through pyarrow.

    Consecutive reads fetch growing ranges (S3_READ_MIN doubling up to S3_READ_MAX), so a
    decoder that reads 32 KiB at a time costs a few requests per 8 MiB instead of one per
    32 KiB, a probe of the header costs one small request, and memory stays bounded by two
    ranges whatever the object's size. A seek elsewhere (an MP4 index at the end) starts
    again from S3_READ_MIN and keeps the previous range, so jumping back costs nothing.
    """

    def __init__(self, f, uri: str, endpoint_url: str | None = None):
        self.f, self.length, self.pos = f, f.size(), 0
        self.uri, self.endpoint_url = uri, endpoint_url
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
        hit = (self.pos, read_at(self.f, self.uri, size, self.pos, self.endpoint_url))
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
    return RangeReader(f, uri, endpoint_url) if is_s3(uri) else f


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
        want = min(size, max_bytes + 1) if max_bytes else size
        data = (read_at(f, uri, want, 0, endpoint_url) if is_s3(uri)
                else f.read(max_bytes + 1) if max_bytes else f.read())
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


def check_local_output(path: str) -> None:
    """A local --output must be a folder we can write, or be creatable: raise SourceError
    naming the path and the fix for a regular file, a read-only folder, or a parent that
    is a file or read-only. Creates nothing."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise SourceError(f"output {path} is a file, not a folder; pass a new or empty folder "
                          "(or an earlier fer-batch output) as --output")
    probe = path
    while not os.path.exists(probe):  # the nearest existing folder is where mkdir starts
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise SourceError(f"output {path}: {probe} is a file, so the folder cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SourceError(f"output {path}: {probe} is not writable by this user; pass a "
                          "folder you can write as --output")


def check_access(uri: str, endpoint_url: str | None = None, *, kind: str = "source") -> None:
    """Fail fast, before any work, when ``uri`` cannot be used.

    kind: "source" (must exist), "model" (must be a file) or "output" (on S3 its bucket
    must exist; folders are created). S3 requests here are tried S3_PREFLIGHT_ATTEMPTS
    times, so a wrong endpoint fails in seconds. Raises SourceError with one line that
    names the URI and the fix (bucket, endpoint, region or credentials on S3).
    """
    uri = strip_credentials(uri)  # checked (and named in messages) without its secret
    if not is_s3(uri):
        if kind == "output":
            check_local_output(uri)
        elif not os.path.exists(uri):
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
