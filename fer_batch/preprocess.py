"""The paper's algorithms 1 and 2 around the face detector (detect.py): equalize, crop,
resize to 48x48, Canny.

Pure functions on numpy arrays, plus ``FaceCropper``, the callable class that
Ray turns into the CPU actor pool: it reads a file, decodes it, detects and
crops faces in one task, so full frames never leave the worker; only 48x48
crops and their metadata flow on.

Training and annotation share ``prepare_faces``: the model sees exactly the
same pixels in both, so the two cannot drift.
"""

from __future__ import annotations

import json
import os
import time

import cv2
import numpy as np

from fer_batch import decode, segments, sink, storage
from fer_batch.config import (ANNOTATE_DEFAULTS, FACE_SIZE,
                              TRAIN_DEFAULTS, DetectorSettings)
from fer_batch.detect import load_detector

CANNY_THRESHOLDS = (100, 200)  # OpenCV tutorial defaults; used for the optional edge channel
CHANNELS = tuple(TRAIN_DEFAULTS.channels.split(","))  # the default model input planes
FRAMES_PER_YIELD = 16  # video frames per output batch: bounds memory on long videos
MIN_ROLL_DEG = 2.0  # --align eyes: faces rolled less than this are cut as they are
POOL_CHUNK = 16  # sampled frames held for one call to the GPU pool's detector (--detect-on pool)


def equalize(gray: np.ndarray) -> np.ndarray:
    """Histogram equalization. gray: shape = (h, w), uint8 -> same."""
    return cv2.equalizeHist(gray)


def expand_boxes(boxes: np.ndarray, margin: float, width: int, height: int) -> np.ndarray:
    """Grow each box by `margin` x its side on every side, clipped to the frame.

    The crop framing is part of the model (stored in the checkpoint as crop_margin): Haar
    boxes are tighter than FER2013's crops (forehead and chin), so a model trained on those
    reads annotate's crops best with a margin. boxes: shape = (n, 4) x, y, w, h -> same.
    """
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    if margin <= 0 or len(boxes) == 0:
        return boxes.astype(np.int32)
    x, y, w, h = boxes.T
    dx, dy = np.round(w * margin).astype(np.int64), np.round(h * margin).astype(np.int64)
    x0, y0 = np.clip(x - dx, 0, width - 1), np.clip(y - dy, 0, height - 1)
    x1, y1 = np.clip(x + w + dx, x0 + 1, width), np.clip(y + h + dy, y0 + 1, height)
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=1).astype(np.int32)


def crop_faces(gray: np.ndarray, boxes: np.ndarray, size: int = FACE_SIZE,
               margin: float = 0.0, rolls: np.ndarray | None = None) -> np.ndarray:
    """The one crop function of training (--detect-faces) and annotation: each box grown by
    `margin` (see expand_boxes), cut out and resized to size x size. rolls: each face's
    roll in degrees (detect.eye_roll; --align eyes): a face rolled by more than MIN_ROLL_DEG
    is first turned upright about its box's centre (``level_face``), then cut the same way.
    Returns shape = (n, size, size), uint8."""
    grown = expand_boxes(boxes, margin, gray.shape[1], gray.shape[0])
    out = np.empty((len(grown), size, size), np.uint8)
    for i, (x, y, w, h) in enumerate(grown):
        if rolls is not None and abs(rolls[i]) > MIN_ROLL_DEG:
            out[i] = level_face(gray, boxes[i], margin, float(rolls[i]), size)
        else:
            out[i] = cv2.resize(gray[y:y + h, x:x + w], (size, size),
                                interpolation=cv2.INTER_AREA)
    return out


