"""predict(model, faces) -> probabilities; FacePredictor, the inference actor class.

FacePredictor loads the checkpoint once in ``__init__``; ``__call__`` runs
batched ResNet-50 inference on the face rows of a batch and passes file rows
through untouched. On a GPU it uses autocast (bf16 where supported, else fp16)
and channels_last; on a CPU, fp32 and channels_last.
"""

from __future__ import annotations

import numpy as np
import torch

from fer_batch.calibrate import probabilities
from fer_batch.config import ANNOTATE_DEFAULTS
from fer_batch.model import load_checkpoint
from fer_batch.sink import check_class_names, top_labels


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA GPU is visible to this worker")
    return torch.device(device)


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, faces: np.ndarray, device: torch.device | None = None,
                   batch_size: int = ANNOTATE_DEFAULTS.batch_size, progress: bool = False,
                   flip_average: bool = ANNOTATE_DEFAULTS.flip_average) -> np.ndarray:
    """Logits for prepared faces, one view per face, or two with flip_average (the face and
    its mirror image).

    faces: np.ndarray, shape = (n, C, 48, 48), uint8 (output of preprocess.prepare_faces).
    progress: show a progress bar of faces scored (evaluate, on the console).
    Returns logits: np.ndarray, shape = (n, views, num_classes), float32.
    """
    from fer_batch.console import progress_bar
    device = device or next(model.parameters()).device
    out = []
    bar = progress_bar(len(faces), "scoring", "face") if progress else None
    for i in range(0, len(faces), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(faces[i:i + batch_size])).to(device)
        views = [_logits(model, x, device)]
        if flip_average:
            views.append(_logits(model, x.flip(-1), device))
        out.append(torch.stack(views, dim=1).cpu().numpy())
        if bar is not None:
            bar.update(len(x))
    if bar is not None:
        bar.close()
    if not out:
        k = next(reversed(list(model.modules()))).out_features
        return np.zeros((0, 2 if flip_average else 1, k), np.float32)
    return np.concatenate(out).astype(np.float32)


def predict(model: torch.nn.Module, faces: np.ndarray, device: torch.device | None = None,
            batch_size: int = ANNOTATE_DEFAULTS.batch_size, progress: bool = False,
            flip_average: bool = ANNOTATE_DEFAULTS.flip_average,
            temperature: float = 1.0) -> np.ndarray:
    """Class probabilities for prepared faces: softmax(logits / temperature), averaged over
    the face and its mirror image with flip_average (``calibrate.probabilities``).

    Returns probs: np.ndarray, shape = (n, num_classes), float32, rows sum to 1.
    """
    logits = predict_logits(model, faces, device, batch_size, progress, flip_average)
    return probabilities(logits, temperature).astype(np.float32)


def _logits(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The model's float32 logits on one batch x (n, C, h, w) uint8, on device."""
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            logits = model(x)
    else:
        logits = model(x)
    return logits.float()


def temperature_of(meta: dict) -> float:
    """The checkpoint's fitted score temperature (1 when it has none)."""
    return float((meta.get("calibration") or {}).get("temperature", 1.0))


class FacePredictor:
    """Ray actor: adds label, score, model_id and one probability column per class to the
    face rows of a batch; file rows (kind == 'file') pass through with empty predictions."""

    def __init__(self, *, checkpoint: str, device: str = ANNOTATE_DEFAULTS.device,
                 batch_size: int = ANNOTATE_DEFAULTS.batch_size,
                 min_score: float = ANNOTATE_DEFAULTS.min_score,
                 flip_average: bool = ANNOTATE_DEFAULTS.flip_average,
                 endpoint_url: str | None = None, num_threads: int = 0):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = pick_device(device)
        model, meta = load_checkpoint(checkpoint, endpoint_url)
        # NHWC convolutions: faster on GPUs, 1.75-1.87x on CPUs at batch 64-256 (BENCHMARKS.md)
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self.classes = list(meta["classes"])
        check_class_names(self.classes, checkpoint)  # no class may be named like a column
        self.model_id = meta["model_id"]
        self.batch_size, self.min_score = batch_size, min_score
        self.flip_average = flip_average
        self.temperature = temperature_of(meta)

    def __call__(self, batch: dict) -> dict:
        is_face = batch["kind"] == "face"
        n = len(is_face)
        probs = np.zeros((n, len(self.classes)), np.float32)
        if is_face.any():
            probs[is_face] = predict(self.model, batch["face"][is_face], self.device,
                                     self.batch_size, flip_average=self.flip_average,
                                     temperature=self.temperature)
        labels, scores = top_labels(probs, self.classes, self.min_score)
        batch["label"] = np.where(is_face, labels, "").astype(object)
        batch["score"] = np.where(is_face, scores, 0).astype(np.float32)
        batch["model_id"] = np.full(n, self.model_id, object)
        for j, name in enumerate(self.classes):
            batch[name] = probs[:, j]
        return batch
