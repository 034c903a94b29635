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

import collections
import errno
import heapq
import math
import re
import struct
from fractions import Fraction
from typing import Iterator

import av
import av.logging
import cv2
import numpy as np

from fer_batch.config import ANNOTATE_DEFAULTS

MAX_PIXELS = ANNOTATE_DEFAULTS.max_pixels  # frame/image pixel limit: a 12000x10000 scan passes
MAX_BAD_PACKETS = 200  # consecutive undecodable video packets before a file is given up
SLACK_FRAMES = 2  # frames a complete video may fall short of its container's count (priming)
SLACK_SECONDS = 0.5  # seconds a complete video's last frame may end before its duration
HEAD_BYTES = 512  # bytes looked at to name the content of a file that is not media
# codecs whose packets hold one frame each (MPEG-4 part 2 in AVI packs B-frames two to a
# packet): their frames can be counted and timed from packets alone (_Skipper, segments.py)
FRAME_PACKET_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mjpeg", "mpeg2video"})
SKIP_MARGIN_S = 1e-4  # seconds; frames this close to a sampling-grid point are always decoded
LOOKAHEAD = 512  # packets read ahead at most to find the next keyframe (_Skipper)
LOOKAHEAD_BYTES = 32 << 20  # and bytes: a 4K stream's packets are large
REORDER_PACKETS = 16  # packets after a keyframe checked for frames shown before it
# containers whose keyframe flags mark random-access points (MP4/MOV sync samples, Matroska
# key blocks), as FFmpeg names them
KEYFRAME_FORMATS = frozenset({"mov", "mp4", "matroska", "webm"})


class DecodeError(RuntimeError):
    """A file that cannot be decoded; the message names the cause."""


# --- what is this file? ---------------------------------------------------------------

def describe_content(head: bytes) -> str:
    """A short name for what the first bytes of a non-media file look like."""
    h = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if h.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in h[:256]:
        return "an HTML page (a saved error page or web page?)"
    if h.startswith((b"<?xml", b"<svg")):
        return "XML/SVG text"
    if h.startswith((b"{", b"[")):
        return "JSON text"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    if head.startswith(b"\x1f\x8b"):
        return "gzip data"
    if head[4:8] == b"ftyp":
        return "an MP4/MOV video or HEIC image"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "a Matroska/WebM video"
    for cut in range(4):  # the sample may end inside a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text and all(c.isprintable() or c in "\r\n\t" for c in text):
            return "plain text"
        break
    return f"unrecognised data (first bytes {head[:8].hex(' ')})"