def level_face(gray: np.ndarray, box, margin: float, roll: float, size: int) -> np.ndarray:
    """The face in `box` turned by -roll degrees about the box's centre (its eyes level),
    cut like crop_faces cuts an upright face: the box grown by `margin`, resized to size x
    size with INTER_AREA. The turn runs on a patch around the face at full resolution
    (edges replicated where the patch leaves the frame), so a large face is not aliased."""
    x, y, w, h = (float(v) for v in box)
    cx, cy = x + w / 2, y + h / 2
    gw, gh = w * (1 + 2 * margin), h * (1 + 2 * margin)  # the grown box, unclipped
    half = int(np.ceil(np.hypot(gw, gh) / 2)) + 1  # holds the turned box's corners
    x0, y0 = int(np.floor(cx)) - half, int(np.floor(cy)) - half
    patch = cv2.copyMakeBorder(
        gray[max(0, y0):max(0, y0 + 2 * half), max(0, x0):max(0, x0 + 2 * half)],
        max(0, -y0), max(0, y0 + 2 * half - gray.shape[0]),
        max(0, -x0), max(0, x0 + 2 * half - gray.shape[1]), cv2.BORDER_REPLICATE)
    turn = cv2.getRotationMatrix2D((cx - x0, cy - y0), roll, 1.0)  # positive: anticlockwise
    upright = cv2.warpAffine(patch, turn, (patch.shape[1], patch.shape[0]),
                             flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    u0, v0 = int(round(cx - x0 - gw / 2)), int(round(cy - y0 - gh / 2))
    face = upright[v0:v0 + int(round(gh)), u0:u0 + int(round(gw))]
    return cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA)


def prepare_faces(crops: np.ndarray, channels=CHANNELS, size: int = FACE_SIZE) -> np.ndarray:
    """The model's input, shared by training and annotation.

    Parameters
    ----------
    crops: np.ndarray, shape = (n, h, w), uint8 grayscale face crops (any size).
    channels: names of the input planes, from the checkpoint: "equalized" (histogram-
        equalized crop) and optionally "canny" (Canny edges of that crop).

    Returns
    -------
    np.ndarray, shape = (n, len(channels), size, size), uint8.
    """
    out = np.empty((len(crops), len(channels), size, size), np.uint8)
    for i, crop in enumerate(crops):
        if crop.shape != (size, size):
            crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        eq = equalize(np.ascontiguousarray(crop))
        for c, name in enumerate(channels):
            if name == "equalized":
                out[i, c] = eq
            elif name == "canny":
                out[i, c] = cv2.Canny(eq, *CANNY_THRESHOLDS)
            else:
                raise ValueError(f"unknown input channel {name!r}")
    return out


def largest_face(gray: np.ndarray, detect, *, margin: float = 0.0, size: int = FACE_SIZE,
                 align: str = TRAIN_DEFAULTS.align) -> np.ndarray:
    """The largest face found by detect (a detector of detect.py) cut out by ``crop_faces``
    (same margin, size and alignment as annotate), or the whole image when none is found."""
    boxes, rolls = detect.faces(gray) if align == "eyes" else (detect(gray), None)
    if len(boxes) == 0:
        return gray
    i = [int(np.argmax(boxes[:, 2] * boxes[:, 3]))]
    return crop_faces(gray, boxes[i], size, margin, None if rolls is None else rolls[i])[0]


def face_rows(uri: str, media_type: str, found: list, channels=CHANNELS,
              size: int = FACE_SIZE) -> dict:
    """Face rows (column -> array) for one file.

    found: list of (frame_index, timestamp_s or None, crops (n, size, size) uint8, boxes (n, 4)).
    The ``face`` column holds the model input, shape = (n, C, size, size), uint8.
    """
    meta = [(index, np.nan if ts is None else ts, k, *box)
            for index, ts, _, boxes in found for k, box in enumerate(boxes)]
    n = len(meta)
    m = np.array(meta, dtype=np.float64).reshape(n, 7)
    faces = [prepare_faces(crops, channels, size) for _, _, crops, _ in found]
    return {
        "kind": np.full(n, "face", object),
        "source": np.full(n, uri, object),
        "media_type": np.full(n, media_type, object),
        "frame_index": m[:, 0].astype(np.int64),
        "timestamp_s": m[:, 1],
        "face_index": m[:, 2].astype(np.int32),
        "x": m[:, 3].astype(np.int32), "y": m[:, 4].astype(np.int32),
        "w": m[:, 5].astype(np.int32), "h": m[:, 6].astype(np.int32),
        "face": np.concatenate(faces) if faces else np.zeros((0, len(channels), size, size),
                                                              np.uint8),
        **sink.stream_file_columns(n),  # empty on face rows: one schema in the stream
    }


