"""Issue 4 in practice: ray job submit, nightly --incremental runs, crashes and interrupts."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import fer_batch
from conftest import encode_video, face_image
from fer_batch import cli, runs

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FACE_COLS = ["source", "frame_index", "face_index", "x", "y", "w", "h", "label", "score"]


def make_clip(path, shift, n=20):
    small = cv2.resize(face_image(), (240, 300), interpolation=cv2.INTER_AREA)[:180]
    return encode_video(path, [np.roll(small, shift + 2 * i, axis=1) for i in range(n)], fps=10)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Two batches of media: `first` exists on night one, `second` arrives on night two."""
    root = tmp_path_factory.mktemp("archive")
    for i in range(3):
        make_clip(root / f"night1_{i}.mp4", 7 * i)
    cv2.imwrite(str(root / "night1_face.jpg"), face_image())
    return root


@pytest.fixture(scope="module")
def second_night(tmp_path_factory):
    """Night two's new files, encoded once: every archive gets the same bytes (the test
    compares outputs, and an encoder need not give identical bytes twice)."""
    root = tmp_path_factory.mktemp("night2")
    for i in range(2):
        make_clip(root / f"night2_{i}.mp4", 30 + 5 * i)
    (root / "night2_bad.jpg").write_bytes(b"<html>502 Bad Gateway</html>")
    return root


def add_second_night(root, second_night):
    shutil.copytree(second_night, root, dirs_exist_ok=True)


def faces_view(out):
    df = fer_batch.read_faces(str(out), as_pandas=True)
    return df[FACE_COLS].sort_values(FACE_COLS[:3]).reset_index(drop=True)


def annotate_cmd(src, model, out, *extra):
    return [str(BIN / "python"), "-m", "fer_batch", "annotate", str(src), "--model", model,
            "--output", str(out), "--all-frames", *extra]


@pytest.fixture(scope="module")
def full_archive(tmp_path_factory, archive, second_night):
    root = tmp_path_factory.mktemp("full")
    shutil.copytree(archive, root, dirs_exist_ok=True)
    add_second_night(root, second_night)
    return root


@pytest.fixture(scope="module")
def clean_run(ray_local, full_archive, random_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    assert cli.main(["annotate", str(full_archive), "--model", random_checkpoint,
                     "--output", str(out), "--all-frames"]) == 0
    return out


def incremental_args(src, out, checkpoint) -> list[str]:
    return ["annotate", str(src), "--model", checkpoint, "--output", str(out), "--all-frames",
            "--incremental"]


@pytest.fixture(scope="module")
def two_nights(ray_local, archive, second_night, random_checkpoint, tmp_path_factory):
    """An archive annotated incrementally on night one, then again after night two's files
    arrived: (archive, output). Tests that change the output work on a copy."""
    src = tmp_path_factory.mktemp("nights") / "archive"
    shutil.copytree(archive, src)
    out = src.parent / "out"
    assert cli.main(incremental_args(src, out, random_checkpoint)) == 0
    add_second_night(src, second_night)
    assert cli.main(incremental_args(src, out, random_checkpoint)) == 0
    return src, out


def test_incremental_processes_only_new_files_and_equals_one_run(
        two_nights, clean_run, random_checkpoint, tmp_path):
    src, night_out = two_nights
    out = tmp_path / "out"
    shutil.copytree(night_out, out)  # the third night below adds a run
    args = incremental_args(src, out, random_checkpoint)
    manifests = runs.Output(str(out)).committed_runs()
    assert len(manifests) == 2
    second = list(manifests.values())[1]
    assert second["files_already_done"] == 4  # 3 clips + 1 photo of night one
    assert second["files_ok"] == 2 and second["files_error"] == 1
    files = fer_batch.read_files(str(out), as_pandas=True)
    assert len(files) == 7 and files["source"].is_unique
    # the union of the two nights equals one run over everything (paths differ by root)
    night = faces_view(out)
    clean = faces_view(clean_run)
    night["source"] = night["source"].str.replace(str(src), "")
    clean["source"] = clean["source"].str.replace(str(clean_run.parent.parent / "full0"), "")
    clean["source"] = clean["source"].map(lambda s: "/" + s.rsplit("/", 1)[1])
    night["source"] = night["source"].map(lambda s: "/" + s.rsplit("/", 1)[1])
    assert len(night) > 0
    clean = clean.sort_values(FACE_COLS[:3]).reset_index(drop=True)
    # the same faces, boxes and labels; scores to float tolerance (the faces reach the
    # model in other batches, and a CPU convolution's rounding depends on the batch)
    assert night[FACE_COLS[:-1]].equals(clean[FACE_COLS[:-1]])
    np.testing.assert_allclose(night["score"], clean["score"], atol=1e-4)
    # a third night with nothing new processes nothing
    assert cli.main(args) == 0
    third = list(runs.Output(str(out)).committed_runs().values())[2]
    assert third["files_already_done"] == 6 and third["files_ok"] == 0


def _wait_for(predicate, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _run_id_started(out):
    stage = out / "_staging"
    return stage.exists() and any((d / "config.json").exists() for d in stage.iterdir())


def _kill_ray_under(temp_root):
    """SIGKILL every process of the Ray a killed driver started (its daemons outlive it)."""
    import psutil
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_root in part for part in (p.info["cmdline"] or [])):
            try:
                p.kill()
            except psutil.Error:
                pass


def test_killed_driver_leaves_nothing_visible_and_rerun_equals_clean_run(
        ray_local, full_archive, clean_run, random_checkpoint, tmp_path):
    out = tmp_path / "out"
    temp_root = tempfile.mkdtemp(prefix="fer-kill-", dir="/tmp")  # the killed driver's Ray
    proc = subprocess.Popen(annotate_cmd(full_archive, random_checkpoint, out),
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, RAY_TMPDIR=temp_root))
    try:
        assert _wait_for(lambda: _run_id_started(out), 180), "the run never started"
        time.sleep(3)  # part way through processing
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, like a lost node
        proc.wait()
        _kill_ray_under(temp_root)
        shutil.rmtree(temp_root, ignore_errors=True)  # the test's own folder
    assert fer_batch.read_faces(str(out)) is None
    assert not (out / "faces").exists() and not (out / "_runs").exists()
    # rerun: recovers (stale lock of a dead pid, staging of the dead run) and completes
    assert cli.main(["annotate", str(full_archive), "--model", random_checkpoint,
                     "--output", str(out), "--all-frames"]) == 0
    assert not (out / "_staging").exists() or not any((out / "_staging").iterdir())
    assert faces_view(out).equals(faces_view(clean_run))


