"""Faces levelled by their eyes before the crop (--align eyes): the roll from CenterFace's
eye landmarks, the levelled crop, and the setting's path from the checkpoint to annotate and
evaluate."""

import cv2
import numpy as np
import pytest

from conftest import face_image
from fer_batch import detect, evaluate, model as M, pipeline, preprocess
from fer_batch.config import AnnotateConfig, ConfigError


def turned(gray: np.ndarray, degrees: float) -> np.ndarray:
    """The photo turned anticlockwise by `degrees` about its centre (edges replicated)."""
    h, w = gray.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(gray, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


def test_eye_roll_is_the_angle_of_the_eye_line_whatever_the_order():
    rolls = detect.eye_roll(np.array([[10, 20, 30, 20], [10, 20, 30, 40], [30, 40, 10, 20],
                                      [10, 40, 30, 20]]))
    assert rolls == pytest.approx([0, 45, 45, -45])


def test_a_levelled_crop_puts_both_eyes_on_one_row():
    img = np.full((200, 200), 128, np.uint8)
    cv2.circle(img, (80, 90), 6, 0, -1)  # a dark left eye, and a bright right eye lower
    cv2.circle(img, (120, 110), 6, 255, -1)
    roll = detect.eye_roll(np.array([[80, 90, 120, 110]]))
    box = np.array([[60, 60, 80, 80]])
    for crop, level in ((preprocess.crop_faces(img, box, 48, 0.1, roll)[0], True),
                        (preprocess.crop_faces(img, box, 48, 0.1)[0], False)):
        dark, bright = np.argwhere(crop < 40).mean(0), np.argwhere(crop > 215).mean(0)
        assert (abs(dark[0] - bright[0]) < 1) == level  # rows
        assert abs((dark[1] + bright[1]) / 2 - 23.5) < 2  # the eyes stay centred
    small = np.array([preprocess.MIN_ROLL_DEG / 2])  # a face rolled this little: cut as found
    assert np.array_equal(preprocess.crop_faces(img, box, 48, 0.1, small),
                          preprocess.crop_faces(img, box, 48, 0.1))


@pytest.mark.parametrize("degrees", [-20, 15])
def test_centerface_measures_the_roll_of_a_real_turned_face(degrees):
    cf = detect.load_detector("centerface")
    upright = face_image()
    boxes, rolls = cf.faces(upright)
    assert len(boxes) == 1 and abs(rolls[0]) < 5
    boxes, rolls = cf.faces(turned(upright, degrees))  # anticlockwise: the right eye goes up
    assert len(boxes) == 1 and rolls[0] == pytest.approx(-degrees, abs=5)
    assert np.array_equal(boxes, cf(turned(upright, degrees)))  # the same boxes as __call__
    haar = detect.load_detector("haar")
    hb, hr = haar.faces(upright)
    assert len(hb) == 1 and hr.tolist() == [0.0]  # no landmarks: upright


def test_a_levelled_turned_face_is_cut_like_the_upright_face():
    cf = detect.load_detector("centerface")
    upright = face_image()
    want = preprocess.largest_face(upright, cf, margin=0.1, size=48).astype(float)
    face = turned(upright, 20)
    levelled = preprocess.largest_face(face, cf, margin=0.1, size=48, align="eyes")
    as_found = preprocess.largest_face(face, cf, margin=0.1, size=48)
    err = [np.abs(c.astype(float) - want).mean() for c in (levelled, as_found)]
    assert err[0] < 0.6 * err[1], err


def test_the_checkpoint_carries_align_and_annotate_refuses_what_cannot_cut_it(tmp_path):
    import torch
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    M.save_checkpoint(str(path), M.build_model(), classes=M.EMOTIONS,
                      model_args=dict(num_classes=7, in_channels=1, stem="imagenet"),
                      channels=["equalized"], align="eyes")
    _, meta = M.load_checkpoint(str(path))
    assert M.align_of(meta) == "eyes"
    cfg = AnnotateConfig(sources=("x",), model=str(path))
    pipeline.check_geometry(cfg, meta)  # CenterFace on the croppers: fine
    for bad in (dict(detector="haar"), dict(detect_on="pool")):
        with pytest.raises(ConfigError, match="align eyes"):
            pipeline.check_geometry(AnnotateConfig(sources=("x",), model=str(path), **bad),
                                    meta)
    old = dict(meta, preprocessing={"crop_margin": 0.1})  # written before align existed
    assert M.align_of(old) == "none"
    bad = torch.load(str(path), weights_only=True)
    bad["preprocessing"]["align"] = "nose"
    torch.save(bad, str(tmp_path / "bad.pt"))
    with pytest.raises(M.CheckpointError, match="align 'nose'"):
        M.load_checkpoint(str(tmp_path / "bad.pt"))


def test_evaluate_cuts_faces_as_the_checkpoint_says_unless_told(tmp_path, random_checkpoint):
    for label, degrees in (("happy", 20), ("sad", -15)):
        folder = tmp_path / "data" / label
        folder.mkdir(parents=True)
        cv2.imwrite(str(folder / "a.png"), turned(face_image(), degrees))
    import pandas as pd
    got = {a: evaluate.evaluate_folder(str(tmp_path / "data"), random_checkpoint,
                                       str(tmp_path / f"eval-{a}"), detect_faces=True, align=a)
           for a in (None, "eyes")}
    assert got[None]["align"] == "none" and got["eyes"]["align"] == "eyes"
    assert got[None]["n"] == got["eyes"]["n"] == 2
    scores = [pd.read_parquet(tmp_path / f"eval-{a}" / "predictions.parquet")["score"]
              for a in (None, "eyes")]
    assert not np.allclose(scores[0], scores[1])  # the model saw other pixels