def file_row(entry: dict, *, status: str, error: str | None, frames: int, faces: int,
             seconds: float, face_size: int, channels) -> dict:
    """One files-table row (kind='file') in the columns of the row stream, so it flows
    through one Ray dataset with its faces; the sink splits them. It fills the stream's
    file columns (sink.STREAM_FILE_COLUMNS) and leaves the face columns empty. For a segment
    of a long video (entry["segment"], segments.py) a partial row: kind='segment', with the
    segment's index and the segment count, its error prefixed with the segment's time range."""
    seg = entry.get("segment")
    if seg is not None and error:
        error = f"{segments.describe(seg)}: {error}"
    row = dict(kind=np.array(["file" if seg is None else "segment"], object),
               source=np.array([entry["uri"]], object),
               media_type=np.array([entry["media_type"]], object),
               face=np.zeros((1, len(channels), face_size, face_size), np.uint8),
               **{name: np.zeros(1, dtype) for name, dtype in sink.STREAM_FACE_COLUMNS})
    row["timestamp_s"][:] = np.nan
    values = dict(status=status, error=error or "", size_bytes=entry.get("size_bytes") or 0,
                  mtime_ns=entry.get("mtime_ns") or 0, frames_decoded=frames, faces=faces,
                  seconds=seconds, segment=seg["index"] if seg else 0,
                  segments=seg["count"] if seg else 0)
    return dict(row, **{name: np.array([values[name]], dtype)
                        for name, dtype in sink.STREAM_FILE_COLUMNS})


def test_hooks(uri: str) -> None:
    """Failures no real file produces on demand, for the tests (docs/failures.md): a URI
    containing $FER_BATCH_TEST_CRASH_ON kills the worker (a decoder segfault, an OOM kill);
    one containing $FER_BATCH_TEST_HANG_ON hangs it in C code (a decoder stuck in a loop),
    $FER_BATCH_TEST_HANG_GIL_ON in C code that holds the interpreter lock."""
    crash_on = os.environ.get("FER_BATCH_TEST_CRASH_ON")
    if crash_on and crash_on in uri:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    import ctypes
    for var, lib in (("FER_BATCH_TEST_HANG_GIL_ON", ctypes.PyDLL),  # keeps the GIL
                     ("FER_BATCH_TEST_HANG_ON", ctypes.CDLL)):  # releases it, as PyAV does
        tag = os.environ.get(var)
        if tag and tag in uri:
            lib(None).sleep(3600)