def image_format(data: bytes) -> str | None:
    """The image format named by the file's signature, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if len(data) > 2 and data[0:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return "pnm"
    return None


def _png_size(d: bytes):
    if d[12:16] == b"IHDR":
        return struct.unpack(">II", d[16:24])
    return None


def _jpeg_size(d: bytes):
    i = 2
    while i + 9 < len(d):
        if d[i] != 0xFF:
            i += 1
            continue
        marker = d[i + 1]
        if marker in (0xD8, 0x01, 0xFF) or 0xD0 <= marker <= 0xD7:
            i += 1 if marker == 0xFF else 2
            continue
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                      0xCF):
            h, w = struct.unpack(">HH", d[i + 5:i + 9])
            return w, h
        if marker == 0xDA:  # start of scan before any frame header: damaged
            return None
        i += 2 + struct.unpack(">H", d[i + 2:i + 4])[0]
    return None


def _bmp_size(d: bytes):
    (header,) = struct.unpack("<I", d[14:18])
    if header == 12:  # OS/2 BITMAPCOREHEADER
        return struct.unpack("<HH", d[18:22])
    w, h = struct.unpack("<ii", d[18:26])
    return abs(w), abs(h)  # negative height = top-down rows


_TIFF_INTS = {1: "B", 3: "H", 4: "I", 16: "Q"}  # BYTE, SHORT, LONG, LONG8 (BigTIFF)


def _tiff_size(d: bytes):
    """Size of the first page (the one OpenCV decodes). A dimension tag written more than
    once counts with its largest value: libtiff keeps the first, other readers the last, and
    the pixel limit must hold for whichever a decoder believes."""
    e = "<" if d[:2] == b"II" else ">"
    big = struct.unpack(e + "H", d[2:4])[0] == 43
    if big:
        off = struct.unpack(e + "Q", d[8:16])[0]
        n, at, size = struct.unpack(e + "Q", d[off:off + 8])[0], off + 8, 20
    else:
        off = struct.unpack(e + "I", d[4:8])[0]
        n, at, size = struct.unpack(e + "H", d[off:off + 2])[0], off + 2, 12
    dims = {}
    for k in range(min(n, 4096)):
        p = at + k * size
        tag, typ = struct.unpack(e + "HH", d[p:p + 4])
        if tag in (256, 257):
            code = _TIFF_INTS.get(typ, "I")
            v = d[p + 12:p + 20] if big else d[p + 8:p + 12]
            value = struct.unpack(e + code, v[:struct.calcsize(code)])[0]
            dims[tag] = max(dims.get(tag, 0), value)
    return (dims[256], dims[257]) if len(dims) == 2 else None


def _webp_size(d: bytes):
    chunk = d[12:16]
    if chunk == b"VP8 " and d[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", d[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and d[20] == 0x2F:
        (b,) = struct.unpack("<I", d[21:25])
        return (b & 0x3FFF) + 1, ((b >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        w = int.from_bytes(d[24:27], "little") + 1
        h = int.from_bytes(d[27:30], "little") + 1
        return w, h
    return None


def _gif_size(d: bytes):
    return struct.unpack("<HH", d[6:10])


def _pnm_size(d: bytes):
    text = re.sub(rb"#[^\n]*", b" ", d[2:256])
    tokens = text.split()
    return int(tokens[0]), int(tokens[1])


_SIZE_READERS = dict(jpeg=_jpeg_size, png=_png_size, bmp=_bmp_size, tiff=_tiff_size,
                     webp=_webp_size, gif=_gif_size, pnm=_pnm_size)


def image_size(data: bytes, fmt: str | None = None):
    """(width, height) declared by an image's header, without decoding pixels; None when the
    format is unknown or the header is cut short or damaged."""
    fmt = fmt or image_format(data)
    try:
        return _SIZE_READERS[fmt](data) if fmt else None
    except (struct.error, IndexError, ValueError, KeyError):
        return None


def _looks_truncated(data: bytes, fmt: str) -> bool:
    tail = data.rstrip(b"\x00")[-16:]
    if fmt == "jpeg":
        return not tail.endswith(b"\xff\xd9")
    if fmt == "png":
        return b"IEND" not in tail
    return False


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
        state = "truncated" if _looks_truncated(data, fmt) else "damaged"
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


class _Sampler:
    """Which decoded frames to keep: every n-th, or the first at or after each 1/fps tick."""

    def __init__(self, sample_fps: float, every_n: int, next_t: float = 0.0):
        self.step = 1.0 / sample_fps if sample_fps > 0 else 0.0
        self.every_n, self.next_t = every_n, next_t

    def keep(self, index: int, t: float) -> bool:
        if self.every_n:
            return index % self.every_n == 0
        if t + 1e-6 < self.next_t:
            return False
        self.next_t = (int(t / self.step + 1e-6) + 1) * self.step if self.step else 0.0
        return True


class _Skipper:
    """Spares the decoder the frames the sampler will drop (--sample-fps), where it can.

    The sampler keeps the first frame at or after each grid point k / sample_fps. A frame is
    sure to be dropped when a frame of the same grid cell that comes before it went to the
    decoder whole (its witness): the sampler meets that one first and moves its next sample
    time past the cell. Frames within SKIP_MARGIN_S of a grid point are always decoded, so
    rounding cannot change which frames are kept. A frame sure to be dropped goes to FFmpeg
    with ``skip_frame`` set:

    - NONREF (ALL for intra-only codecs): decoded only when later frames refer to it (I, P,
      reference B), skipped otherwise (most B-frames);
    - NONKEY, with every frame after it up to the next keyframe (read ahead, at most
      LOOKAHEAD packets and LOOKAHEAD_BYTES), when all those frames lie in the same cell
      after the witness, the keyframe is at or before the next grid point and no frame
      after it is shown before it (no open GOP): nothing that is sampled can refer to them.
      MP4/MOV and Matroska/WebM only, whose keyframe flags mark where decoding may start
      (the seek points).

    The decoder then returns fewer frames than the video holds, so frames are counted from
    the packets: ``passed(pts)``, called for each frame the decoder returns, gives the frames
    before it that it did not return (skipped, or lost to damage), and the frame's index is
    its rank in presentation order among all frames, as segments.py computes it. Only
    codecs with one frame per packet (FRAME_PACKET_CODECS) are skipped in."""

    def __init__(self, codec_context, step: float, base: Fraction, start: int,
                 min_pts: int | None, tail: bool):
        self.cc, self.step, self.base, self.start = codec_context, step, base, start
        self.min_pts = min_pts  # a segment's keyframe: packets before it are not counted
        self.level = "ALL" if codec_context.codec.intra_only else "NONREF"
        self.tail = tail and not codec_context.codec.intra_only  # NONKEY runs to a keyframe
        self.setting = "DEFAULT"
        self.whole: dict[int, float] = {}  # grid cell -> earliest time sent whole
        self.pending: list[int] = []  # heap: pts of counted frames not yet returned
        self.ahead: collections.deque = collections.deque()  # packets read ahead
        self.source: Iterator | None = None
        self.drop_left = 0  # packets after this one that go with it (NONKEY)

    @classmethod
    def of(cls, container, stream, sample_fps: float, every_n: int, base: Fraction,
           start: int, min_pts: int | None) -> _Skipper | None:
        """A skipper for the stream, or None when every frame must be decoded (every_n
        sampling, a codec outside FRAME_PACKET_CODECS)."""
        if every_n or sample_fps <= 0 or stream.codec_context.name not in FRAME_PACKET_CODECS:
            return None
        formats = set((container.format.name or "").split(","))
        tail = bool(formats & KEYFRAME_FORMATS)
        return cls(stream.codec_context, 1.0 / sample_fps, base, start, min_pts, tail)

    def seconds(self, pts: int) -> float:
        return float((pts - self.start) * self.base)

    def packets(self, source: Iterator) -> Iterator:
        """The demuxer's packets, in order, each with its skip_frame set (send)."""
        self.source = iter(source)
        while True:
            packet = self.ahead.popleft() if self.ahead else next(self.source, None)
            if packet is None:
                return
            self.send(packet)
            yield packet

    def send(self, packet) -> None:
        """Before the packet goes to the decoder: count its frame, and set skip_frame."""
        pts, setting = packet.pts, "DEFAULT"
        if pts is not None and packet.size and not packet.is_discard and \
                (self.min_pts is None or pts >= self.min_pts):
            heapq.heappush(self.pending, pts)
            setting = self._setting(pts, packet.is_keyframe)
        else:
            self.drop_left = 0
        if setting != self.setting:
            self.cc.skip_frame = self.setting = setting

    def _setting(self, pts: int, keyframe: bool) -> str:
        if self.drop_left:  # read ahead with an earlier packet: proven droppable
            self.drop_left -= 1
            return "NONKEY"
        t = self.seconds(pts)
        cell = math.floor(t / self.step)
        if not cell * self.step + SKIP_MARGIN_S <= t <= (cell + 1) * self.step - SKIP_MARGIN_S:
            return "DEFAULT"
        first = self.whole.get(cell, math.inf)
        if first < t and not keyframe:
            after = self._droppable(first, (cell + 1) * self.step) if self.tail else None
            if after is None:
                return self.level
            self.drop_left = after
            return "NONKEY"
        if t < first:
            self.whole[cell] = t
            if len(self.whole) > 256:  # reordering spans a few frames: forget the past
                self.whole = {c: v for c, v in self.whole.items() if c >= cell - 16}
        return "DEFAULT"

    def _droppable(self, witness: float, next_grid: float) -> int | None:
        """How many of the packets after the current one can be dropped with it: those up to
        the next keyframe, when they all lie after the witness and before next_grid, the
        keyframe is at or before next_grid and no frame after it is shown before it; None
        when the current packet must not be dropped."""
        i, held = 0, 0
        while i < LOOKAHEAD and held < LOOKAHEAD_BYTES:
            q = self._peek(i)
            if q is None or not q.size:  # the end of the stream: nothing comes after
                return i
            held += q.size
            if q.pts is None or q.is_discard:
                return None
            t = self.seconds(q.pts)
            if q.is_keyframe:
                if t > next_grid + SKIP_MARGIN_S:
                    return None
                for j in range(i + 1, i + 1 + REORDER_PACKETS):  # an open GOP's leading frames
                    r = self._peek(j)
                    if r is None or not r.size:
                        break
                    if r.pts is None or r.pts < q.pts:
                        return None
                return i
            if not witness < t <= next_grid - SKIP_MARGIN_S:
                return None
            i += 1
        return None

    def _peek(self, i: int):
        """The i-th packet after the current one (read ahead), None after the last."""
        while len(self.ahead) <= i:
            packet = next(self.source, None)
            if packet is None:
                return None
            self.ahead.append(packet)
        return self.ahead[i]

    def passed(self, pts: int | None) -> list[int]:
        """The pts of the counted frames before the returned frame at pts that the decoder
        did not return; pts None (no time) passes none."""
        out = []
        if pts is None:
            return out
        while self.pending and self.pending[0] < pts:
            out.append(heapq.heappop(self.pending))
        if self.pending and self.pending[0] == pts:
            heapq.heappop(self.pending)
        return out

    def rest(self) -> list[int]:
        """The counted frames after the last one returned (at the end of the stream)."""
        out, self.pending = sorted(self.pending), []
        return out


class _Packets:
    """The stream's decoded frames, packet by packet, skipping undecodable packets (counted
    in stats; more than MAX_BAD_PACKETS in a row gives the file up)."""

    def __init__(self, container, stream, stats: VideoStats, logs, max_pixels: int,
                 skipper: _Skipper | None = None):
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
    sampler, last_t = _Sampler(sample_fps, every_n, next_t), None
    key_pts = window.seg["key_pts"] if window is not None and window.do_seek else None
    skipper = _Skipper.of(container, stream, sample_fps, every_n, base, start, key_pts)
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


def _count_passed(skipper: _Skipper, passed: list[int], window, stats: VideoStats) -> int:
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
