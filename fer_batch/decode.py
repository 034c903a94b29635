"""Bytes -> grayscale images; video files -> sampled grayscale frames with index and time.

This is the only module that touches the image and video decoders. The paper's
first step is grayscale, so frames are converted here, where it is cheapest
(PyAV hands over the Y plane of a YUV frame without a colour conversion).
Decoder failures are re-raised as ``DecodeError`` whose message names the cause;
docs/failures.md lists them.

Decompression bombs are refused before any pixel buffer exists: image sizes are
read from the file header (JPEG, PNG, BMP, TIFF, WebP, GIF, PNM; other formats
are refused), and FFmpeg gets the same limit as its ``max_pixels`` option, so
neither probing nor decoding allocates an oversized frame.
"""

from __future__ import annotations

import errno
import re
from fractions import Fraction
from typing import Iterator

import av
import av.logging
import cv2
import numpy as np

from fer_batch.config import ANNOTATE_DEFAULTS
from fer_batch.formats import (HEAD_BYTES, describe_content, image_format, image_size,
                               looks_truncated)
from fer_batch.sampling import Sampler, Skipper

MAX_PIXELS = ANNOTATE_DEFAULTS.max_pixels  # frame/image pixel limit: a 12000x10000 scan passes
MAX_BAD_PACKETS = 200  # consecutive undecodable video packets before a file is given up
SLACK_FRAMES = 2  # frames a complete video may fall short of its container's count (priming)
SLACK_SECONDS = 0.5  # seconds a complete video's last frame may end before its duration


class DecodeError(RuntimeError):
    """A file that cannot be decoded; the message names the cause."""


# --- images ---------------------------------------------------------------------------

def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image to grayscale.

    Parameters
    ----------
    data: the encoded file (JPEG, PNG, BMP, TIFF (first page only), WebP, GIF (first frame),
        PNM). The format comes from the file's signature, not its name.
    max_pixels: refuse images whose header declares more pixels than this, before decoding.

    Returns
    -------
    np.ndarray, shape = (h, w), uint8. EXIF orientation is applied (by OpenCV); 16-bit
    images are scaled to 8 bits by their maximum; alpha is dropped; CMYK and palette
    images are converted to gray.

    Raises DecodeError naming the cause: empty file, not an image (with what the content
    looks like), damaged header, over the pixel limit, truncated or damaged data.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    fmt = image_format(data)
    if fmt is None:
        raise DecodeError(f"not a decodable image: content is "
                          f"{describe_content(data[:HEAD_BYTES])}")
    size = image_size(data, fmt)
    if size is None:
        raise DecodeError(f"damaged or truncated {fmt.upper()} header: no image size in the "
                          f"first {len(data)} bytes")
    w, h = size
    if w * h == 0:
        raise DecodeError(f"{fmt.upper()} header declares an empty {w}x{h} image")
    if w * h > max_pixels:
        raise DecodeError(f"image declares {w}x{h} pixels, over the limit of {max_pixels} "
                          "(--max-pixels); refused before decoding (decompression bomb?)")
    buf = np.frombuffer(data, np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    except cv2.error as e:
        if "Insufficient memory" in str(e):  # not the file's fault: the worker is short
            raise MemoryError(f"OpenCV could not allocate the {w}x{h} image") from None
        raise DecodeError(f"{fmt.upper()} decoder refused the file: "
                          f"{str(e).strip()[:200]}") from None
    if img is None:
        state = "truncated" if looks_truncated(data, fmt) else "damaged"
        raise DecodeError(f"{state} {fmt.upper()} data: OpenCV could not decode the "
                          f"{w}x{h} image from {len(data)} bytes")
    if img.dtype != np.uint8:
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(1, float(img.max())))
    if img.size > max_pixels:
        raise DecodeError(f"image is {img.shape[1]}x{img.shape[0]} pixels, over the limit of "
                          f"{max_pixels} (--max-pixels)")
    return np.ascontiguousarray(img)


# --- videos ---------------------------------------------------------------------------

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
    """What ``iter_frames`` saw: decoded frames, skipped packets and the error, if any."""

    def __init__(self):
        self.frames_decoded = 0
        self.frames_sampled = 0
        self.frames_skipped = 0  # counted from packets, not decoded (the sampler drops them)
        self.bad_packets = 0
        self.error: str | None = None


