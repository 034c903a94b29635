"""fer_batch.labeled: the expression vocabulary, labeled folders, and the one crop function
that training (--detect-faces) and annotation share."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import face_image
from fer_batch import labeled, preprocess
from fer_batch.config import DetectorSettings


@pytest.mark.parametrize("folder, name", [
    ("angry", "anger"), ("Anger", "anger"), ("happy", "happiness"), ("HAPPINESS", "happiness"),
    ("sad", "sadness"), ("disgusted", "disgust"), ("fearful", "fear"), ("surprised", "surprise"),
    ("calm", "neutral"), ("neutral", "neutral"), ("contempt", "contempt"),
    ("thinking", "thinking")])  # outside the vocabulary: kept, so custom label sets train
def test_vocabulary_maps_synonyms_to_canonical_names(folder, name):
    assert labeled.canonical(folder) == name


def _folder(root, names, n=2):
    for name in names:
        (root / name).mkdir(parents=True)
        for j in range(n):
            cv2.imwrite(str(root / name / f"{j}.png"), np.full((48, 48), 40 * j, np.uint8))
    (root / "notes.txt").write_text("not an image")
    return root


def test_list_labeled_returns_canonical_classes(tmp_path):
    data = _folder(tmp_path / "fer", ["angry", "happy", "neutral"])
    paths, labels, classes = labeled.list_labeled(str(data))
    assert classes == ["anger", "happiness", "neutral"]
    assert paths[0] == "angry/0.png" and labels[0] == "anger" and len(paths) == 6


def test_union_of_folders_with_different_names(tmp_path):
    a = _folder(tmp_path / "a", ["happy", "sad"])
    b = _folder(tmp_path / "b", ["happiness", "contempt"], n=1)
    items, labels, classes = labeled.list_many((str(a), str(b)))
    assert classes == ["contempt", "happiness", "sadness"]
    assert len(items) == 6 and items[-1] == (str(b), "happiness/0.png")
    assert labels.count("happiness") == 3


def test_expand_boxes_grows_and_clips():
    boxes = np.array([[10, 10, 20, 20], [0, 0, 10, 10]])
    out = preprocess.expand_boxes(boxes, 0.25, width=32, height=100)
    assert out.tolist() == [[5, 5, 27, 30], [0, 0, 12, 12]]  # clipped at x = 32 and at 0
    assert preprocess.expand_boxes(boxes, 0.0, 35, 100).tolist() == boxes.tolist()


@pytest.mark.parametrize("margin, detector", [(0.0, "haar"), (0.2, "haar"),
                                              (0.1, "centerface")])
def test_training_and_annotation_crop_a_face_identically(tmp_path, margin, detector):
    """labeled.load_faces(detect_faces=True) (training and evaluate --detect-faces) and the
    annotate actor (FaceCropper with the CLI's settings of that detector) give the same
    model input; both take annotate's default detector when none is named."""
    ok, jpg = cv2.imencode(".jpg", face_image())
    (tmp_path / "happy").mkdir()
    path = tmp_path / "happy" / "face.jpg"
    path.write_bytes(jpg.tobytes())
    cropper = preprocess.FaceCropper(detection=DetectorSettings(detector=detector),
                                     crop_margin=margin)
    entry = dict(uri=str(path), media_type="image", size_bytes=path.stat().st_size, mtime_ns=1)
    batches = [b for b in cropper.process(entry) if "face" in b]
    annotated = np.concatenate([b["face"][np.asarray(b["kind"]) == "face"] for b in batches])
    assert len(annotated) == 1
    faces, ok_mask, skipped = labeled.load_faces([(str(tmp_path), "happy/face.jpg")],
                                                 detect_faces=True, crop_margin=margin,
                                                 detector=detector)
    assert ok_mask.all() and not skipped
    assert np.array_equal(faces, annotated)
    if detector == DetectorSettings().detector:  # the defaults of both: the same detector
        default, _, _ = labeled.load_faces([(str(tmp_path), "happy/face.jpg")],
                                           detect_faces=True, crop_margin=margin)
        assert np.array_equal(default, annotated)
