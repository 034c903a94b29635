"""Bad and odd input through the real pipeline on a real local Ray: every file ends as exactly
one files row whose status and message name the cause, the rest of the run goes on, and
decompression bombs are refused before they cost memory (docs/failures.md)."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision

import corpus
from fer_batch import cli, decode, pipeline, readers
from fer_batch.config import AnnotateConfig

ROOT = Path(__file__).resolve().parents[1]
PEAK_MB = 64  # peak RSS growth allowed while refusing all bombs (one would cost >= 144 MB)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, corpus.write_corpus(root)


@pytest.fixture(scope="module")
def run(ray_local, corpus_dir, random_checkpoint, tmp_path_factory):
    """One real run over the whole corpus; paths/vanish.jpg is deleted between listing and
    reading (from the progress callback, which the pipeline calls right after listing)."""
    root, cases = corpus_dir
    out = tmp_path_factory.mktemp("out") / "fer"

    def progress(line):
        if "files listed" in line:
            (root / "paths" / "vanish.jpg").unlink()

    cfg = AnnotateConfig(sources=(str(root),), model=random_checkpoint, output=str(out))
    manifest = pipeline.run(cfg, progress=progress)
    files = readers.read_files(str(out), as_pandas=True)
    faces = readers.read_faces(str(out), as_pandas=True)
    rel = {str(root / k): k for k in cases}
    files["error"] = files["error"].fillna("")
    files["rel"] = files["source"].map(lambda s: rel.get(s, s))
    faces["rel"] = faces["source"].map(lambda s: rel.get(s, s))
    return cases, manifest, files, faces


def test_every_file_ends_as_one_row_with_its_status_and_cause(run):
    cases, _, files, _ = run
    listed = {k: c for k, c in cases.items() if c.listed}
    assert files["rel"].is_unique, files["rel"][files["rel"].duplicated()].tolist()
    assert sorted(files["rel"]) == sorted(listed), "every file accounted for, nothing else"
    wrong = []
    for row in files.itertuples():
        case = listed[row.rel]
        if row.status != case.status or not re.search(case.message, row.error):
            wrong.append(f"{row.rel}: {row.status} {row.error!r}, expected {case.status} "
                         f"{case.message!r}")
        elif case.faces is not None and (row.faces > 0) != case.faces:
            wrong.append(f"{row.rel}: {row.faces} faces, expected faces={case.faces}")
    assert not wrong, "\n".join(wrong)


def test_faces_are_unique_and_add_up_to_the_file_rows(run):
    _, manifest, files, faces = run
    assert not faces.duplicated(["source", "frame_index", "face_index"]).any()
    per_file = faces.groupby("rel").size().to_dict()
    assert per_file == {r.rel: r.faces for r in files.itertuples() if r.faces}
    assert manifest["faces"] == len(faces)
    assert manifest["files_ok"] + manifest["files_error"] + manifest["files_skipped"] \
        == len(files)


def test_damaged_videos_keep_the_faces_of_frames_that_decoded(run):
    cases, _, files, faces = run
    if not corpus.has_faces():
        pytest.skip(f"needs {corpus.FACE_PHOTO}")
    for rel in ("video/truncated.mp4", "video/truncated.mkv", "video/corrupt_middle.mp4"):
        row = files.set_index("rel").loc[rel]
        assert row.status == "error" and row.faces > 0, rel
        assert (faces["rel"] == rel).sum() == row.faces
    # corruption in the middle skips packets instead of ending the video there
    mid = faces[faces["rel"] == "video/corrupt_middle.mp4"]["frame_index"]
    assert mid.max() >= 30, "frames after the damaged packets were decoded too"


def test_variable_frame_rate_is_sampled_by_timestamp(run):
    _, _, files, faces = run
    if not corpus.has_faces():
        pytest.skip(f"needs {corpus.FACE_PHOTO}")
    times = [0.05 * i for i in range(10)] + [0.45 + 0.4 * i for i in range(1, 11)]  # corpus
    ts = sorted(set(faces[faces["rel"] == "video/vfr.mkv"]["timestamp_s"].round(3)))
    assert set(ts) <= {round(t, 3) for t in times}  # true presentation times
    bins = [int(t / 0.5 + 1e-6) for t in ts]
    assert len(set(bins)) == len(bins)  # --sample-fps 2: at most one frame per 0.5 s
    assert ts[0] == 0.0 and ts[-1] >= 4.0 and len(ts) >= 8  # the sparse part is sampled too


def test_odd_images_decode_right_side_up_and_first_page(corpus_dir):
    root, _ = corpus_dir
    rotated = decode.decode_image((root / "image/exif_rotated.jpg").read_bytes())
    assert rotated.shape == (180, 240)  # stored 240x180 portrait; EXIF 6 turns it back
    assert decode.decode_image((root / "image/multipage.tif").read_bytes()).shape == (180, 240)
    g16 = decode.decode_image((root / "image/gray16.png").read_bytes())
    g8 = decode.decode_image((root / "image/gray.png").read_bytes())
    assert g16.dtype == np.uint8  # scaled by its maximum: same picture, full 8-bit range
    assert np.abs(g16.astype(float) - g8 * (255.0 / g8.max())).max() <= 2
    cmyk = decode.decode_image((root / "image/cmyk.jpg").read_bytes())
    assert abs(float(cmyk.mean()) - float(g8.mean())) < 10
    _, _, frame = next(decode.iter_frames(str(root / "video/rotated_90.mp4"), every_n=1))
    assert frame.shape == (120, 160)  # stored 120 wide, 160 high; displayed landscape


def _rss_script(body: str) -> list[str]:
    """A python -c command running body in a fresh process, where peak() is the peak RSS
    in MB; body fills the dict result, printed as JSON."""
    code = textwrap.dedent("""
        import json, sys
        sys.path[:0] = [{root!r}, {tests!r}]
        from fer_batch import decode, preprocess
        import corpus
        def peak():  # VmHWM, not ru_maxrss: that one carries the parent's peak over exec
            with open("/proc/self/status") as f:
                return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024
        result = {{}}
    """).format(root=str(ROOT), tests=str(ROOT / "tests")) + textwrap.dedent(body)
    return [sys.executable, "-c", code + "\nprint(json.dumps(result))"]


def _run_json(cmd) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_bombs_are_refused_before_any_large_allocation(corpus_dir):
    """Peak memory of a fresh process while every bomb is refused, against a control that
    decodes the valid 12000x12000 PNG with the limit raised."""
    root, cases = corpus_dir
    bombs = sorted(str(root / k) for k in cases if k.startswith("bombs/"))
    got = _run_json(_rss_script(f"""
        base = peak()
        for path in {bombs!r}:
            try:
                if path.endswith(".mov"):
                    list(decode.iter_frames(path, stats=decode.VideoStats()))
                else:
                    decode.decode_image(open(path, "rb").read())
                result[path] = "decoded"
            except decode.DecodeError as e:
                result[path] = str(e)
        result["grew_mb"] = peak() - base
    """))
    grew = got.pop("grew_mb")
    assert all("(--max-pixels)" in msg for msg in got.values()), got
    assert grew < PEAK_MB, f"refusing the bombs grew the peak RSS by {grew:.0f} MB"
    control = _run_json(_rss_script(f"""
        base = peak()
        img = decode.decode_image(open({str(root / 'bombs/valid_12k.png')!r}, "rb").read(),
                                  max_pixels=10**9)
        result["shape"] = img.shape
        result["grew_mb"] = peak() - base
    """))
    assert control["shape"] == [corpus.BOMB_SIDE, corpus.BOMB_SIDE]
    assert control["grew_mb"] > 130, "the control shows what one bomb costs when decoded"


def test_long_video_streams_in_bounded_memory(tmp_path):
    """60 s of 640x360 video through FaceCropper costs little more peak memory than 2 s."""
    short = corpus.write_long_video(tmp_path / "short.mp4", 2, 640, 360)
    long = corpus.write_long_video(tmp_path / "long.mp4", 60, 640, 360)
    got = _run_json(_rss_script(f"""
        fc = preprocess.FaceCropper(sample_fps=0.2)  # decode everything, detect on a few
        def run(path):
            rows = list(fc.process(dict(uri=path, media_type="video", size_bytes=0,
                                        mtime_ns=0)))
            return rows[-1]["status"][0], int(rows[-1]["frames_decoded"][0])
        result["short"] = run({str(short)!r})
        base = peak()
        result["long"] = run({str(long)!r})
        result["grew_mb"] = peak() - base
    """))
    assert got["long"] == ["ok", 600]
    # holding its 600 frames would take 600 x 640 x 360 bytes = 138 MB in gray alone
    assert got["grew_mb"] < 40, f"a 60 s video grew the peak RSS by {got['grew_mb']:.0f} MB"


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to uid 'nobody'; needs root to do so")
def test_unreadable_files_and_folders_become_error_rows():
    """chmod 000 does not stop root, so a child process imports everything as root, drops to
    uid 65534 and then lists and reads a folder with an unreadable file and subfolder."""
    top = Path(tempfile.mkdtemp(prefix="fer-unreadable-"))
    try:
        top.chmod(0o755)
        ok, png = cv2.imencode(".png", np.full((20, 20), 128, np.uint8))
        (top / "readable.png").write_bytes(png.tobytes())
        (top / "secret.png").write_bytes(png.tobytes())
        (top / "secret.png").chmod(0)
        (top / "locked").mkdir()
        (top / "locked" / "inside.png").write_bytes(png.tobytes())
        (top / "locked").chmod(0)
        got = _run_json(_rss_script(f"""
            import os
            from fer_batch import sources
            fc = preprocess.FaceCropper()
            os.setgid(65534); os.setuid(65534)
            for e in sources.list_files([{str(top)!r}]):
                status, error = e["status"], e["error"]
                if status == "pending":
                    row = list(fc.process(e))[-1]
                    status, error = row["status"][0], row["error"][0]
                result[os.path.basename(e["uri"])] = [status, error or ""]
        """))
    finally:
        (top / "locked").chmod(0o755)
        for p in sorted(top.rglob("*"), reverse=True):
            if p.is_dir():
                p.rmdir()
            else:
                p.unlink()
        top.rmdir()
    statuses = sorted(got.values())
    assert ["ok", ""] in statuses
    assert any(s == "error" and "permission denied" in m.lower() and "secret" in m
               for s, m in statuses), got
    assert any(s == "error" and "cannot list folder" in m for s, m in statuses), got


# --- model input: fails before the run starts, with exit code 2 ---------------------------

class _Payload:
    """Unpickling this would create a file: proof that code in a checkpoint never runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_checkpoints(folder: Path, good: str) -> dict[str, tuple[Path, str]]:
    """name -> (checkpoint path, regex of the error)."""
    data = Path(good).read_bytes()
    out = {}
    (folder / "truncated.pt").write_bytes(data[:len(data) // 2])
    out["truncated"] = (folder / "truncated.pt", r"refused or unreadable checkpoint")
    (folder / "empty.pt").write_bytes(b"")
    out["empty"] = (folder / "empty.pt", r"empty file")
    out["missing"] = (folder / "missing.pt", r"cannot read model|not found")
    ck = torch.load(good, weights_only=True)
    r18 = torchvision.models.resnet18(num_classes=7).state_dict()
    torch.save(dict(ck, arch="resnet18", state_dict=r18), folder / "arch.pt")
    out["wrong arch"] = (folder / "arch.pt", r"architecture 'resnet18', expected 'resnet50'")
    torch.save(dict(ck, state_dict={f"net.{k}": v for k, v in r18.items()}),
               folder / "r18_as_r50.pt")
    out["resnet18 weights labelled resnet50"] = (folder / "r18_as_r50.pt",
                                                 r"weights do not fit resnet50")
    torch.save(r18, folder / "plain.pt")
    out["plain torchvision state_dict"] = (folder / "plain.pt", r"not a fer-batch checkpoint")
    with open(folder / "evil.pt", "wb") as f:
        pickle.dump({"format": "fer-batch/1", "payload": _Payload(str(folder / "PWNED"))}, f,
                    protocol=2)
    out["code-carrying pickle"] = (folder / "evil.pt", r"refused or unreadable checkpoint")
    torch.save({"format": "fer-batch/1", "payload": _Payload(str(folder / "PWNED"))},
               folder / "evil_torch.pt")
    out["code-carrying torch.save"] = (folder / "evil_torch.pt", r"refused or unreadable")
    return out


def test_bad_checkpoints_fail_fast_with_exit_code_2(tmp_path, random_checkpoint, capsys):
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.zeros((8, 8), np.uint8))
    for name, (path, message) in _bad_checkpoints(tmp_path, random_checkpoint).items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        code = cli.main(["annotate", str(src), "--model", str(path), "--output", str(out)])
        err = capsys.readouterr().err
        assert code == cli.EXIT_USAGE, name
        assert re.search(message, err), f"{name}: {err}"
        assert str(path) in err, f"{name}: the message names the file"
        assert not out.exists(), f"{name}: nothing written before the model was checked"
    assert not (tmp_path / "PWNED").exists(), "the pickled payload must never run"