_TOO_BIG = re.compile(r"Picture size (\d+)x(\d+) (?:is invalid|exceeds)")
_HINTS = {"moov atom not found": "no MP4 index (moov atom): truncated, or still being written"}


def _ffmpeg_reason(logs, err: Exception | None = None) -> str:
    """The error's text and the most severe FFmpeg log line, e.g. 'Invalid data found when
    processing input (mov: no MP4 index ...)'."""
    what = (getattr(err, "strerror", None) or str(err)) if err is not None else ""
    lines = sorted(((lvl, name.split(",")[0], msg.strip()) for lvl, name, msg in logs
                    if msg.strip() and lvl <= av.logging.ERROR), key=lambda x: x[0])
    if lines:
        _, name, msg = lines[0]
        detail = f"{name}: {_HINTS.get(msg, msg)}"[:200]
        return f"{what} ({detail})" if what else detail
    return what[:200] or "unknown error"


def _limit_error(logs, max_pixels: int) -> DecodeError | None:
    for _, _, msg in logs:
        m = _TOO_BIG.search(msg)
        if m:
            return DecodeError(f"video frames are {m[1]}x{m[2]} pixels, over the limit of "
                               f"{max_pixels} (--max-pixels); refused before decoding")
    return None


def _duration_s(stream, container) -> float | None:
    """The video stream's declared duration: stream header, Matroska DURATION tag, or the
    container's duration when the video is its only stream."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = (stream.metadata or {}).get("DURATION", "")
    m = re.match(r"(\d+):(\d+):(\d+(?:\.\d+)?)", tag)
    if m:
        return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
    if container.duration and len(container.streams) == 1:
        return container.duration / 1e6
    return None


def _ends_early(stats: VideoStats, expected: int, duration: float | None,
                last_t: float | None) -> str | None:
    """Why a video that decoded without errors looks cut short, or None. Every declared
    length that is known (frame count, duration) must fall short, so that edit lists and
    decoder priming frames do not count as damage."""
    n = stats.frames_decoded
    interval = last_t / (n - 1) if last_t and n > 1 else 0.0
    checks, parts = [], []
    if expected > 0:
        checks.append(expected - n > max(SLACK_FRAMES, expected // 50))
        parts.append(f"decoded {n} of the {expected} frames the container declares")
    if duration is not None and last_t is not None:
        checks.append(duration - last_t > max(SLACK_SECONDS, 3 * interval))
        parts.append(f"last frame at {last_t:.3f} s of {duration:.3f} s")
    if checks and all(checks):
        return "video ends early (truncated or damaged): " + ", ".join(parts)
    return None


def _sniff(file) -> bytes:
    """The first bytes of a path or seekable file, leaving the file where it was."""
    if isinstance(file, (str, bytes)) or hasattr(file, "__fspath__"):
        with open(file, "rb") as f:
            return f.read(HEAD_BYTES)
    pos = file.tell()
    head = file.read(HEAD_BYTES)
    file.seek(pos)
    return head


def iter_frames(file, *, sample_fps: float = ANNOTATE_DEFAULTS.sample_fps, every_n: int = 0,
                max_pixels: int = MAX_PIXELS, stats: VideoStats | None = None,
                window=None, threads: int = ANNOTATE_DEFAULTS.decode_threads
                ) -> Iterator[tuple[int, float, np.ndarray]]:
    """Stream sampled frames of a video, one at a time (never the whole video in memory).

    Parameters
    ----------
    file: a path or a seekable binary file object.
    sample_fps: frames per second to keep, chosen by presentation time (used when every_n == 0).
    every_n: keep every n-th decoded frame (1 = all frames).
    max_pixels: refuse streams whose frames have more pixels than this; FFmpeg gets it as its
        ``max_pixels`` option, so not even probing allocates a larger frame.
    stats: filled in with counts and the error that spoiled the video, if any. When stats is
        given, damage does not raise: undecodable packets are skipped (counted in
        stats.bad_packets), a stream that ends early or breaks off stops the iteration, and
        stats.error says what happened, so frames decoded around the damage are kept.
        Files that cannot be opened at all, have no video stream or exceed max_pixels
        always raise DecodeError.
    window: a segments.Window: decode one time segment of the video (seek to its
        keyframe, yield only its frames, with the indexes and times of the whole video).
    threads: FFmpeg decoding threads (--decode-threads).

    Yields
    ------
    (frame_index, timestamp_s, gray): index of the frame in decode order (0-based),
    presentation time in seconds from the stream's time base, and the frame as
    np.ndarray shape = (h, w) uint8 with the stream's rotation metadata applied.
    """
    raise_errors = stats is None
    stats = stats if stats is not None else VideoStats()
    head = _sniff(file)
    if not head:
        raise DecodeError("empty file (0 bytes)")
    content = describe_content(head)
    if not content.startswith(("unrecognised", "an MP4", "a Matroska")):
        raise DecodeError(f"not a video: content is {content}")
    level, skip = av.logging.get_level(), av.logging.get_skip_repeated()
    if level is None or level < av.logging.ERROR:
        av.logging.set_level(av.logging.ERROR)  # so errors reach the Capture below
    av.logging.set_skip_repeated(False)  # else a repeat count lands in the next file's log
    # FFmpeg logging is process-wide: decode one video at a time per process (as Ray's
    # actors do), or the causes in the messages of concurrent videos may mix
    limit = {"max_pixels": str(max_pixels)}
    try:
        with av.logging.Capture(local=False) as logs:
            try:
                container = av.open(file, mode="r", metadata_errors="ignore", options=limit)
            except (av.FFmpegError, ValueError, OSError) as e:
                seen = f" (content: {content})" if content.startswith("unrec") else ""
                raise DecodeError(f"not a decodable video: {_ffmpeg_reason(logs, e)}{seen}"
                                  ) from None
            with container:
                yield from _decode_stream(container, sample_fps, every_n, max_pixels, stats,
                                          logs, limit, window, threads)
    finally:
        av.logging.set_level(level)
        av.logging.set_skip_repeated(skip)
    if stats.error and raise_errors:
        raise DecodeError(stats.error)


def _open_stream(container, max_pixels: int, logs, limit: dict, threads: int):
    """The container's first video stream, its decoder set up; refuses a file without video
    and frames over max_pixels before any frame is decoded."""
    if not container.streams.video:
        audio = len(container.streams.audio)
        raise DecodeError(f"no video stream ({'audio only' if audio else 'data only'}: "
                          f"{audio} audio, {len(container.streams)} streams in all)")
    stream = container.streams.video[0]
    cc = stream.codec_context
    cc.options = dict(limit)
    cc.thread_type, cc.thread_count = "AUTO", threads  # each thread holds a frame in flight
    if cc.width * cc.height > max_pixels:
        raise DecodeError(f"video frames are {cc.width}x{cc.height} pixels, over the limit of "
                          f"{max_pixels} (--max-pixels); refused before decoding")
    too_big = _limit_error(logs, max_pixels)  # probing already refused a frame
    if too_big:
        raise too_big
    return stream


class _Packets:
    """The stream's decoded frames, packet by packet, skipping undecodable packets (counted
    in stats; more than MAX_BAD_PACKETS in a row gives the file up)."""

    def __init__(self, container, stream, stats: VideoStats, logs, max_pixels: int,
                 skipper: Skipper | None = None):
        self.container, self.stream, self.stats = container, stream, stats
        self.logs, self.max_pixels, self.skipper = logs, max_pixels, skipper
        self.first_bad: str | None = None

    def frames(self) -> Iterator[av.VideoFrame]:
        run, packets = 0, self.container.demux(self.stream)
        if self.skipper is not None:
            packets = self.skipper.packets(packets)
        for packet in packets:
            if len(self.logs) > 64:  # keep the log of a long, noisy video bounded
                del self.logs[:-16]
            try:
                frames = packet.decode()
            except (av.FFmpegError, ValueError) as e:
                run += 1
                if not self._skip(e, run):
                    return
                continue
            run = 0
            yield from frames

    def _skip(self, e: Exception, run: int) -> bool:
        """Count an undecodable packet; False once the file is given up. Raises for what is
        not the file's fault (over --max-pixels, out of memory)."""
        too_big = _limit_error(self.logs, self.max_pixels)
        if too_big:
            raise too_big from None
        if getattr(e, "errno", None) == errno.ENOMEM:  # the worker is short, not the file
            raise MemoryError(f"FFmpeg could not allocate a frame: "
                              f"{_ffmpeg_reason(self.logs[-5:], e)}") from None
        self.stats.bad_packets += 1
        if self.first_bad is None:
            self.first_bad = (f"{_ffmpeg_reason(self.logs[-5:], e)} near frame "
                              f"{self.stats.frames_decoded}")
        if run > MAX_BAD_PACKETS:
            self.stats.error = (f"gave up after {run} undecodable packets in a row "
                                f"(first: {self.first_bad})")
            return False
        return True