@pytest.mark.slow  # the subprocess starts a Ray
def test_sigterm_exits_promptly_and_commits_nothing(full_archive, random_checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(annotate_cmd(full_archive, random_checkpoint, out),
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait_for(lambda: _run_id_started(out), 180)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output[-2000:]
    assert "nothing of this run was committed" in output
    assert not (out / "_runs").exists() and not (out / "_lock").exists()


def test_concurrent_run_into_the_same_output_is_refused(random_checkpoint, tmp_path, capsys):
    out = runs.Output(str(tmp_path / "out"))
    out.acquire("20260101T000000Z-aaaaaa")
    try:
        code = cli.main(["annotate", str(tmp_path), "--model", random_checkpoint,
                         "--output", str(tmp_path / "out")])
        assert code == 2
        assert "in use by run 20260101T000000Z-aaaaaa" in capsys.readouterr().err
    finally:
        out.release()


def test_compact_merges_runs_into_the_same_view(two_nights, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_nights[1], out)  # compact rewrites it
    assert len(runs.Output(str(out)).committed_runs()) == 2
    before, files_before = faces_view(out), fer_batch.read_files(str(out), as_pandas=True)
    assert cli.main(["compact", str(out)]) == 0
    assert len(runs.Output(str(out)).committed_runs()) == 1
    assert faces_view(out).equals(before)
    assert len(fer_batch.read_files(str(out), as_pandas=True)) == len(files_before)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path):
    """A real Ray head with its job server on loopback, stopped by process group, started
    the way a user's is: after a local run has left ~/.ray/auth_token (here in a HOME of its
    own), so Ray 2.60 turns token authentication on for it."""
    port, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="fer-ray-", dir="/tmp")  # short: Unix socket paths
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HOME=str(home))
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=120)
    assert (home / ".ray" / "auth_token").stat().st_size > 0
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
         f"--temp-dir={temp_dir}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"
    import urllib.error
    import urllib.request

    def up():
        try:
            return urllib.request.urlopen(f"{url}/api/version", timeout=2).status == 200
        except urllib.error.HTTPError:
            return True  # the job server answers (e.g. 401 when a token is required)
        except OSError:
            return False
    try:
        assert _wait_for(up, 120), "ray head did not start"
        yield url, env
    finally:
        # `ray start --block` outlives SIGTERM for 30 s and more: the group gets 5 s to
        # stop, then SIGKILL (every Ray process of this head is in its process group)
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_annotate_job(ray_cluster, archive, random_checkpoint,
                                              tmp_path):
    url, env = ray_cluster
    out = tmp_path / "out"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO),
           "--", "python", "jobs/annotate.py", str(archive), "--model", random_checkpoint,
           "--output", str(out)]
    # as the README says: the job CLI sends ~/.ray/auth_token only with RAY_AUTH_MODE=token
    without = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert without.returncode != 0 and "auth" in (without.stdout + without.stderr).lower()
    env = dict(env, RAY_AUTH_MODE="token")
    for _ in range(30):  # the head answers before its job agent is ready: retry that case only
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        log = done.stdout + done.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(2)
    assert done.returncode == 0, log[-3000:]
    assert "succeeded" in log.lower() and "committed in" in log
    files = fer_batch.read_files(str(out), as_pandas=True)
    assert len(files) == 4 and (files["status"] == "ok").all()
    assert len(fer_batch.read_faces(str(out), as_pandas=True)) > 0
    manifest = json.loads(next((out / "_runs").iterdir()).read_text())
    assert manifest["files_ok"] == 4
