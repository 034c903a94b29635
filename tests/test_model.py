import os

import numpy as np
import pytest
import torch

from fer_batch import infer, model as M


def test_checkpoint_roundtrip_keeps_classes_and_id(tmp_path, random_checkpoint):
    net, meta = M.load_checkpoint(random_checkpoint)
    assert meta["classes"] == list(M.EMOTIONS)
    assert meta["input"]["size"] == 48 and meta["input"]["channels"] == ["equalized"]
    assert len(meta["model_id"]) == 16
    # the id is a content hash of the weights: re-saving gives the same id
    again = M.save_checkpoint(str(tmp_path / "m.pt"), net, classes=meta["classes"],
                              model_args=meta["model_args"], channels=["equalized"])
    assert again == meta["model_id"]


def test_other_label_sets_work_unchanged(tmp_path):
    classes = ["anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"]
    path = str(tmp_path / "jaffe.pt")
    M.save_checkpoint(path, M.build_model(num_classes=7), classes=classes,
                      model_args=dict(num_classes=7, in_channels=1, stem="imagenet"),
                      channels=["equalized"])
    pred = infer.FacePredictor(checkpoint=path, device="cpu", min_score=0.0)
    batch = {"kind": np.array(["face", "file"], object),
             "face": np.random.default_rng(0).integers(0, 255, (2, 1, 48, 48), np.uint8)}
    out = pred(batch)
    assert set(classes) <= set(out)
    assert out["label"][0] in classes and out["label"][1] == ""
    assert np.isclose(sum(out[c][0] for c in classes), 1.0, atol=1e-4)


def test_predict_probabilities_sum_to_one(random_checkpoint):
    net, _ = M.load_checkpoint(random_checkpoint)
    faces = np.random.default_rng(1).integers(0, 255, (5, 1, 48, 48), np.uint8)
    probs = infer.predict(net, faces, torch.device("cpu"), batch_size=2)
    assert probs.shape == (5, 7) and probs.dtype == np.float32
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/fer_batch_pickle_payload_ran"


def test_a_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    path = tmp_path / "evil.pt"
    torch.save({"format": M.FORMAT, "arch": M.ARCH, "x": Payload()}, path)
    with pytest.raises(M.CheckpointError, match="refused"):
        M.load_checkpoint(str(path))
    assert not os.path.exists(MARKER)


def test_damaged_and_foreign_checkpoints_fail_with_the_file_name(tmp_path, random_checkpoint):
    data = open(random_checkpoint, "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(M.CheckpointError, match="cut.pt"):
        M.load_checkpoint(str(tmp_path / "cut.pt"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(M.CheckpointError, match="not a fer-batch checkpoint"):
        M.load_checkpoint(str(tmp_path / "other.pt"))
    with pytest.raises(M.CheckpointError, match="fer-batch train"):
        M.load_checkpoint(str(tmp_path / "missing.pt"))
