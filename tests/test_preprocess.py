import cv2
import numpy as np

from conftest import drawn_face, face_image
from fer_batch import detect, preprocess as P


def test_haar_finds_the_real_face_and_boxes_are_in_the_frame():
    """A real photo (skips without ../shared); the other tests use conftest.drawn_face."""
    gray = face_image()
    cascade = detect.load_cascade()
    boxes = detect.detect_faces(gray, cascade, verifier=detect.load_cascade(detect.VERIFY_CASCADE_FILE))
    assert len(boxes) >= 1
    h, w = gray.shape
    assert boxes.dtype == np.int32 and boxes.shape[1] == 4
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= w).all() and (boxes[:, 1] + boxes[:, 3] <= h).all()


def test_downscaled_detection_maps_boxes_back_to_original_pixels():
    gray = cv2.resize(drawn_face(), None, fx=2, fy=2)
    cascade = detect.load_cascade()
    full = detect.detect_faces(gray, cascade)
    small = detect.detect_faces(gray, cascade, max_side=max(gray.shape) // 2)
    assert len(small) >= 1
    big = full[np.argmax(full[:, 2])]
    match = small[np.argmax(small[:, 2])]
    assert abs(int(big[0]) - int(match[0])) < 0.1 * big[2]  # same face, same place
    assert abs(int(big[2]) - int(match[2])) < 0.2 * big[2]


def test_no_face_in_a_blank_frame():
    assert len(detect.detect_faces(np.full((240, 320), 128, np.uint8), detect.load_cascade())) == 0


def test_crop_and_prepare_shapes_and_channels():
    gray = drawn_face()
    boxes = np.array([[10, 20, 100, 100], [0, 0, 31, 57]], np.int32)
    crops = P.crop_faces(gray, boxes)
    assert crops.shape == (2, 48, 48) and crops.dtype == np.uint8
    x = P.prepare_faces(crops, ("equalized", "canny"))
    assert x.shape == (2, 2, 48, 48) and x.dtype == np.uint8
    assert set(np.unique(x[:, 1])) <= {0, 255}  # Canny edges are binary
    # training feeds raw crops of any size through the same function: same pixels
    big = cv2.resize(crops[0], (96, 96), interpolation=cv2.INTER_NEAREST)
    assert P.prepare_faces(big[None])[0].shape == (1, 48, 48)


def test_face_cropper_emits_faces_then_exactly_one_file_row(tmp_path):
    ok, jpg = cv2.imencode(".jpg", drawn_face())
    path = tmp_path / "face.jpg"
    path.write_bytes(jpg.tobytes())
    entry = dict(uri=str(path), media_type="image", size_bytes=path.stat().st_size, mtime_ns=1)
    out = list(P.FaceCropper().process(entry))
    kinds = [k for b in out for k in b["kind"]]
    assert kinds.count("file") == 1 and kinds[-1] == "file"
    assert kinds.count("face") >= 1
    assert out[-1]["status"][0] == "ok" and out[-1]["faces"][0] == kinds.count("face")
    assert out[0]["face"].shape[1:] == (1, 48, 48)
