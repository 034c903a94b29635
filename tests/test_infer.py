"""fer_batch.infer: batched prediction and the FacePredictor actor class, without Ray.

The model is a real ResNet-50 with random weights written by the real checkpoint code
(conftest.random_checkpoint); the faces are 48x48 crops of a face drawn by the tests (conftest.drawn_face)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import drawn_face
from fer_batch import detect, infer, preprocess, sink
from fer_batch.model import load_checkpoint


def faces_batch(n_faces: int) -> dict:
    """A stream batch as the croppers emit it: n_faces face rows, then one file row."""
    gray = drawn_face()
    boxes = detect.detect_faces(gray, detect.load_cascade())[:1].repeat(n_faces, 0)
    crops = preprocess.prepare_faces(preprocess.crop_faces(gray, boxes, margin=0.1))
    kind = np.array(["face"] * n_faces + ["file"], object)
    face = np.concatenate([crops, np.zeros((1, 1, 48, 48), np.uint8)])
    return {"kind": kind, "face": face, "source": np.array(["x.jpg"] * (n_faces + 1), object)}


def distinct_faces_batch(n_faces: int) -> dict:
    """n_faces different crops of the face: the box moved and grown step by step, so the
    GPU-against-CPU check compares n samples, not n copies of one."""
    gray = drawn_face()
    box = detect.detect_faces(gray, detect.load_cascade())[0]
    boxes = np.array([[box[0] + i % 8 - 4, box[1] + i // 8 % 8 - 4, box[2] + i % 5,
                       box[3] + i % 5] for i in range(n_faces)])
    crops = preprocess.prepare_faces(preprocess.crop_faces(gray, boxes, margin=0.1))
    return {"kind": np.array(["face"] * n_faces, object), "face": crops,
            "source": np.array(["x.jpg"] * n_faces, object)}


def test_distinct_faces_differ():
    faces = distinct_faces_batch(64)["face"]
    assert len({f.tobytes() for f in faces}) == 64


def test_predict_returns_probabilities(random_checkpoint):
    model, meta = load_checkpoint(random_checkpoint)
    probs = infer.predict(model, faces_batch(5)["face"][:5], batch_size=2)
    assert probs.shape == (5, len(meta["classes"])) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert infer.predict(model, np.zeros((0, 1, 48, 48), np.uint8)).shape == (0, 7)


def test_face_predictor_labels_face_rows_only(random_checkpoint):
    pred = infer.FacePredictor(checkpoint=random_checkpoint, device="cpu", batch_size=4,
                               min_score=0.0)  # the most probable class, never uncertain
    out = pred(faces_batch(3))
    classes = pred.classes
    assert list(out["label"][:3]) == [classes[i] for i in
                                       np.stack([out[c] for c in classes], 1)[:3].argmax(1)]
    assert out["label"][3] == "" and out["score"][3] == 0  # the file row is not a face
    assert np.allclose(sum(out[c][:3] for c in classes), 1, atol=1e-5)
    assert (out["model_id"] == load_checkpoint(random_checkpoint)[1]["model_id"]).all()


def test_min_score_makes_low_confidence_faces_uncertain(random_checkpoint):
    pred = infer.FacePredictor(checkpoint=random_checkpoint, device="cpu", min_score=0.99)
    out = pred(faces_batch(2))
    assert list(out["label"][:2]) == [sink.UNCERTAIN] * 2  # random weights: never 99% sure
    assert (out["score"][:2] > 0).all()  # the probabilities are kept


@pytest.mark.requires_cuda
def test_gpu_path_agrees_with_cpu(random_checkpoint):
    """The GPU path (bf16/fp16 autocast, channels_last): same labels as the CPU, close
    probabilities. Run with `pytest -m requires_cuda` on a machine with a GPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    batch = distinct_faces_batch(64)
    cpu = infer.FacePredictor(checkpoint=random_checkpoint, device="cpu")(dict(batch))
    gpu = infer.FacePredictor(checkpoint=random_checkpoint, device="cuda")(dict(batch))
    classes = infer.FacePredictor(checkpoint=random_checkpoint, device="cpu").classes
    p_cpu = np.stack([cpu[c] for c in classes], 1)
    p_gpu = np.stack([gpu[c] for c in classes], 1)
    assert np.abs(p_cpu - p_gpu).max() < 0.02
    assert (p_cpu[:64].argmax(1) == p_gpu[:64].argmax(1)).mean() > 0.95


def test_flip_average_is_the_mean_over_the_face_and_its_mirror(random_checkpoint):
    model, _ = load_checkpoint(random_checkpoint)
    faces = faces_batch(3)["face"][:3]
    plain = infer.predict(model, faces, flip_average=False)
    mirror = infer.predict(model, np.ascontiguousarray(faces[..., ::-1]), flip_average=False)
    both = infer.predict(model, faces, flip_average=True)
    np.testing.assert_allclose(both, (plain + mirror) / 2, atol=1e-6)
    assert not np.allclose(plain, mirror)  # a face is not its own mirror image
    np.testing.assert_allclose(both.sum(axis=1), 1, atol=1e-5)
