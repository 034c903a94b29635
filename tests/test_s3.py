"""S3 for real: list, read, annotate and write through a real S3 HTTP server.

The server is moto's standalone server with IAM authentication switched on
(tests/s3_server.py): every request must carry a valid SigV4 signature of the test
user's access key, so a wrong secret, missing credentials and AccessDenied are the
server's own answers. Requests go through FaultProxy, a loopback HTTP proxy that records
them (to count ranged GETs and bytes) and injects transient faults: 503 SlowDown,
connection resets, bodies cut short.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

import fer_batch.pipeline  # noqa: F401 (Ray, Ray Data, torch: imported at collection, so
#   their import time is not counted as pre-flight time and their log handlers bind to
#   the session's stderr, not to one test's captured stream)
from conftest import encode_video, face_image, shared, upload_tree
from fer_batch import cli, decode, readers, runs, sink, sources, storage
from fer_batch.model import EMOTIONS
from fer_batch.config import DetectorSettings
from fer_batch.preprocess import FaceCropper
from s3_server import DENIED_PREFIX, IN, MODELS, OUT, free_port

MANY = 1_050  # objects under one prefix: > 1,000, the most one ListObjectsV2 page returns
PHOTOS = {  # key under archive/ -> shared photo (small ones with Haar-detectable faces)
    "photos/Émotions été/fr obama.jpg": "fr_obama.jpg",  # unicode and spaces in the key
    "photos/faceapi_expr_happy.jpg": "faceapi_expr_happy.jpg",
    "photos/groups/voc 2008 001009.jpg": "dlib_voc_2008_001009.jpg",
}


# --- fixtures: the proxy, media (server, s3_env, ray_s3 and s3: tests/conftest.py)

@pytest.fixture
def proxy(s3_env):
    proxy = s3_env[1]
    proxy.clear()
    yield proxy
    proxy.clear()


def face_clip(path: Path, n: int = 20) -> Path:
    """2 s at 10 fps of a real face moving right, H.264 in MP4 (PyAV)."""
    face = cv2.resize(face_image(), (240, 300), interpolation=cv2.INTER_AREA)[:180]
    return encode_video(path, [np.roll(face, 2 * i, axis=1) for i in range(n)], fps=10)


@pytest.fixture(scope="module")
def archive(s3, tmp_path_factory):
    """The same media on local disk and under s3://IN/archive/, plus two S3-only objects."""
    root = tmp_path_factory.mktemp("archive")
    for key, name in PHOTOS.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared("photos", name), root / key)
    (root / "generated").mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(root / "generated" / "noise 1.png"),
                rng.integers(0, 256, (120, 160), dtype=np.uint8))
    cv2.imwrite(str(root / "generated" / "portrait.png"), cv2.resize(face_image(), (200, 250)))
    (root / "videos").mkdir()
    data = face_clip(root / "videos" / "face clip.mp4").read_bytes()
    (root / "videos" / "truncated.mp4").write_bytes(data[:len(data) // 2])  # index lost
    (root / "notes.txt").write_text("not media")
    upload_tree(s3, root, IN, "archive")
    photo = shared("photos", "fr_obama.jpg").read_bytes()
    s3.put_object(Bucket=IN, Key=f"archive/{DENIED_PREFIX}private.jpg", Body=photo)
    s3.put_object(Bucket=IN, Key="archive/vanish/gone.jpg", Body=photo)
    return root


@pytest.fixture(scope="module")
def model_uri(s3, random_checkpoint) -> str:
    s3.upload_file(random_checkpoint, MODELS, "fer/v1/model.pt")
    return f"s3://{MODELS}/fer/v1/model.pt"


def no_secret_in(secret: str, text: str | bytes, where: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    assert secret.encode() not in data, f"the secret key appears in {where}"


# --- listing

def test_listing_paginates_over_1000_objects_nested_folders_and_unicode(s3, s3_env, proxy):
    keys = [f"many/{i // 100:02d}/obj {i:04d}.jpg" for i in range(MANY)]
    keys += ["many/deep/er/still/déjà vu 日本.png", "many/deep/clip.MOV", "many/readme.md"]
    s3_env[0].set_auth(False)  # setup only: a third faster; the listing below is checked
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda k: s3.put_object(Bucket=IN, Key=k, Body=b"x"), keys))
        s3.put_object(Bucket=IN, Key="many/empty folder/", Body=b"")  # a console folder marker
    finally:
        s3_env[0].set_auth(True)
    proxy.clear()

    entries = sources.list_files([f"s3://{IN}/many"])

    assert [e["uri"] for e in entries] == sorted(f"s3://{IN}/{k}" for k in keys)
    by_uri = {e["uri"]: e for e in entries}
    assert by_uri[f"s3://{IN}/many/deep/er/still/déjà vu 日本.png"]["media_type"] == "image"
    assert by_uri[f"s3://{IN}/many/deep/clip.MOV"]["media_type"] == "video"
    assert by_uri[f"s3://{IN}/many/readme.md"]["status"] == "skipped"
    assert all(e["size_bytes"] == 1 and e["mtime_ns"] > 0 for e in entries
               if e["uri"].endswith(".jpg"))
    pages = [r for r in proxy.requests if r.method == "GET" and "list-type=2" in r.query]
    assert len(pages) >= 2 and any("continuation-token" in r.query for r in pages), \
        "more than 1,000 keys must take more than one ListObjectsV2 page"


def test_manifest_on_s3_lists_relative_and_absolute_uris(s3, archive):
    photo = (archive / "photos/Émotions été/fr obama.jpg").read_bytes()
    s3.put_object(Bucket=IN, Key="lists/photos/Émotions été/fr obama.jpg", Body=photo)
    s3.put_object(Bucket=IN, Key="lists/generated/portrait.png", Body=b"png")
    text = ("# frames to annotate\nphotos/Émotions été/fr obama.jpg\n"
            f"s3://{IN}/archive/videos/face clip.mp4\nmissing/nothing.jpg\n")
    s3.put_object(Bucket=IN, Key="lists/tonight.txt", Body=text.encode())
    s3.put_object(Bucket=IN, Key="lists/more.csv", Body=b"uri,label\ngenerated/portrait.png,x\n")
    entries = sources.list_files([f"s3://{IN}/lists/tonight.txt", f"s3://{IN}/lists/more.csv"])
    by_uri = {e["uri"]: e for e in entries}
    base = f"s3://{IN}/lists/"
    assert sorted(by_uri) == sorted([
        base + "photos/Émotions été/fr obama.jpg", f"s3://{IN}/archive/videos/face clip.mp4",
        base + "missing/nothing.jpg", base + "generated/portrait.png"])
    photo_entry = by_uri[base + "photos/Émotions été/fr obama.jpg"]
    assert photo_entry["status"] == "pending" and photo_entry["size_bytes"] == len(photo)
    assert by_uri[base + "missing/nothing.jpg"]["status"] == "error"
    assert "not found" in by_uri[base + "missing/nothing.jpg"]["error"]


# --- reading

def test_video_streams_through_pyav_with_bounded_range_reads(s3, proxy, tmp_path):
    rng = np.random.default_rng(1)  # noise barely compresses: a video of ~0.8 MB
    local = encode_video(tmp_path / "noise.mp4",
                         [rng.integers(0, 256, (240, 320), dtype=np.uint8) for _ in range(24)],
                         fps=12)
    size = local.stat().st_size
    s3.upload_file(str(local), IN, "stream/noise clip.mp4")
    uri = f"s3://{IN}/stream/noise clip.mp4"
    expected = [(i, t, g) for i, t, g in decode.iter_frames(str(local), every_n=1)]

    with storage.open_input(uri) as f:
        got = list(decode.iter_frames(f, every_n=1))
    gets = [r for r in proxy.for_key("stream/noise clip.mp4") if r.method == "GET"]
    assert [(i, t) for i, t, _ in got] == [(i, t) for i, t, _ in expected]
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(got, expected))
    assert all(r.range and r.status == 206 for r in gets), "every read is a ranged GET"
    assert max(r.body_bytes for r in gets) <= storage.S3_READ_MAX
    assert sum(r.body_bytes for r in gets) < 1.05 * size, "no byte is fetched twice"
    assert len(gets) < size / (64 * 1024), "reads are merged, not one GET per decoder read"

    proxy.clear()  # the first frame needs the header and the index, not the whole file
    with storage.open_input(uri) as f:
        frames = decode.iter_frames(f, every_n=1)
        first = next(frames)
        frames.close()
    assert np.array_equal(first[2], expected[0][2])
    fetched = sum(r.body_bytes for r in proxy.for_key("stream/noise clip.mp4"))
    assert fetched < size / 2


