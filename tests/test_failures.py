"""Workers that die during a run, on a real local Ray (docs/failures.md).

- A FaceCropper and a FacePredictor process killed with SIGKILL in the middle of a run: the
  run completes and its output equals a clean run's, nothing duplicated.
- A file that kills its worker every time (what a decoder segfault or an OOM kill does) is
  retried a bounded number of times, then recorded as an error; the run goes on.
- A task that runs out of memory fails its file, not the worker.

The crashing file uses the documented test hook FER_BATCH_TEST_CRASH_ON (the worker
SIGKILLs itself on a URI containing that text): no real file crashes today's decoders.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

import corpus
from conftest import own_ray
from fer_batch import pipeline, readers
from fer_batch.config import AnnotateConfig

ROOT = Path(__file__).resolve().parents[1]
CRASH_TAG = "CRASH-ME"  # files whose URI contains this kill their worker (test hook)
HANG_TAG = "HANG-ME"  # ... hang their worker in C code (the GIL released, as PyAV does)
HANG_GIL_TAG = "HANG-GIL"  # ... hang it in C code that holds the GIL
MAX_FILE_RETRIES = 1  # the crashing file is tried 1 + 1 times, then recorded as an error
FILE_COLUMNS = ["source", "status", "error", "frames_decoded", "faces"]
FACE_COLUMNS = ["source", "frame_index", "face_index", "x", "y", "w", "h", "label"]

pytestmark = pytest.mark.skipif(not corpus.has_faces(), reason=f"needs {corpus.FACE_PHOTO}")


@pytest.fixture(scope="module")
def ray_crash_hook():
    """A local Ray whose workers inherit FER_BATCH_TEST_CRASH_ON (set before ray.init)."""
    with own_ray(dict(FER_BATCH_TEST_CRASH_ON=CRASH_TAG, FER_BATCH_TEST_HANG_ON=HANG_TAG,
                      FER_BATCH_TEST_HANG_GIL_ON=HANG_GIL_TAG)) as ray:
        yield ray


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    for i in range(5):  # 4 s each: long enough to be killed while busy
        corpus.write_video(root / f"clip{i}.mp4", corpus.face_frames(40))
    for i in range(2):
        corpus.write_video(root / f"still{i}.mkv", corpus.face_frames(4))
    corpus.write_video(root / f"{CRASH_TAG}.mp4", corpus.face_frames(10))
    return root


def _config(sources, checkpoint, out) -> AnnotateConfig:
    return AnnotateConfig(sources=tuple(map(str, sources)), model=checkpoint, output=str(out),
                          preprocess_actors=2, max_file_retries=MAX_FILE_RETRIES)


def _tables(out):
    files = readers.read_files(str(out), as_pandas=True)[FILE_COLUMNS + ["seconds"]]
    faces = readers.read_faces(str(out), as_pandas=True)
    return files, faces


@pytest.fixture(scope="module")
def clean(ray_crash_hook, archive, random_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "fer"
    manifest = pipeline.run(_config([archive], random_checkpoint, out),
                            progress=lambda s: None)
    return manifest, *_tables(out)


def _workers(kind: str) -> list:
    """Live Ray worker processes of this session (our descendants) running kind's actor, with
    their titles: 'ray::MapWorker(MapBatches(FaceCropper)).submit' while busy."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:  # exited meanwhile
            continue
        if f"MapBatches({kind}))" in title:
            found.append((p, title))
    return found


def _kill_busy(kind: str, run: threading.Thread, seconds: float, busy_only: bool = True):
    """SIGKILL the first worker of kind seen busy (or idle, if allowed) while run lasts."""
    deadline = time.monotonic() + seconds
    while run.is_alive() and time.monotonic() < deadline:
        for p, title in _workers(kind):
            if title.rstrip().endswith(".submit") or not busy_only:
                os.kill(p.pid, signal.SIGKILL)
                return p.pid, title.strip()
        time.sleep(0.05)
    return None, None


@pytest.fixture(scope="module")
def killed(ray_crash_hook, archive, random_checkpoint, tmp_path_factory, clean):
    """The same files but the crashing one (its restarts would only add time), with a busy
    FaceCropper, then the FacePredictor, killed mid-run."""
    out = tmp_path_factory.mktemp("killed") / "fer"
    files = sorted(p for p in archive.iterdir() if CRASH_TAG not in p.name)
    result = {}

    def work():
        try:
            result["manifest"] = pipeline.run(_config(files, random_checkpoint, out),
                                              progress=lambda s: None)
        except BaseException as e:  # reported by the test, not lost in the thread
            result["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    victims = [_kill_busy("FaceCropper", thread, 600),
               _kill_busy("FacePredictor", thread, 30)]
    if victims[1][0] is None:  # never caught busy (inference is short): kill it idle
        victims[1] = _kill_busy("FacePredictor", thread, 30, busy_only=False)
    thread.join(timeout=900)
    assert not thread.is_alive(), "the run did not finish after its workers were killed"
    if "error" in result:
        raise result["error"]
    return victims, result["manifest"], *_tables(out)


