"""The face detectors of fer_batch/detect.py, each on real faces and on no faces, on images of
several sizes in one process (DETECTORS.md's trap), and the error that names the fix when
CenterFace's weights are missing. The annotate run with the default detector is in
test_pipeline.py."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from conftest import face_image, photo_truth, shared, truth_found
from fer_batch import cli, decode, detect

# hand-labelled faces each detector must find of the 43 (BENCHMARKS.md, "Face detectors":
# 36 for Haar at the defaults, 43 for CenterFace at the defaults), with a little room
MIN_TRUTH_FOUND = {"haar": 34, "centerface": 41}


@pytest.fixture(scope="module", params=detect.DETECTORS)
def detector(request):
    """One detector of each kind, built once and reused by the tests below (as an actor
    reuses it): any state carried between frames of different sizes would show."""
    return detect.load_detector(request.param)


def gray_photo(name: str) -> np.ndarray:
    return decode.decode_image(shared("photos", name).read_bytes())


def test_finds_the_hand_labelled_faces(detector):
    truth = photo_truth()
    found = sum(truth_found(boxes, detector(gray_photo(name))) for name, boxes in truth.items())
    assert found >= MIN_TRUTH_FOUND[detector.name]


def test_boxes_are_int32_inside_the_frame_and_sorted(detector):
    gray = gray_photo("facenet_multiface_group.jpg")
    boxes = detector(gray)
    assert len(boxes) >= 3 and boxes.dtype == np.int32 and boxes.shape[1] == 4
    h, w = gray.shape
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] > 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= w).all() and (boxes[:, 1] + boxes[:, 3] <= h).all()
    order = np.lexsort((boxes[:, 0], boxes[:, 1]))
    assert (order == np.arange(len(boxes))).all()


def test_no_face_where_there_is_none(detector):
    blank = np.full((240, 320), 128, np.uint8)
    dogs = gray_photo("noface_dlib_dogs.jpg")
    clip = shared("videos", "noface_intel_car-detection.mp4")
    frames = [g for _, _, g in decode.iter_frames(str(clip), sample_fps=0.5)][:6]
    assert [len(detector(g)) for g in [blank, dogs, *frames]] == [0] * (2 + len(frames))


def test_images_of_several_sizes_in_one_process(detector):
    """The same face in frames of other sizes and aspect ratios, one after another: each
    frame gives one box on the face, scaled with it (a detector that kept the first input's
    shapes would put boxes elsewhere, or thousands of them)."""
    face = face_image()  # 1137 x 910, one face
    first = detector(face)
    assert len(first) == 1
    for scale, canvas in ((0.5, None), (0.3, (360, 640)), (0.8, (1080, 1920)), (0.25, None),
                          (1.0, None)):
        small = cv2.resize(face, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        img, (oy, ox) = small, (0, 0)
        if canvas:  # the face pasted into a wide frame: the long side changes, not the face
            img = np.full(canvas, 40, np.uint8)
            oy, ox = (canvas[0] - small.shape[0]) // 2, (canvas[1] - small.shape[1]) // 2
            img[oy:oy + small.shape[0], ox:ox + small.shape[1]] = small
        boxes = detector(img)
        expect = first[0] * scale + np.array([ox, oy, 0, 0])
        assert len(boxes) == 1, (scale, canvas, boxes)
        assert np.abs(boxes[0] - expect).max() <= 0.15 * expect[2], (scale, canvas, boxes)
    assert (detector(face) == first).all()  # and back to the first size: the same box


def test_a_cropper_given_the_readied_centerface_imports_no_onnx_and_finds_the_same_faces():
    """The annotate driver readies CenterFace once (detect.readied_centerface) and hands the
    bytes to its croppers. A cropper that builds its detector from them imports no onnx
    (about 1 CPU s per actor, its ml_dtypes) and finds the boxes a detector built from the
    file finds."""
    import json
    import pickle
    import subprocess
    import sys

    gray = face_image()
    code = ("import pickle, sys\n"
            "from fer_batch.config import DetectorSettings\n"
            "from fer_batch.preprocess import FaceCropper\n"
            "model, gray = pickle.loads(sys.stdin.buffer.read())\n"
            "c = FaceCropper(detection=DetectorSettings(detector='centerface'),"
            " detector_model=model)\n"
            "print('onnx' in sys.modules, c.detector(gray).tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                         input=pickle.dumps((detect.readied_centerface(), gray)), timeout=120)
    onnx_imported, boxes = out.stdout.decode().split(" ", 1)
    assert onnx_imported == "False", out.stderr.decode()[-2000:]
    expected = detect.load_detector("centerface")(gray).tolist()
    assert json.loads(boxes) == expected and len(expected) == 1


def test_centerface_boxes_are_framed_like_haar_boxes():
    """The model reads crops framed around Haar boxes (crop_margin): a CenterFace box of a
    face is mapped onto the Haar box of that face (detect.CENTERFACE_TO_HAAR)."""
    from fer_batch.tracks import box_iou
    gray = gray_photo("facenet_multiface_group.jpg")
    haar, cf = detect.load_detector("haar")(gray), detect.load_detector("centerface")(gray)
    iou = box_iou(haar, cf).max(axis=1)  # each Haar face against its CenterFace box
    assert len(haar) >= 3 and np.median(iou) >= 0.75
    raw = detect.detect_centerface(gray, detect.load_centerface(), raw=True)
    assert np.median(box_iou(haar, raw).max(axis=1)) < np.median(iou)  # the mapping helps


@pytest.mark.parametrize("shape, max_side, min_face, scale", [
    ((360, 640), 576, 24, 0.9),     # the defaults: the 576 side binds, --min-face does not
    ((360, 640), 576, 48, 0.5),     # a 48 px face needs half the frame to stay 24 px
    ((1080, 1920), 576, 48, 0.3),   # 1080p: the 576 side already shrinks more
    ((200, 300), 576, 0, 1.0),      # never upscaled
    ((200, 300), 0, 96, 0.25),      # no side limit: --min-face alone
])
def test_centerface_scale(shape, max_side, min_face, scale):
    assert detect.centerface_scale(shape, max_side, min_face) == pytest.approx(scale)


def test_centerface_min_face_shrinks_the_input_and_keeps_the_faces_that_big():
    """--min-face M: CenterFace detects on a copy no larger than an M-px face needs (M px ->
    CENTERFACE_MIN_NET_FACE px) and still finds the faces of at least M px it found at the
    defaults; none smaller comes back."""
    from fer_batch.config import DetectorSettings
    from fer_batch.tracks import box_iou
    for gray in (gray_photo("facenet_multiface_group.jpg"), face_image()):
        base = detect.load_detector("centerface")(gray)
        m = int(0.9 * base[:, 2].min())  # every face found is at least m px
        assert len(base) >= 1 and m > detect.CENTERFACE_MIN_NET_FACE
        shrunk = detect.load_detector(DetectorSettings(min_face=m))(gray)
        default_scale = detect.centerface_scale(gray.shape, 576)
        assert detect.centerface_scale(gray.shape, 576, m) < 0.7 * default_scale
        assert len(shrunk) == len(base) and (shrunk[:, 2] >= m).all(), (base, shrunk)
        assert (box_iou(base, shrunk).max(axis=1) >= 0.5).all(), (base, shrunk)


def test_missing_centerface_weights_name_the_fix(monkeypatch, tmp_path, random_checkpoint,
                                                capsys):
    """The weights ship in the package; an installation without them (a copy of the code
    without its package data) is told how to mend it, and annotate exits 2 before Ray."""
    assert os.path.isfile(detect.centerface_path())  # one `pip install` has them
    monkeypatch.setattr(detect, "CENTERFACE_SHIPPED", str(tmp_path / "gone.onnx"))
    with pytest.raises(detect.DetectorUnavailable) as e:
        detect.load_detector("centerface")
    assert "reinstall fer-batch" in str(e.value) and "--detector haar" in str(e.value)
    assert cli.main(["annotate", str(tmp_path), "--model", random_checkpoint, "--output",
                     str(tmp_path / "o"), "--detector", "centerface"]) == 2
    assert "gone.onnx" in capsys.readouterr().err
    assert detect.load_detector("haar")(face_image()).shape[0] >= 1  # Haar needs no weights