def test_transient_failures_are_retried_without_losing_bytes(s3, proxy, archive):
    key = "archive/photos/groups/voc 2008 001009.jpg"
    want = (archive / key.removeprefix("archive/")).read_bytes()
    proxy.fail(key, "slowdown", "reset", methods=("HEAD",))
    proxy.fail(key, "slowdown", "reset", "truncate", methods=("GET",))
    assert storage.read_bytes(f"s3://{IN}/{key}") == want
    seen = [(r.method, r.fault, r.status) for r in proxy.for_key(key)]
    assert seen == [("HEAD", "slowdown", 503), ("HEAD", "reset", 0), ("HEAD", None, 200),
                    ("GET", "slowdown", 503), ("GET", "reset", 0),
                    ("GET", "truncate", 206), ("GET", None, 206)]


def test_a_get_error_that_pyarrow_masks_is_asked_again(s3, proxy):
    """pyarrow reads a GetObject answer into a buffer of the range's size, so a longer error
    body comes out as INTERNAL_FAILURE "Failed to flush response stream" (never retried).
    storage asks again through boto3: a one-off refusal then reads, a lasting one is named."""
    key = "masked/small.jpg"
    s3.put_object(Bucket=IN, Key=key, Body=b"\xff\xd8 tiny")
    proxy.fail(key, "forbidden", methods=("GET",))
    assert storage.read_bytes(f"s3://{IN}/{key}") == b"\xff\xd8 tiny"
    proxy.fail(key, "forbidden", methods=("GET",))
    with storage.open_input(f"s3://{IN}/{key}") as f:
        assert f.read() == b"\xff\xd8 tiny"
    assert [(r.method, r.status) for r in proxy.for_key(key) if r.method == "GET"] == \
        [("GET", 403), ("GET", 206), ("GET", 403), ("GET", 206)]
    proxy.fail(key, *["forbidden"] * 2, methods=("GET",))
    with pytest.raises(OSError, match="ACCESS_DENIED during GetObject.*HTTP 403"):
        storage.read_bytes(f"s3://{IN}/{key}")


