"""CenterFace on torch, many frames per call: the detector of the GPU pool (--detect-on pool).

The network and weights are detect.py's (``centerface.onnx``, shipped in fer_batch/models),
converted to a torch module by onnx2torch, so that a batch of frames runs in one call on
the GPU. The work is split where the bytes are smallest:

    cropper (CPU):  gray frame -> detect.centerface_small -> (H, W) uint8, scale
    pool (GPU):     [(H, W) uint8, ...] -> CenterFaceBatch -> [(boxes, scores), ...]
    cropper (CPU):  detect.centerface_boxes (NMS, scale back, Haar framing) -> boxes

``PoolDetector`` is the croppers' side (both cropper steps; it pickles into every cropper),
``CenterFaceBatch`` the pool actor's. A 1080p frame travels as 576x352 bytes (200 KB) and
comes back as a few candidate boxes;
the full frame stays with the cropper, which cuts the 48x48 faces from it. The pool's
boxes equal ONNX Runtime's within a pixel (tests/test_detect_pool.py).
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np

from fer_batch.config import DetectorSettings
from fer_batch.detect import (DetectorUnavailable, centerface_boxes, centerface_path,
                              centerface_small, decode_centerface, installed)

NO_ONNX2TORCH = ("--detect-on pool needs onnx and onnx2torch (CenterFace as a torch module): "
                 "run `python -m pip install onnx 'onnx2torch>=1.5'` (make setup does), or "
                 "use --detect-on cpu")
POOL_BATCH = 64  # frames per forward pass at most (activation memory grows with it)


def load_centerface_torch(path: str | None = None, device: str = "cpu"):
    """CenterFace as an eval-mode torch module on device. Raises DetectorUnavailable (the
    message names the fix) when onnx/onnx2torch or the weights are missing."""
    path = path or centerface_path()
    try:
        import onnx
        from onnx2torch import convert
    except ImportError as e:
        raise DetectorUnavailable(NO_ONNX2TORCH) from e
    return convert(onnx.load(path)).eval().to(device)


def torch_detector_installed() -> bool:
    return installed("onnx", "onnx2torch")


def check_torch_detector() -> None:
    """Fail fast, before Ray starts: what --detect-on pool needs is installed."""
    centerface_path()
    if not torch_detector_installed():
        raise DetectorUnavailable(NO_ONNX2TORCH)


class CenterFaceBatch:
    """smalls -> candidates: ``detect.centerface_small`` frames (any mix of sizes) in,
    ``detect.decode_centerface``'s (boxes, scores) per frame out, in the same order.
    Frames of one size run together, POOL_BATCH at a time."""

    def __init__(self, *, threshold: float, device: str = "auto", path: str | None = None,
                 threads: int = 0):
        """threads: torch CPU threads (0 = leave torch's setting; the pool on a CPU uses 1)."""
        import torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads:
            torch.set_num_threads(threads)
        self.device, self.threshold = device, threshold
        self.net = load_centerface_torch(path, device)

    def detect(self, smalls: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The pool actor's method (PoolDetector below calls it): the same as calling."""
        return self(smalls)

    def __call__(self, smalls: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        import torch
        out: list = [None] * len(smalls)
        by_shape = defaultdict(list)
        for i, small in enumerate(smalls):
            by_shape[small.shape].append(i)
        with torch.inference_mode():
            for idx in by_shape.values():
                for lo in range(0, len(idx), POOL_BATCH):
                    chunk = idx[lo:lo + POOL_BATCH]
                    x = torch.from_numpy(np.stack([smalls[i] for i in chunk]))
                    x = x.to(self.device).float()[:, None].expand(-1, 3, -1, -1)
                    # the landmarks (4th output) stay on the device: nothing reads them
                    heat, sizes, offset = (t.float().cpu().numpy() for t in self.net(x)[:3])
                    for k, i in enumerate(chunk):
                        out[i] = decode_centerface(heat[k:k + 1], sizes[k:k + 1],
                                                   offset[k:k + 1], self.threshold)
        return out


class PoolDetector:
    """The croppers' side of the detector pool (--detect-on pool), passed to every
    FaceCropper (it pickles: actor handles and settings). A call downscales its frames
    (detect.centerface_small), sends them to one pool actor (in turn, from a random start)
    and finishes the candidates that come back (detect.centerface_boxes): [gray] -> [boxes]."""

    def __init__(self, actors: list, settings: DetectorSettings):
        self.actors, self.settings = actors, settings
        self.turn = int.from_bytes(os.urandom(2), "little")  # croppers spread over the pool

    def __call__(self, grays: list) -> list:
        if not grays:
            return []
        s = self.settings
        smalls, scales = zip(*(centerface_small(g, s.centerface_max_side, s.min_face)
                                for g in grays))
        self.turn += 1
        import ray  # here, not at module load: the torch-level network imports without Ray
        found = ray.get(self.actors[self.turn % len(self.actors)].detect.remote(list(smalls)))
        return [centerface_boxes(boxes, scores, scale, g.shape, threshold=s.centerface_threshold,
                                 min_face=s.min_face)
                for (boxes, scores), scale, g in zip(found, scales, grays)]
