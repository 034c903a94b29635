"""Scores that mean what they say: a temperature fitted on held-out training images, the
expected calibration error and accuracy by coverage. Pure numpy on logits and scores.

A model's top probability (``score``) is calibrated when, among the faces scored about 0.7,
about 70% are labelled right. Training with label smoothing and augmentation leaves the
softmax too flat or too sharp; one temperature T, probabilities = softmax(logits / T), fitted
by minimising the negative log-likelihood on images the model never trained on
(``--calibration-fraction`` of the training data, never a test image), corrects most of it
(Guo et al., "On Calibration of Modern Neural Networks", ICML 2017). T is stored in the
checkpoint (``calibration.temperature``); annotate and evaluate apply it.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15  # equal-width bins of the score, as Guo et al.
COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.5)  # shares of faces kept, most confident first
TEMPERATURE_RANGE = (0.05, 20.0)  # searched on a log scale


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the last axis, float64."""
    z = np.asarray(logits, np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities from logits of shape (n, views, classes): the mean over the views
    (the face and its mirror image with flip averaging) of softmax(logits / T)."""
    return softmax(logits, temperature).mean(axis=1)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the NLL of `probabilities(logits, T)` on (logits, y)."""
    from scipy.optimize import minimize_scalar
    lo, hi = np.log(TEMPERATURE_RANGE)
    res = minimize_scalar(lambda t: nll(probabilities(logits, np.exp(t)), y),
                          bounds=(lo, hi), method="bounded", options=dict(xatol=1e-4))
    return float(np.exp(res.x))


def ece(scores: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the mean |accuracy - mean score| over equal-width score
    bins, weighted by the bin's share of the faces."""
    scores, correct = np.asarray(scores, np.float64), np.asarray(correct, np.float64)
    if not len(scores):
        return 0.0
    which = np.minimum((scores * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - scores[sel].mean())
    return float(total)


def reliability(scores: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per score bin: its range, the faces in it, their mean score and accuracy."""
    scores, correct = np.asarray(scores, np.float64), np.asarray(correct, np.float64)
    which = np.minimum((scores * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        sel = which == b
        out.append(dict(lo=b / bins, hi=(b + 1) / bins, n=int(sel.sum()),
                        score=float(scores[sel].mean()) if sel.any() else None,
                        accuracy=float(correct[sel].mean()) if sel.any() else None))
    return out


def accuracy_at_coverage(scores: np.ndarray, correct: np.ndarray,
                         coverages=COVERAGES) -> dict:
    """{coverage: accuracy of the most confident `coverage` share of the faces, and the
    score of the last face kept} ("0.8" -> {"accuracy", "min_score", "n"})."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    out = {}
    for c in coverages:
        k = max(1, int(round(c * len(order)))) if len(order) else 0
        kept = order[:k]
        out[f"{c:g}"] = dict(accuracy=float(np.mean(correct[kept])) if k else 0.0,
                             min_score=float(scores[kept[-1]]) if k else 0.0, n=k)
    return out


def summarize(probs: np.ndarray, y: np.ndarray) -> dict:
    """ECE, NLL and accuracy by coverage of calibrated probabilities against labels y."""
    score, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    return dict(ece=ece(score, correct), nll=nll(probs, y),
                accuracy_at_coverage=accuracy_at_coverage(score, correct),
                reliability=reliability(score, correct))


def calibration_entry(logits: np.ndarray, y: np.ndarray) -> dict:
    """The checkpoint's ``calibration`` entry from a model's logits (n, views, classes) on
    held-out faces with labels y (``infer.predict_logits``, the annotate scoring path; two
    views: flip averaging): the fitted temperature, n, flip_average, and the ECE and NLL
    before and after."""
    t = fit_temperature(logits, y)
    before, after = probabilities(logits), probabilities(logits, t)
    return dict(temperature=t, n=int(len(y)), flip_average=logits.shape[1] == 2,
                ece_before=ece(before.max(1), before.argmax(1) == y),
                ece_after=ece(after.max(1), after.argmax(1) == y),
                nll_before=nll(before, y), nll_after=nll(after, y))