def test_unreadable_objects_become_error_rows(s3, proxy, archive):
    """AccessDenied, deleted after listing, truncated: one error row each, no exception."""
    s3.put_object(Bucket=IN, Key="bad/ok.jpg", Body=(archive / "generated/portrait.png")
                  .read_bytes())
    s3.put_object(Bucket=IN, Key=f"bad/{DENIED_PREFIX}x.jpg", Body=b"\xff\xd8 secret")
    s3.put_object(Bucket=IN, Key="bad/deleted.mp4", Body=b"gone soon")
    s3.put_object(Bucket=IN, Key="bad/truncated.mp4",
                  Body=(archive / "videos/truncated.mp4").read_bytes())
    entries = {e["uri"].rsplit("/", 1)[1]: e for e in sources.list_files([f"s3://{IN}/bad"])}
    s3.delete_object(Bucket=IN, Key="bad/deleted.mp4")
    cropper = FaceCropper(detection=DetectorSettings(verify=False))
    rows = {name: list(cropper.process(e))[-1] for name, e in entries.items()}
    status = {name: (r["status"][0], r["error"][0]) for name, r in rows.items()}
    assert status["ok.jpg"] == ("ok", "")
    assert status["x.jpg"][0] == "error" and "ACCESS_DENIED" in status["x.jpg"][1]
    assert status["deleted.mp4"][0] == "error" and "does not exist" in status["deleted.mp4"][1]
    assert status["truncated.mp4"][0] == "error"
    assert "decodable" in status["truncated.mp4"][1]


# --- credentials, endpoint, pre-flight