def _decode_stream(container, sample_fps, every_n, max_pixels, stats, logs, limit, window,
                   threads):
    stream = _open_stream(container, max_pixels, logs, limit, threads)
    base = stream.time_base or Fraction(1, 1)
    start = stream.start_time or 0
    # one segment (segments.py): the index and the sampler's next time at its start
    index, next_t = window.start(container, stream) if window is not None else (-1, 0.0)
    sampler, last_t = Sampler(sample_fps, every_n, next_t), None
    key_pts = window.seg["key_pts"] if window is not None and window.do_seek else None
    skipper = Skipper.of(container, stream, sample_fps, every_n, base, start, key_pts)
    packets = _Packets(container, stream, stats, logs, max_pixels, skipper)
    try:
        for frame in packets.frames():
            pts = frame.pts if frame.pts is not None else frame.dts
            if window is not None and window.skip(pts):  # before the segment's keyframe
                continue
            if skipper is not None:  # frames the decoder skipped count too
                index += _count_passed(skipper, skipper.passed(pts), window, stats)
            index += 1
            stats.frames_decoded = index + 1
            t = float((pts - start) * base) if pts is not None else index * sampler.step
            last_t = t
            if window is not None and not window.holds(t):
                if window.ended:
                    break
                continue
            if not sampler.keep(index, t):
                continue
            if frame.width * frame.height > max_pixels:
                raise DecodeError(f"frame {index} is {frame.width}x{frame.height} pixels, "
                                  f"over the limit of {max_pixels} (--max-pixels)")
            stats.frames_sampled += 1
            yield index, round(t, 6), rotate(frame.to_ndarray(format="gray"), _rotation(frame))
    except (av.FFmpegError, OSError) as e:  # the container itself broke off
        stats.error = (f"video stream damaged after {stats.frames_decoded} decoded frames: "
                       f"{_ffmpeg_reason(logs[-5:], e)}")
    finally:
        # Let FFmpeg's frame threads finish with the GIL released. Freeing the codec context
        # (when the last reference goes, GIL held) waits for them, and a thread that is logging
        # an error waits for the GIL in PyAV's log callback: without this, a video that broke
        # off mid-decode (out of memory, say) could hang the worker for good.
        stream.codec_context.flush_buffers()
    if skipper is not None and not (window is not None and window.ended):
        rest = skipper.rest()  # skipped frames after the last one returned
        stats.frames_decoded = index + 1 + _count_passed(skipper, rest, window, stats)
        if rest:
            last_t = max(last_t or 0.0, skipper.seconds(rest[-1]))
    stats.error = _verdict(stats, stream, container, window, last_t, packets.first_bad)


def _count_passed(skipper: Skipper, passed: list[int], window, stats: VideoStats) -> int:
    """How many frames the decoder skipped (passed: their pts); a segment's window counts
    those inside it."""
    stats.frames_skipped += len(passed)
    if window is not None:
        for pts in passed:
            window.count(skipper.seconds(pts))
    return len(passed)


def _verdict(stats: VideoStats, stream, container, window, last_t: float | None,
             first_bad: str | None) -> str | None:
    """Everything wrong with a decoded video, in one message, or None."""
    problems = [stats.error] if stats.error else []
    if not stats.error and (window is None or window.last):  # a segment ends before the end
        if stats.frames_decoded == 0:
            problems.append("video has no decodable frames")
        else:
            early = _ends_early(stats, stream.frames or 0, _duration_s(stream, container),
                                last_t)
            if early:
                problems.append(early)
    if stats.bad_packets and not (stats.error or "").startswith("gave up"):
        problems.append(f"skipped {stats.bad_packets} undecodable packet(s) (first: "
                        f"{first_bad})")
    return "; ".join(problems) or None
