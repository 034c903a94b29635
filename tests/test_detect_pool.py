"""The detector pool (--detect-on pool): CenterFace as a torch module, many frames per call,
finished by the croppers. Run on the CPU here (no GPU in CI): the same network, so the
same faces as ONNX Runtime's CenterFace, and an annotate run through a real Ray whose
croppers send their frames to the pool actor."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from conftest import encode_video, face_image
from fer_batch import detect
from fer_batch.config import DetectorSettings

pytest.importorskip("onnx2torch", reason="the detector pool needs onnx2torch (make setup)")
try:
    detect.centerface_path()
except detect.DetectorUnavailable as e:
    pytest.skip(str(e), allow_module_level=True)


def frames() -> list[np.ndarray]:
    """Frames of three sizes with the shared portrait at different places and sizes, and
    one without a face."""
    face = face_image()
    out = []
    for (h, w), at, fh in [((360, 640), (40, 30), 300), ((720, 1280), (700, 100), 500),
                           ((360, 640), (380, 60), 240), ((480, 640), None, 0)]:
        f = np.full((h, w), 90, np.uint8)
        if fh:
            fw = round(fh * face.shape[1] / face.shape[0])
            f[at[1]:at[1] + fh, at[0]:at[0] + fw] = cv2.resize(face, (fw, fh),
                                                                interpolation=cv2.INTER_AREA)
        out.append(f)
    return out


def test_pool_finds_the_same_boxes_as_onnx_runtime():
    from fer_batch.detect_torch import CenterFaceBatch
    s = DetectorSettings(detector="centerface")
    here = detect.load_detector(s)
    pool = CenterFaceBatch(threshold=s.centerface_threshold, device="cpu")
    grays = frames()
    smalls, scales = zip(*(detect.centerface_small(g, s.centerface_max_side, s.min_face)
                            for g in grays))
    found = pool(list(smalls))  # three sizes in one call: grouped by shape inside
    got = [detect.centerface_boxes(b, sc, scale, g.shape, threshold=s.centerface_threshold,
                                   min_face=s.min_face)
           for (b, sc), scale, g in zip(found, scales, grays)]
    want = [here(g) for g in grays]
    assert [len(b) for b in want] == [1, 1, 1, 0]
    for a, b in zip(got, want):
        assert a.shape == b.shape and np.abs(a.astype(int) - b).max(initial=0) <= 1


def test_annotate_with_the_detector_pool_finds_what_the_croppers_find(
        ray_local, random_checkpoint, tmp_path):
    """A real Ray run with --detect-on pool (the pool actor on the CPU: no GPU here) writes
    the faces that detection in the croppers finds in the same decoded frames, and the
    manifest says where detection ran."""
    import fer_batch
    from fer_batch import cli, decode
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    grays = frames()
    cv2.imwrite(str(src / "photo.png"), grays[1])
    encode_video(src / "clip.mp4", [grays[0]] * 6 + [grays[2]] * 6, fps=4)
    assert cli.main(["annotate", str(src), "--model", random_checkpoint, "--output", str(out),
                     "--detect-on", "pool"]) == 0
    manifest = json.loads(next((out / "_runs").glob("*.json")).read_text())
    assert manifest["detected_on"] == "pool (cpu)"
    faces = fer_batch.read_faces(str(out), as_pandas=True).sort_values(
        ["source", "frame_index", "face_index"])
    here = detect.load_detector("centerface")
    want = [(str(src / "clip.mp4"), i, *box) for i, _, g in decode.iter_frames(
        str(src / "clip.mp4")) for box in here(g).tolist()]
    want += [(str(src / "photo.png"), 0, *box) for box in here(grays[1]).tolist()]
    got = list(faces[["source", "frame_index", "x", "y", "w", "h"]].itertuples(
        index=False, name=None))
    assert len(got) == len(want) >= 7  # the photo and each sampled frame of the clip
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert np.abs(np.array([g[2:] for g in got]) - np.array([w[2:] for w in want])).max() <= 1


def test_pool_with_haar_is_a_one_line_error(random_checkpoint, tmp_path, capsys):
    from fer_batch import cli
    (tmp_path / "a.png").write_bytes(cv2.imencode(".png", frames()[0])[1].tobytes())
    assert cli.main(["annotate", str(tmp_path / "a.png"), "--model", random_checkpoint,
                     "--output", str(tmp_path / "out"), "--detect-on", "pool",
                     "--detector", "haar"]) == 2
    assert "--detect-on pool runs CenterFace" in capsys.readouterr().err