def test_profile_credentials_and_endpoint_precedence(s3, s3_env, monkeypatch, tmp_path):
    moto, proxy = s3_env
    s3.put_object(Bucket=IN, Key="creds/a.jpg", Body=b"x")
    creds = tmp_path / "credentials"
    creds.write_text(f"[fer]\naws_access_key_id = {moto.access_key}\n"
                     f"aws_secret_access_key = {moto.secret_key}\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "fer")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)  # the S3-specific one wins
    assert [e["uri"] for e in sources.list_files([f"s3://{IN}/creds"])] == \
        [f"s3://{IN}/creds/a.jpg"]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)  # --endpoint-url beats both
    assert len(sources.list_files([f"s3://{IN}/creds"], endpoint_url=proxy.endpoint)) == 1
    assert "from shared-credentials-file" in storage.describe_credentials()
    monkeypatch.setenv("AWS_PROFILE", "nobody")  # a profile that is not in the file
    with pytest.raises(storage.SourceError, match="credential"):
        storage.check_access(f"s3://{IN}/creds", proxy.endpoint)


PREFLIGHT_CASES = {  # name -> (environment changes, source, output, words in the message)
    "wrong source bucket": ({}, "s3://no-such-bucket/archive", f"s3://{OUT}/x",
                            "source s3://no-such-bucket/archive: bucket 'no-such-bucket' does "
                            "not exist"),
    "wrong output bucket": ({}, f"s3://{IN}/archive", "s3://no-such-results/x",
                            "bucket 'no-such-results' does not exist"),
    "no credentials": ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
                       f"s3://{IN}/archive", f"s3://{OUT}/x", "no AWS credentials"),
    "wrong secret": ({"AWS_SECRET_ACCESS_KEY": "wrong-secret-wrong-secret-0123456789abcd"},
                     f"s3://{IN}/archive", f"s3://{OUT}/x", "secret key does not match"),
    "dead endpoint": ({"AWS_ENDPOINT_URL": "dead"}, f"s3://{IN}/archive", f"s3://{OUT}/x",
                      "cannot connect to the endpoint"),
}


@pytest.mark.parametrize("case", PREFLIGHT_CASES)
def test_bad_s3_settings_fail_fast_with_one_clear_line(case, s3, archive, model_uri, monkeypatch,
                                                       capfd, tmp_path):
    import ray
    env, source, output, words = PREFLIGHT_CASES[case]
    secret = env.get("AWS_SECRET_ACCESS_KEY") or os.environ["AWS_SECRET_ACCESS_KEY"]
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k)
        else:
            monkeypatch.setenv(k, f"http://127.0.0.1:{free_port()}" if v == "dead" else v)
    ray_was_up = ray.is_initialized()
    t0 = time.perf_counter()
    code = cli.main(["annotate", source, "--model", model_uri, "--output", output])
    seconds = time.perf_counter() - t0
    out, err = capfd.readouterr()
    assert code == cli.EXIT_USAGE
    assert seconds < 20, f"pre-flight took {seconds:.1f} s"
    assert ray.is_initialized() == ray_was_up, "no Ray before the pre-flight passes"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fer-batch annotate: error:"), err
    assert words in lines[0]
    assert "Traceback" not in out + err
    no_secret_in(secret, out + err, "the pre-flight message")


# --- the commit protocol on S3 (no Ray)

def staged_run(out: runs.Output, run_id: str, source: str) -> dict:
    """Stage one face row and one file row the way StagingSink does."""
    face = {n: [0] for n, _ in sink.FACE_COLUMNS + sink.FACE_TAIL}
    face.update({c: [0.0] for c in EMOTIONS})
    face.update(source=[source], media_type=["image"], timestamp_s=[None], label=["anger"],
                score=[1.0], model_id=["m"], crop_png=[b""], x=[1], y=[2], w=[30], h=[30])
    faces = sink.face_table(face, EMOTIONS)
    files = sink.file_rows_table([dict(uri=source, media_type="image", status="ok",
                                       size_bytes=10, mtime_ns=5)], "m")
    sink.write_tables(out.fs, out.staging(run_id), faces, files, name="0")
    return dict(run_id=run_id, classes=list(EMOTIONS), config={})


