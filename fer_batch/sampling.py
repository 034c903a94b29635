"""Which frames of a video to keep, and which the decoder need not decode at all.

``Sampler`` keeps every n-th frame (--every-n-frames) or the first frame at or after each
multiple of 1/fps (--sample-fps). ``Skipper`` spares the decoder the frames the sampler will
drop, where the codec and the container allow it (docs/output.md, "Frames"). Both work on
frame times and packet flags; opening and decoding the stream is decode.py's.
"""

from __future__ import annotations

import collections
import heapq
import math
from fractions import Fraction
from typing import Iterator

# codecs whose packets hold one frame each (MPEG-4 part 2 in AVI packs B-frames two to a
# packet): their frames can be counted and timed from packets alone (Skipper, segments.py)
FRAME_PACKET_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mjpeg", "mpeg2video"})
TIME_EPS_S = 1e-6  # seconds; container timestamps are not exact multiples of 1/fps
SKIP_MARGIN_S = 1e-4  # seconds; frames this close to a sampling-grid point are always decoded
LOOKAHEAD = 512  # packets read ahead at most to find the next keyframe (Skipper)
LOOKAHEAD_BYTES = 32 << 20  # and bytes: a 4K stream's packets are large
REORDER_PACKETS = 16  # packets after a keyframe checked for frames shown before it
# containers whose keyframe flags mark random-access points (MP4/MOV sync samples, Matroska
# key blocks), as FFmpeg names them
KEYFRAME_FORMATS = frozenset({"mov", "mp4", "matroska", "webm"})


class Sampler:
    """Which decoded frames to keep: every n-th, or the first at or after each 1/fps tick."""

    def __init__(self, sample_fps: float, every_n: int, next_t: float = 0.0):
        self.step = 1.0 / sample_fps if sample_fps > 0 else 0.0
        self.every_n, self.next_t = every_n, next_t

    def keep(self, index: int, t: float) -> bool:
        if self.every_n:
            return index % self.every_n == 0
        if t + TIME_EPS_S < self.next_t:
            return False
        self.next_t = (int(t / self.step + TIME_EPS_S) + 1) * self.step if self.step else 0.0
        return True


class Skipper:
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
           start: int, min_pts: int | None) -> Skipper | None:
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
