"""A real S3 HTTP server for the tests, and a loopback proxy that injects faults.

``MotoS3`` runs moto's standalone server (``moto.server.main``, the code behind
``moto_server``) in a subprocess on a free 127.0.0.1 port, creates an IAM user with
an access key and then switches moto's IAM authentication on: from then on every
request must carry a valid SigV4 signature of that key, so wrong secrets, missing
credentials and AccessDenied are real server answers, not simulations.

``FaultProxy`` is a threaded HTTP server on another loopback port that forwards each
request to moto unchanged (Host header included, so signatures stay valid), records
it (method, key, Range, bytes returned) and can answer the first request(s) for a key
with a fault instead: 503 SlowDown, a connection reset, or a body cut short. It can
also run a hook before forwarding (e.g. delete the object, to make "deleted between
listing and reading" happen for real).
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

REGION = "us-east-1"
BOOT_KEY = "bootstrap"  # moto ignores signatures until authentication is switched on
USER = "fer-batch-test"
IN, OUT, MODELS = "fer-archive", "fer-results", "fer-models"  # the tests' buckets
DENIED_PREFIX = "denied/"  # the test user may not GetObject keys under this prefix
START_TIMEOUT_S = 30  # moto's Flask app imports in ~2 s; generous for a loaded machine
SERVER_MAIN = (  # moto_server, exiting when its stdin closes: it dies with the test process
    "import os, sys, threading\n"
    "threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()\n"
    "from moto.server import main\n"
    "main()\n")


def set_test_user(mp, moto: "MotoS3", endpoint: str, home) -> None:
    """The test user's AWS settings on a pytest MonkeyPatch: moto's keys, the endpoint, no
    real ~/.aws (files under home, absent), no instance metadata service."""
    from fer_batch import storage
    for k in (*storage.CREDENTIAL_VARS, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
              "AWS_DEFAULT_REGION", "AWS_REGION"):
        mp.delenv(k, raising=False)
    mp.setenv("AWS_ACCESS_KEY_ID", moto.access_key)
    mp.setenv("AWS_SECRET_ACCESS_KEY", moto.secret_key)
    mp.setenv("AWS_REGION", "us-east-1")
    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # nothing may try 169.254.169.254
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))  # absent
    mp.setenv("AWS_CONFIG_FILE", str(home / "config"))  # absent
    mp.setenv("NO_PROXY", "127.0.0.1,localhost")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not listen on 127.0.0.1:{port} in {timeout} s")


class MotoS3:
    """moto_server in a subprocess, with IAM authentication on and one test user."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, MOTO_PORT=str(self.port))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_MAIN, "-H", "127.0.0.1", "-p", str(self.port)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        try:
            _wait_for_port(self.port, self.proc, START_TIMEOUT_S)
            self.access_key, self.secret_key = self._create_user()
            self.set_auth(True)
        except BaseException:
            self.stop()
            raise

    def _boto(self, service: str, key: str, secret: str, endpoint: str | None = None):
        import boto3
        from botocore.config import Config
        return boto3.client(service, endpoint_url=endpoint or self.endpoint, region_name=REGION,
                            aws_access_key_id=key, aws_secret_access_key=secret,
                            config=Config(retries={"max_attempts": 2}))

    def _create_user(self) -> tuple[str, str]:
        iam = self._boto("iam", BOOT_KEY, BOOT_KEY)
        iam.create_user(UserName=USER)
        policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:GetObject",
             "Resource": f"arn:aws:s3:::*/{DENIED_PREFIX}*"}]}
        iam.put_user_policy(UserName=USER, PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=USER)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def set_auth(self, on: bool) -> None:
        """Switch moto's signature and IAM policy checks on (every request) or off."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth",
                                     data=b"0" if on else b"inf", method="POST",
                                     headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200

    def client(self, endpoint: str | None = None):
        """boto3 S3 client signed with the test user's key (straight to moto by default)."""
        return self._boto("s3", self.access_key, self.secret_key, endpoint)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Request:
    method: str
    bucket: str
    key: str
    query: str
    range: str | None
    status: int
    body_bytes: int  # response body bytes sent back to the client
    fault: str | None


HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
              "upgrade", "trailer"}
SLOWDOWN_XML = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                b'<Message>Please reduce your request rate.</Message></Error>')

DENIED_XML = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
              b'<Message>Access Denied</Message><RequestId>proxy</RequestId></Error>')


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the AWS SDK expects

    def log_message(self, *args):  # keep test output clean
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _reset(self) -> None:
        """Close the TCP connection with RST: the client sees 'connection reset by peer'."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def _error(self, rec: Request, status: int, reason: str, xml: bytes) -> None:
        """Answer with an S3 error (its XML body; none for HEAD) instead of the upstream."""
        payload = b"" if self.command == "HEAD" else xml
        rec.status = status
        self.send_response(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        rec.body_bytes = len(payload)

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._read_body()
        url = urllib.parse.urlsplit(self.path)
        bucket, _, key = urllib.parse.unquote(url.path).lstrip("/").partition("/")
        rng = self.headers.get("Range")
        fault = proxy.take_fault(self.command, key)
        rec = Request(self.command, bucket, key, url.query, rng, 0, 0, fault)
        with proxy.lock:
            proxy.requests.append(rec)
        if fault == "reset":
            self._reset()
            return
        if fault == "forbidden" and self.command == "GET":  # one AccessDenied with its XML
            self._error(rec, 403, "Forbidden", DENIED_XML)
            return
        if fault == "slowdown":
            self._error(rec, 503, "Slow Down", SLOWDOWN_XML)
            return
        if fault and fault.startswith("hook:"):
            proxy.hooks[fault[5:]](bucket, key)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        rec.status = resp.status
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                self.send_header(k, v)
        # HEAD answers carry the object's length and no body
        length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else len(data)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "truncate" and len(data) > 1:  # promise len(data), send half, hang up
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            rec.body_bytes = len(data) // 2
            self._reset()
            return
        self.wfile.write(data)
        rec.body_bytes = len(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class FaultProxy:
    """Loopback HTTP proxy in front of an S3 endpoint: records requests, injects faults.

    ``fail(key, *faults, methods=("GET", "HEAD"))`` queues faults for the next requests
    whose object key is ``key``: "slowdown" (503 SlowDown), "reset" (TCP reset before any
    answer), "truncate" (a GET body cut in half, then a reset), "forbidden" (one GET
    answered 403 AccessDenied with S3's XML body) or "hook:NAME" (run
    ``hooks[NAME](bucket, key)`` then forward normally). Later requests pass through.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.requests: list[Request] = []
        self.faults: dict[tuple[str, str], list[str]] = {}
        self.hooks: dict[str, callable] = {}
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.proxy = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail(self, key: str, *faults: str, methods=("GET", "HEAD")) -> None:
        with self.lock:
            for m in methods:
                self.faults.setdefault((m, key), []).extend(faults)

    def take_fault(self, method: str, key: str) -> str | None:
        with self.lock:
            queue = self.faults.get((method, key))
            return queue.pop(0) if queue else None

    def pending_faults(self) -> dict:
        with self.lock:
            return {k: list(v) for k, v in self.faults.items() if v}

    def for_key(self, key: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.key == key]

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()
            self.faults.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