def test_lock_staging_commit_and_recover_on_s3(s3, proxy):
    ready, unfinished, orphan = ("20260102T000000Z-bbbbbb", "20260103T000000Z-cccccc",
                                 "20260104T000000Z-dddddd")
    uri = f"s3://{OUT}/protocol"
    out = runs.Output(uri)
    out.acquire("r0")
    with pytest.raises(runs.LockedError, match="in use by run r0"):
        runs.Output(uri).acquire("r1")  # same host, live pid: refused
    out.release()
    assert not out.exists(out.path("_lock"))

    out.write_json(f"{out.staging(ready)}/READY.json",  # died after READY, before the copy
                   staged_run(out, ready, "s3://a/y.jpg"))
    staged_run(out, unfinished, "s3://a/z.jpg")  # died before READY
    s3.put_object(Bucket=OUT, Key=f"protocol/faces/run_id={orphan}/part-0.parquet",
                  Body=b"a partition without a manifest")

    done = out.recover()

    assert sorted(done) == sorted([f"rolled forward the commit of run {ready}",
                                   f"discarded staging of unfinished run {unfinished}",
                                   f"removed uncommitted faces/run_id={orphan}"])
    assert list(out.committed_runs()) == [ready]
    files = readers.read_files(uri, as_pandas=True)
    assert dict(zip(files["source"], files["run_id"])) == {"s3://a/y.jpg": ready}
    faces = readers.read_faces(uri, as_pandas=True)
    assert list(faces["source"]) == ["s3://a/y.jpg"] and list(faces["w"]) == [30]
    assert readers.done_index(uri) == {"s3://a/y.jpg": (10, 5)}
    left = [o["Key"] for o in s3.list_objects_v2(Bucket=OUT, Prefix="protocol/")["Contents"]]
    assert not [k for k in left if "/_staging/" in k and not k.endswith("/")]
    assert not [k for k in left if unfinished in k or orphan in k]


# --- annotate from S3 to S3, compared with the same files on local disk

FAULTS = {  # key under archive/ -> faults for its first requests (GET and HEAD)
    "photos/Émotions été/fr obama.jpg": ("slowdown", "slowdown"),
    "photos/faceapi_expr_happy.jpg": ("truncate",),
    "videos/face clip.mp4": ("reset",),
    "generated/noise 1.png": ("slowdown",),
}


@pytest.fixture(scope="module")
def annotated(ray_s3, s3_env, s3, archive, model_uri):
    """One run from S3 to S3 that also annotates the same files on local disk (one Ray
    pipeline instead of two: the test budget is 2 busy cores); its printed output and the
    requests the proxy saw."""
    moto, proxy = s3_env
    proxy.clear()
    for key, faults in FAULTS.items():
        proxy.fail(f"archive/{key}", *faults, methods=("GET",))
        if "truncate" not in faults:
            proxy.fail(f"archive/{key}", *faults, methods=("HEAD",))
    proxy.fail("archive/vanish/gone.jpg", "hook:delete", methods=("HEAD",))
    proxy.fail("fer/v1/model.pt", "slowdown", methods=("GET",))
    with captured_fds() as log:
        code = cli.main(["annotate", f"s3://{IN}/archive/", str(archive), "--model", model_uri,
                         "--output", f"s3://{OUT}/run/", "--endpoint-url", proxy.endpoint])
    assert code == 0, log.read()
    requests, pending = list(proxy.requests), proxy.pending_faults()
    proxy.clear()
    return dict(log=log.read(), requests=requests, pending=pending)


@contextlib.contextmanager
def captured_fds():
    """Everything printed while inside, by Python (sys.stdout/stderr) and by native code and
    subprocesses (file descriptors 1 and 2); call .read() on the yielded object after."""
    raw = tempfile.NamedTemporaryFile(mode="w+b", suffix=".log")
    text = open(raw.name, "a", buffering=1, encoding="utf-8")

    class Log:
        def read(self) -> str:
            return Path(raw.name).read_text(encoding="utf-8", errors="replace")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(raw.fileno(), 1)
        os.dup2(raw.fileno(), 2)
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            yield Log()
    finally:
        text.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def by_relative_key(table, prefix: str) -> dict:
    """(key relative to prefix, frame_index, face_index) -> face row, for sources under
    prefix."""
    return {(r["source"][len(prefix):], r["frame_index"], r["face_index"]): r
            for r in table.to_pylist() if r["source"].startswith(prefix)}