class FaceCropper:
    """Ray actor: file entries in, face rows (48x48 crops + box metadata) and one file row out.

    Builds the face detector once (--detector). ``__call__`` takes a batch of file entries
    and yields batches; a long video yields every FRAMES_PER_YIELD sampled frames so
    memory stays bounded. Any failure of one file becomes that file's error row.
    """

    def __init__(self, *, face_size: int = FACE_SIZE, channels=CHANNELS,
                 detection: DetectorSettings = DetectorSettings(),
                 sample_fps: float = ANNOTATE_DEFAULTS.sample_fps,
                 every_n_frames: int = ANNOTATE_DEFAULTS.every_n_frames,
                 decode_threads: int = ANNOTATE_DEFAULTS.decode_threads,
                 max_pixels: int = ANNOTATE_DEFAULTS.max_pixels,
                 max_image_bytes: int = ANNOTATE_DEFAULTS.max_image_bytes,
                 endpoint_url: str | None = None, attempts=None,
                 max_attempts: int = ANNOTATE_DEFAULTS.max_file_retries + 1,
                 crop_margin: float = TRAIN_DEFAULTS.crop_margin,
                 align: str = TRAIN_DEFAULTS.align, pool=None,
                 detector_model: bytes | None = None):
        """Defaults are the CLI's (config.py); crop_margin and align come from the checkpoint.
        pool: detection in the GPU pool (--detect-on pool), a callable [gray frames] ->
        [boxes] (detect_torch.PoolDetector); None = detect here with `detection`'s detector,
        built from detector_model when given (CenterFace readied by the driver,
        detect.readied_centerface). align "eyes" needs a detector with landmarks here
        (pipeline.check_geometry)."""
        cv2.setNumThreads(1)  # one core per actor; Ray schedules the parallelism
        # here: gray (h, w) uint8 -> boxes (n, 4) int32; in the pool: frames wait for a call
        self.detector = load_detector(detection, detector_model) if pool is None else None
        self.align = align == "eyes"  # faces levelled by their eyes before the crop
        self.detect_many = (lambda grays: [(b, None) for b in pool(grays)]) if pool \
            else self._detect_here  # [gray] -> [(boxes, rolls or None)]
        self.chunk = 1 if pool is None else POOL_CHUNK
        self.face_size, self.channels = face_size, tuple(channels)
        self.crop_margin = crop_margin  # the checkpoint's framing (crop_faces)
        self.sample_fps, self.every_n = sample_fps, every_n_frames
        self.decode_threads = decode_threads
        self.max_pixels, self.endpoint_url = max_pixels, endpoint_url
        self.max_image_bytes = max_image_bytes
        self.attempts, self.max_attempts = attempts, max_attempts  # uri -> try number, or None

    def __call__(self, batch: dict):
        """batch["files"]: JSON lists of file entries, one unit of work each
        (pipeline.work_units). Rows carry names Arrow can store: a file name that is not
        valid UTF-8 was read under its real name and is written escaped (sink.safe_text)."""
        for out in self._process_units(batch):
            for col in ("source", "error"):
                out[col] = np.array(sink.safe_texts(out[col]), dtype=object)
            yield out

    def _process_units(self, batch: dict):
        entries = [e for unit in batch["files"] for e in json.loads(str(unit))]
        image_batches = []  # yielded as one batch per call (fewer, larger blocks)
        for entry in entries:
            out = None
            for out in self.process(entry):  # the last batch holds the file row
                if entry["media_type"] == "image":
                    image_batches.append(out)
                else:  # videos stream out every FRAMES_PER_YIELD frames: bounded memory
                    yield out
            if self.attempts is not None:  # out ends with the file row
                seg = entry.get("segment")
                self.attempts.finish(segments.attempt_key(entry),
                                     frames=int(out["frames_decoded"][-1]),
                                     faces=int(out["faces"][-1]),
                                     files=1 / seg["count"] if seg else 1)
        if image_batches:
            yield {k: np.concatenate([b[k] for b in image_batches]) for k in image_batches[0]}

    def process(self, entry: dict):
        """Yield face batches, then exactly one file row, for one file entry.

        Nothing about one file raises out of here: every failure (unreadable, vanished,
        undecodable, over --max-pixels, out of memory, an unexpected exception) becomes the
        file row's status "error" and a message naming the cause; faces found before a video
        broke off are kept. A file whose earlier tries killed the worker process is given up
        after max_attempts (docs/failures.md).
        """
        t0 = time.perf_counter()
        key = segments.attempt_key(entry)  # a segment's tries count apart from the others
        tries = self.attempts(key) if self.attempts else 1
        if tries > self.max_attempts:  # earlier tries ended the worker (crash, hang, OOM kill)
            yield file_row(entry, status="error", error=self.attempts.give_up_reason(
                key), frames=0, faces=0, seconds=0.0, face_size=self.face_size,
                channels=self.channels)
            return
        test_hooks(entry["uri"])
        done = dict(frames=0, faces=0, error=None)  # what the file row will say
        try:
            uri = entry["uri"]
            if not storage.is_s3(uri) and os.path.exists(uri) and not os.path.isfile(uri):
                raise decode.DecodeError("not a regular file (folder, FIFO, socket or device): "
                                         "not read")  # opening a FIFO would block forever
            if entry["media_type"] == "image":
                yield from self._image(entry, done)
            else:
                yield from self._video(entry, done)
        except Exception as e:  # noqa: BLE001 - one file's failure is its row, not the run's
            done["error"] = error_message(e, entry["uri"])
        yield file_row(entry, status="error" if done["error"] else "ok",
                       error=(done["error"] or "")[:1000] or None, frames=done["frames"],
                       faces=done["faces"], seconds=time.perf_counter() - t0,
                       face_size=self.face_size, channels=self.channels)

    def _image(self, entry: dict, done: dict):
        """Face rows of one image (none without faces); fills done's counts."""
        gray = decode.decode_image(storage.read_bytes(entry["uri"], self.endpoint_url,
                                                      self.max_image_bytes), self.max_pixels)
        boxes, rolls = self.detect_many([gray])[0]
        done.update(frames=1, faces=len(boxes))
        if len(boxes):
            crops = crop_faces(gray, boxes, self.face_size, self.crop_margin, rolls)
            yield face_rows(entry["uri"], "image", [(0, None, crops, boxes)], self.channels,
                            self.face_size)

    def _video(self, entry: dict, done: dict):
        """Face rows of one video (or segment) every FRAMES_PER_YIELD sampled frames with
        faces; a video that breaks off keeps the faces found before, and its error."""
        stats, found, held = decode.VideoStats(), [], []  # held: frames awaiting detection
        try:
            with storage.open_input(entry["uri"], self.endpoint_url) as f:
                for frame in segments.iter_unit_frames(
                        f, entry, sample_fps=self.sample_fps, every_n=self.every_n,
                        max_pixels=self.max_pixels, stats=stats,
                        threads=self.decode_threads):
                    if self.attempts is not None:
                        self.attempts.alive()  # the watchdog's sign of progress
                    held.append(frame)
                    if len(held) >= self.chunk:
                        self._detect_held(held, found, done)
                    if len(found) >= FRAMES_PER_YIELD:
                        yield face_rows(entry["uri"], "video", found, self.channels,
                                        self.face_size)
                        found = []
            done["error"] = stats.error
        except Exception as e:  # noqa: BLE001 - the row says why; the faces found are kept
            done["error"] = error_message(e, entry["uri"])
        try:  # frames decoded before the end (or before the video broke off)
            self._detect_held(held, found, done)
        except Exception as e:  # noqa: BLE001
            done["error"] = done["error"] or error_message(e, entry["uri"])
        done["frames"] = stats.frames_decoded
        if found:
            yield face_rows(entry["uri"], "video", found, self.channels, self.face_size)

    def _detect_here(self, grays: list) -> list:
        if self.align:
            return [self.detector.faces(g) for g in grays]
        return [(self.detector(g), None) for g in grays]

    def _detect_held(self, held: list, found: list, done: dict) -> None:
        """Detect faces in the held (index, ts, gray) frames and crop them: found gets
        (index, ts, crops, boxes) per frame with faces; only 48x48 crops outlive a frame."""
        for (index, ts, gray), (boxes, rolls) in zip(held,
                                                     self.detect_many([g for _, _, g in held])):
            if len(boxes):
                found.append((index, ts, crop_faces(gray, boxes, self.face_size,
                                                    self.crop_margin, rolls), boxes))
                done["faces"] += len(boxes)
        held.clear()


def error_message(e: Exception, uri: str) -> str:
    """The files row's error for an exception raised while reading, decoding or detecting in
    uri: the cause in words, and the fix where there is one (docs/failures.md)."""
    if isinstance(e, (decode.DecodeError, storage.TooLargeError)):
        return str(e)
    if isinstance(e, FileNotFoundError):
        return f"file not found when read (deleted or moved after listing?): {e}"
    if isinstance(e, PermissionError):
        return f"permission denied: {e}"
    if isinstance(e, OSError):
        return f"cannot read file: {type(e).__name__}: {e}"
    if isinstance(e, MemoryError):
        return (f"out of memory while processing this file ({type(e).__name__}: {e}); "
                "see --max-pixels")
    if isinstance(e, cv2.error):
        return f"OpenCV error: {str(e).strip().splitlines()[-1]}"
    import logging  # a bug or an unforeseen library error: this file, not the run
    logging.getLogger(__name__).exception("unexpected error on %s", uri)
    return f"unexpected {type(e).__name__}: {e}"