def test_crashing_file_is_retried_a_bounded_number_of_times_then_an_error(clean, archive):
    manifest, files, faces = clean
    row = files.set_index("source").loc[str(archive / f"{CRASH_TAG}.mp4")]
    assert row.status == "error"
    assert row.error.startswith(f"worker died {MAX_FILE_RETRIES + 1} times while processing "
                                "this file")
    assert row.faces == 0 and not faces["source"].str.contains(CRASH_TAG).any()
    others = files[~files["source"].str.contains(CRASH_TAG)]
    assert (others["status"] == "ok").all() and (others["faces"] > 0).all()
    assert manifest["files_ok"] == 7 and manifest["files_error"] == 1


def test_killed_workers_change_nothing_in_the_output(clean, killed):
    _, files_a, faces_a = clean
    victims, manifest, files_b, faces_b = killed
    files_a = files_a[~files_a["source"].str.contains(CRASH_TAG)]
    (cropper, title), (predictor, _) = victims
    assert cropper is not None, "no FaceCropper worker was seen busy: nothing was killed"
    assert title.endswith(".submit"), "the FaceCropper was killed in the middle of a task"
    assert predictor is not None, "the FacePredictor worker was never seen"
    pd.testing.assert_frame_equal(files_a[FILE_COLUMNS].sort_values("source")
                                  .reset_index(drop=True),
                                  files_b[FILE_COLUMNS].sort_values("source")
                                  .reset_index(drop=True))
    a = faces_a.sort_values(FACE_COLUMNS[:3]).reset_index(drop=True)
    b = faces_b.sort_values(FACE_COLUMNS[:3]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[FACE_COLUMNS], b[FACE_COLUMNS])
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-4)
    assert a["crop_png"].tolist() == b["crop_png"].tolist()


def test_nothing_is_duplicated_after_retries(killed):
    _, manifest, files, faces = killed
    assert files["source"].is_unique
    assert not faces.duplicated(["source", "frame_index", "face_index"]).any()
    assert manifest["faces"] == len(faces) == files["faces"].sum()


def test_out_of_memory_in_one_task_fails_that_file_not_the_worker(tmp_path):
    """Under an address-space limit, decoding a 12000x12000 image or video frame fails with
    MemoryError inside the worker; the file becomes an error row and the same worker then
    processes the next file normally."""
    (tmp_path / "big.png").write_bytes(corpus.png_bomb(corpus.BOMB_SIDE, corpus.BOMB_SIDE))
    corpus.write_video_bomb(tmp_path / "big.mov")
    corpus.write_video(tmp_path / "after.mp4", corpus.face_frames(10))
    code = textwrap.dedent(f"""
        import json, resource, sys
        sys.path[:0] = [{str(ROOT)!r}]
        import psutil
        from fer_batch import preprocess
        fc = preprocess.FaceCropper(max_pixels=10**9)  # the limit would refuse them first
        vms = psutil.Process().memory_info().vms
        resource.setrlimit(resource.RLIMIT_AS, (vms + 100 * 2**20, resource.RLIM_INFINITY))
        out = {{}}
        for name, kind in (("big.png", "image"), ("big.mov", "video"), ("after.mp4", "video")):
            e = dict(uri={str(tmp_path)!r} + "/" + name, media_type=kind, size_bytes=0,
                     mtime_ns=0)
            row = list(fc.process(e))[-1]
            out[name] = [row["status"][0], row["error"][0], int(row["faces"][0])]
        print(json.dumps(out))
    """)
    # one malloc arena: glibc otherwise reserves 64 MB of address space per arena for new
    # decoder threads, which, depending on timing, exhausted the limit for the normal file too
    env = dict(os.environ, MALLOC_ARENA_MAX="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    for name in ("big.png", "big.mov"):
        status, error, _ = got[name]
        assert status == "error" and error.startswith("out of memory while processing"), got
    assert got["after.mp4"][0] == "ok" and got["after.mp4"][2] > 0, got


def test_hung_files_become_error_rows_and_the_run_commits(ray_crash_hook, random_checkpoint,
                                                          tmp_path):
    """A decoder stuck in C code (the test hook sleeps in libc) makes no progress: after
    --stall-timeout-s the worker ends itself, the file is retried, then recorded as hung.
    A hang that holds the GIL stops the Python watchdog too: faulthandler's C timer ends the
    worker. Both become error rows; the good file beside them is annotated."""
    for name in (f"{HANG_TAG}.mp4", f"{HANG_GIL_TAG}.mp4", "good.mp4"):
        corpus.write_video(tmp_path / name, corpus.face_frames(4))
    cfg = dataclasses.replace(_config([tmp_path], random_checkpoint, tmp_path / "out"),
                              stall_timeout_s=2.0)
    t0 = time.monotonic()
    manifest = pipeline.run(cfg, progress=lambda s: None)
    files, _ = _tables(tmp_path / "out")
    row = files.set_index("source")
    hung = row.loc[str(tmp_path / f"{HANG_TAG}.mp4")]
    assert hung.status == "error"
    assert hung.error.startswith(f"hung: no progress for 2 s (--stall-timeout-s), "
                                 f"{MAX_FILE_RETRIES + 1} tries"), hung.error
    gil = row.loc[str(tmp_path / f"{HANG_GIL_TAG}.mp4")]
    assert gil.status == "error" and gil.error.startswith(
        f"worker died {MAX_FILE_RETRIES + 1} times while processing this file"), gil.error
    good = row.loc[str(tmp_path / "good.mp4")]
    assert good.status == "ok" and good.faces > 0
    assert manifest["files_error"] == 2 and manifest["files_ok"] == 1
    assert time.monotonic() - t0 < 300