def test_s3_annotate_matches_local_face_for_face(annotated, archive):
    faces = readers.read_faces(f"s3://{OUT}/run")
    s3_rows = by_relative_key(faces, f"s3://{IN}/archive/")
    local_rows = by_relative_key(faces, f"{archive}/")
    assert len(local_rows) >= 5, "the photos and the clip hold several Haar-detectable faces"
    assert sorted(s3_rows) == sorted(local_rows)
    assert any(k[0] == "videos/face clip.mp4" and k[1] > 0 for k in s3_rows)
    for key, row in local_rows.items():
        got = s3_rows[key]
        assert [got[c] for c in ("x", "y", "w", "h", "label", "media_type")] == \
            [row[c] for c in ("x", "y", "w", "h", "label", "media_type")], key
        assert np.allclose([got[c] for c in EMOTIONS], [row[c] for c in EMOTIONS], atol=1e-5)
        assert got["crop_png"] == row["crop_png"], key


def test_s3_annotate_has_one_file_row_per_object_with_errors_for_unreadable(annotated, archive):
    files = readers.read_files(f"s3://{OUT}/run", as_pandas=True)

    def rows(prefix):
        return {s[len(prefix):]: (st, n, e) for s, st, n, e in zip(
            files["source"], files["status"], files["faces"], files["error"])
            if s.startswith(prefix)}
    got, want = rows(f"s3://{IN}/archive/"), rows(f"{archive}/")
    status, _, error = got.pop(f"{DENIED_PREFIX}private.jpg")
    assert status == "error" and "ACCESS_DENIED" in error
    status, _, error = got.pop("vanish/gone.jpg")  # deleted after listing, before reading
    assert status == "error" and "does not exist" in error
    assert {k: v[:2] for k, v in got.items()} == {k: v[:2] for k, v in want.items()}
    assert got["videos/truncated.mp4"][0] == "error" and got["notes.txt"][0] == "skipped"
    assert all(got[k][0] == "ok" for k in FAULTS), "transient faults lose nothing"


def test_transient_faults_were_injected_and_retried(annotated):
    assert annotated["pending"] == {}, "every queued fault was hit"
    log = annotated["requests"]
    for key, faults in FAULTS.items():
        hits = [r for r in log if r.key == f"archive/{key}" and r.method == "GET"]
        assert [r.fault for r in hits[:len(faults)]] == list(faults), key
        assert hits[len(faults)].status == 206 or hits[len(faults)].status == 200, key
    assert any(r.key == "fer/v1/model.pt" and r.fault == "slowdown" for r in log)


def test_s3_output_is_committed_and_clean(annotated, s3):
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=OUT, Prefix="run/") for o in page.get("Contents", [])]
    manifests = [k for k in keys if k.startswith("run/_runs/") and k.endswith(".json")]
    assert len(manifests) == 1
    run_id = manifests[0].rsplit("/", 1)[1][:-5]
    assert any(k.startswith(f"run/faces/run_id={run_id}/") and k.endswith(".parquet")
               for k in keys)
    assert any(k.startswith(f"run/files/run_id={run_id}/") for k in keys)
    assert "run/_lock" not in keys
    assert not [k for k in keys if "/_staging/" in k and not k.endswith("/")]
    assert f"run {run_id} committed" in annotated["log"]
    done = readers.done_index(f"s3://{OUT}/run")
    assert f"s3://{IN}/archive/videos/face clip.mp4" in done


def test_no_secret_in_any_output_log_or_file(annotated, s3, s3_env):
    import ray
    secret = s3_env[0].secret_key
    no_secret_in(secret, annotated["log"], "the annotate output")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=OUT):
        for o in page.get("Contents", []):
            body = s3.get_object(Bucket=OUT, Key=o["Key"])["Body"].read()
            no_secret_in(secret, body, f"s3://{OUT}/{o['Key']}")
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert logs, "Ray wrote logs"
    for p in logs:
        no_secret_in(secret, p.read_bytes(), str(p))
