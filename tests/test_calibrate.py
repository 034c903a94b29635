"""fer_batch.calibrate: the temperature fit, ECE and accuracy by coverage, on logits whose
true calibration is known; the temperature's way through the checkpoint into predict."""

from __future__ import annotations

import numpy as np
import pytest

from fer_batch import calibrate


def drawn(n: int, temperature: float, seed: int = 0):
    """Logits (n, 1, 5) and labels drawn from softmax(logits / temperature): a model whose
    right temperature is `temperature`."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, 1, 5))
    p = calibrate.softmax(logits[:, 0], temperature)
    y = np.array([rng.choice(5, p=row) for row in p])
    return logits, y


def test_fit_temperature_finds_the_temperature_the_labels_were_drawn_with():
    for true_t in (0.5, 1.0, 2.5):
        logits, y = drawn(4000, true_t)
        assert abs(calibrate.fit_temperature(logits, y) - true_t) / true_t < 0.1


def test_the_fitted_temperature_lowers_ece_and_nll():
    logits, y = drawn(4000, 2.5)  # the raw softmax is too sharp
    t = calibrate.fit_temperature(logits, y)
    raw, fit = calibrate.probabilities(logits), calibrate.probabilities(logits, t)
    assert calibrate.nll(fit, y) < calibrate.nll(raw, y)
    e_raw = calibrate.ece(raw.max(1), raw.argmax(1) == y)
    e_fit = calibrate.ece(fit.max(1), fit.argmax(1) == y)
    assert e_fit < 0.03 < e_raw


def test_the_checkpoints_calibration_entry_says_what_was_fitted_on_what():
    logits, y = drawn(2000, 2.5)
    entry = calibrate.calibration_entry(logits, y)
    assert entry["temperature"] == pytest.approx(calibrate.fit_temperature(logits, y))
    assert entry["n"] == 2000 and entry["flip_average"] is False  # one view per face
    assert entry["ece_after"] < entry["ece_before"] and entry["nll_after"] < entry["nll_before"]
    two_views = calibrate.calibration_entry(np.concatenate([logits, logits], axis=1), y)
    assert two_views["flip_average"] is True
    assert two_views["temperature"] == pytest.approx(entry["temperature"], rel=1e-3)


def test_ece_by_hand():
    scores = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([1, 1, 1, 0])
    # bin of 0.95: accuracy 1, score .95 -> .05; bin of .55: accuracy .5 -> .05; each half
    assert calibrate.ece(scores, correct) == pytest.approx(0.05)
    assert calibrate.ece(np.array([1.0]), np.array([1])) == 0  # a score of 1: the last bin
    bins = calibrate.reliability(scores, correct)
    assert len(bins) == calibrate.ECE_BINS and sum(b["n"] for b in bins) == 4


def test_accuracy_at_coverage_keeps_the_most_confident_first():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    correct = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    cov = calibrate.accuracy_at_coverage(scores, correct)
    assert cov["1"]["accuracy"] == 0.5 and cov["0.5"]["accuracy"] == 1.0
    assert cov["0.8"]["n"] == 8 and cov["0.8"]["min_score"] == 0.2
    assert list(cov) == ["1", "0.9", "0.8", "0.7", "0.5"]


def test_probabilities_average_the_views_after_the_temperature():
    logits = np.array([[[2.0, 0.0], [0.0, 2.0]]])  # the face says 0, its mirror 1
    assert calibrate.probabilities(logits, 1.0)[0] == pytest.approx([0.5, 0.5])
    one = calibrate.probabilities(logits[:, :1], 2.0)[0]
    assert one == pytest.approx(calibrate.softmax(np.array([1.0, 0.0])))


def test_predict_applies_the_temperature_and_the_checkpoint_carries_it(tmp_path):
    import torch

    from fer_batch import infer
    from fer_batch import model as M
    torch.manual_seed(0)
    net = M.build_model().eval()
    faces = np.random.default_rng(0).integers(0, 256, (4, 1, 48, 48), dtype=np.uint8)
    logits = infer.predict_logits(net, faces, flip_average=True)
    assert logits.shape == (4, 2, 7)
    hot = infer.predict(net, faces, temperature=0.5)
    np.testing.assert_allclose(hot, calibrate.probabilities(logits, 0.5), rtol=1e-5, atol=1e-6)
    path = tmp_path / "model.pt"
    M.save_checkpoint(str(path), net, classes=M.EMOTIONS, channels=["equalized"],
                      model_args=dict(num_classes=7, in_channels=1, stem="imagenet"),
                      calibration=dict(temperature=1.7, n=10))
    _, meta = M.load_checkpoint(str(path))
    assert infer.temperature_of(meta) == pytest.approx(1.7)
    ckpt = torch.load(path, weights_only=True)
    ckpt["calibration"] = {"temperature": -1.0}
    with pytest.raises(M.CheckpointError, match="temperature"):
        M.check_checkpoint(ckpt, "bad.pt")
    assert infer.temperature_of({}) == 1.0  # checkpoints before calibration: as before
