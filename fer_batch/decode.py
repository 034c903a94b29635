"""Bytes -> grayscale images; video files -> sampled grayscale frames with index and time.

This is the only module that touches the image and video decoders. The paper's
first step is grayscale, so frames are converted here, where it is cheapest
(PyAV hands over the Y plane of a YUV frame without a colour conversion).
Decoder failures are re-raised as ``DecodeError`` with the decoder's message.
"""

from __future__ import annotations

import struct
from fractions import Fraction
from typing import Iterator

import av
import cv2
import numpy as np

MAX_PIXELS = 120_000_000  # default frame/image pixel limit: a 12000x10000 scan passes


class DecodeError(RuntimeError):
    """A file that cannot be decoded; the message names the cause."""


def _png_size(data: bytes):
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    return None


def _jpeg_size(data: bytes):
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        seg_len = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + seg_len
    return None


def _header_size(data: bytes):
    """(width, height) from a PNG/JPEG header without decoding pixels, else None."""
    return _png_size(data) or _jpeg_size(data)


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image to grayscale.

    Parameters
    ----------
    data: the encoded file (JPEG, PNG, BMP, TIFF (first page), WebP).
    max_pixels: refuse images that declare more pixels than this, before decoding.

    Returns
    -------
    np.ndarray, shape = (h, w), uint8. EXIF orientation is applied; 16-bit
    images are scaled to 8 bits; alpha is dropped.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    size = _header_size(data)
    if size and size[0] * size[1] > max_pixels:
        raise DecodeError(f"image declares {size[0]}x{size[1]} pixels, over the limit of "
                          f"{max_pixels} (--max-pixels)")
    buf = np.frombuffer(data, np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    except cv2.error as e:
        raise DecodeError(f"image decoder refused the file: {str(e).strip()[:200]}") from None
    if img is None:
        head = data[:64].lstrip().lower()
        hint = " (looks like HTML/text)" if head.startswith((b"<", b"{")) or head.isascii() else ""
        raise DecodeError(f"not a decodable image{hint}: OpenCV could not decode "
                          f"{len(data)} bytes")
    if img.dtype != np.uint8:
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(1, int(img.max())))
    if img.size > max_pixels:
        raise DecodeError(f"image is {img.shape[1]}x{img.shape[0]} pixels, over the limit of "
                          f"{max_pixels} (--max-pixels)")
    return np.ascontiguousarray(img)


def _rotation(frame: av.VideoFrame) -> int:
    """Clockwise display rotation in degrees from the frame's display matrix (0/90/180/270)."""
    rot = getattr(frame, "rotation", 0) or 0
    return int(round(-rot / 90.0)) % 4 * 90


def rotate(gray: np.ndarray, degrees_cw: int) -> np.ndarray:
    if degrees_cw == 90:
        return cv2.rotate(gray, cv2.ROTATE_90_CLOCKWISE)
    if degrees_cw == 180:
        return cv2.rotate(gray, cv2.ROTATE_180)
    if degrees_cw == 270:
        return cv2.rotate(gray, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return gray


class VideoStats:
    """What ``iter_frames`` saw: decoded frames and the error that stopped it, if any."""

    def __init__(self):
        self.frames_decoded = 0
        self.frames_sampled = 0
        self.error: str | None = None


def iter_frames(file, *, sample_fps: float = 2.0, every_n: int = 0,
                max_pixels: int = MAX_PIXELS, stats: VideoStats | None = None
                ) -> Iterator[tuple[int, float, np.ndarray]]:
    """Stream sampled frames of a video, one at a time (never the whole video in memory).

    Parameters
    ----------
    file: a path or a seekable binary file object.
    sample_fps: frames per second to keep, chosen by presentation time (used when every_n == 0).
    every_n: keep every n-th decoded frame (1 = all frames).
    max_pixels: refuse streams whose frames have more pixels than this.
    stats: filled in with counts and the error that ended decoding early, if any. A
        truncated or corrupt stream ends the iteration without raising when stats is given,
        so frames decoded before the damage are kept.

    Yields
    ------
    (frame_index, timestamp_s, gray): index of the frame in decode order (0-based),
    presentation time in seconds from the stream's time base, and the frame as
    np.ndarray shape = (h, w) uint8 with the stream's rotation metadata applied.
    """
    raise_errors = stats is None
    stats = stats if stats is not None else VideoStats()
    try:
        container = av.open(file, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise DecodeError(f"not a decodable video: {e}") from None
    with container:
        if not container.streams.video:
            raise DecodeError("no video stream (audio-only or data file)")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > max_pixels:
            raise DecodeError(f"video frames are {w}x{h} pixels, over the limit of "
                              f"{max_pixels} (--max-pixels)")
        base = stream.time_base or Fraction(1, 1)
        start = stream.start_time or 0
        step = 1.0 / sample_fps if sample_fps > 0 else 0.0
        next_t = 0.0
        try:
            for index, frame in enumerate(container.decode(stream)):
                stats.frames_decoded = index + 1
                pts = frame.pts if frame.pts is not None else frame.dts
                t = float((pts - start) * base) if pts is not None else index * step
                if every_n:
                    keep = index % every_n == 0
                else:
                    keep = t + 1e-6 >= next_t
                    if keep:
                        next_t = (int(t / step + 1e-6) + 1) * step if step else 0.0
                if not keep:
                    continue
                if frame.width * frame.height > max_pixels:
                    raise DecodeError(f"frame {index} is {frame.width}x{frame.height} pixels, "
                                      f"over the limit of {max_pixels} (--max-pixels)")
                gray = frame.to_ndarray(format="gray")
                stats.frames_sampled += 1
                yield index, round(t, 6), rotate(gray, _rotation(frame))
        except (av.FFmpegError, ValueError, MemoryError) as e:
            msg = f"video stream damaged after {stats.frames_decoded} decoded frames: {e}"
            stats.error = msg
            if raise_errors:
                raise DecodeError(msg) from None
    if stats.frames_decoded == 0 and stats.error is None:
        stats.error = "video has no decodable frames"
