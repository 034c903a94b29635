"""Long videos in time segments: one video -> several work units decoded in parallel, and
their partial files rows -> one files row again.

A long video would keep one core busy for its whole length while the rest of the cluster
waits. The driver cannot know durations (it lists millions of files and opens none), so
the videos are opened on the workers (pipeline.split_long_videos runs split_unit in Ray
tasks, before the annotate chain: Ray Data hands a block to one actor whole, so segments
must be work units of their own from the start):

    split_unit(row)       a work unit holding one video: open its header (duration); when
                          longer than 1.5 x segment_s, demux its packets once (no decoding)
                          and emit one unit per segment, each entry carrying a ``segment``
    iter_unit_frames(f, entry) FaceCropper decodes a segment: seek to the keyframe at or before
                          its start, decode from there, keep the frames of [start, end)
    fold_rows(table)      before the commit, the segments' partial rows of a video -> its
                          one files row (sums; error when any segment failed)

Frame indexes and timestamps are those of one-task decoding (``decode.iter_frames``):
the index of a frame is its rank in presentation order among all frames of the video
(``first_index`` counts the frames before the segment's keyframe), and with --sample-fps
segment borders lie on the sampling grid (multiples of 1/sample_fps), where the sampler's
state does not depend on earlier frames. Only codecs whose packets are one frame each are
split (``sampling.FRAME_PACKET_CODECS``); others stay one task.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pyarrow as pa

from fer_batch import decode, sampling, sink, storage
from fer_batch.config import ANNOTATE_DEFAULTS

EPS_S = sampling.TIME_EPS_S  # the sampler's tolerance: a segment keeps what it would keep
MARGIN_S = 1e-3  # seconds; a segment's decode starts at a keyframe this much before its start


class SeekMismatch(Exception):
    """The decoder's first frame after a seek is not the planned keyframe."""


# --- planning (pure) ------------------------------------------------------------------

def segment_bounds(duration_s: float, *, segment_s: float, sample_fps: float,
                   every_n: int) -> list[float]:
    """Inner borders of the segments of a video, seconds, ascending; [] = one segment.

    Segments are segment_s long (rounded to whole sampling steps), the last one takes the
    rest (0.5 to 1.5 segment_s), so a video is split when it is longer than 1.5 segment_s.
    With --sample-fps (every_n == 0) a border is k * (1 / sample_fps), computed as decode's
    sampler computes its next sample time, so it falls exactly on the sampling grid."""
    if segment_s <= 0:
        return []
    step = 0.0 if every_n else 1.0 / sample_fps
    n_steps = 0 if every_n else max(1, round(segment_s / step))
    count = round(duration_s / (n_steps * step if step else segment_s))
    if every_n:
        return [k * segment_s for k in range(1, count)]
    return [(k * n_steps) * step for k in range(1, count)]


def plan_segments(pts: np.ndarray, keyframe: np.ndarray, time_base: Fraction, start_pts: int,
                  bounds: list[float]) -> list[dict]:
    """One ``segment`` dict per segment of a video.

    Parameters
    ----------
    pts: shape = (n,), int64, presentation time of every frame in the stream's time base,
        distinct (any order: sorted here).
    keyframe: shape = (n,), bool, True where the frame's packet is a keyframe.
    time_base: seconds per pts unit; start_pts: the stream's start time (decode's t = 0).
    bounds: inner borders in seconds (``segment_bounds``).

    Returns
    -------
    list of {index, count, start_s, end_s, key_pts, first_index}: segment ``index`` of
    ``count`` keeps the frames with start_s <= t < end_s (None: unbounded), decoding from the
    keyframe at pts ``key_pts`` (None: from the file's start), whose index in the whole video
    is ``first_index``.
    """
    order = np.argsort(pts, kind="stable")
    pts, keyframe = np.asarray(pts, np.int64)[order], np.asarray(keyframe, bool)[order]
    t = (pts - start_pts).astype(np.float64) * float(time_base)
    edges = [None, *bounds, None]
    plan = []
    for i in range(len(edges) - 1):
        seg = dict(index=i, count=len(edges) - 1, start_s=edges[i], end_s=edges[i + 1],
                   key_pts=None, first_index=0)
        if edges[i] is not None:
            first = int(np.searchsorted(t + EPS_S, edges[i] - MARGIN_S, "left"))
            keys = np.flatnonzero(keyframe[:first + 1])
            if len(keys) and keys[-1] > 0:  # else decode from the file's start
                seg.update(key_pts=int(pts[keys[-1]]), first_index=int(keys[-1]))
        plan.append(seg)
    return plan


# --- splitting a work unit (plain Ray tasks before the Ray Data chain: split_units) --------

def probe_video(file, min_duration_s: float, max_pixels: int = ANNOTATE_DEFAULTS.max_pixels):
    """(pts, keyframe, time_base, start_pts, duration_s) of a video's first video stream,
    from its packets (demuxed, not decoded), when its header declares more than
    min_duration_s seconds; else None, as when it cannot be split exactly (no video stream,
    a codec outside sampling.FRAME_PACKET_CODECS, packets without pts or with repeated pts)."""
    import av
    with av.open(file, mode="r", metadata_errors="ignore",
                 options={"max_pixels": str(max_pixels)}) as container:
        if not container.streams.video:
            return None
        stream = container.streams.video[0]
        declared = decode._duration_s(stream, container)
        if not declared or declared <= min_duration_s or not stream.time_base or \
                stream.codec_context.name not in sampling.FRAME_PACKET_CODECS:
            return None
        pts, key = [], []
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:  # flush packets; edit-list discards
                continue
            if packet.pts is None:
                return None
            pts.append(packet.pts)
            key.append(packet.is_keyframe)
        pts = np.asarray(pts, np.int64)
        if len(pts) == 0 or len(np.unique(pts)) != len(pts):
            return None
        start = stream.start_time or 0
        duration = float((int(pts.max()) - start) * stream.time_base)
        return pts, np.asarray(key, bool), stream.time_base, start, duration


def split_unit(row: dict, *, segment_s: float = ANNOTATE_DEFAULTS.segment_seconds,
               sample_fps: float = ANNOTATE_DEFAULTS.sample_fps,
               every_n: int = ANNOTATE_DEFAULTS.every_n_frames,
               max_pixels: int = ANNOTATE_DEFAULTS.max_pixels, endpoint_url: str | None = None,
               attempts=None, max_attempts: int = ANNOTATE_DEFAULTS.max_file_retries + 1
               ) -> list[dict]:
    """A work unit (pipeline.work_units row) -> the same unit, or one unit
    per segment when it holds one video longer than segment_s. Never raises: a video that
    cannot be opened or split stays whole (FaceCropper then reports what is wrong with it).
    attempts: as FaceCropper's; a video whose probe killed the worker max_attempts times is
    not probed again."""
    entries = json.loads(str(row["files"]))
    if segment_s <= 0 or len(entries) != 1 or entries[0]["media_type"] != "video":
        return [row]
    entry = entries[0]
    key = f"{entry['uri']}#probe"
    if attempts is not None and attempts(key) > max_attempts:
        return [row]
    try:
        with storage.open_input(entry["uri"], endpoint_url) as f:
            probe = probe_video(f, segment_s, max_pixels)
    except Exception:  # noqa: BLE001 - the cropper reports damaged files, in their one row
        probe = None
    if attempts is not None:
        attempts.finish(key, files=0)
    if probe is None:
        return [row]
    pts, key_flags, time_base, start_pts, duration = probe
    bounds = segment_bounds(duration, segment_s=segment_s, sample_fps=sample_fps,
                            every_n=every_n)
    if not bounds:
        return [row]
    plan = plan_segments(pts, key_flags, time_base, start_pts, bounds)
    return [{"files": json.dumps([dict(entry, segment=seg)])} for seg in plan]


def split_units(units: list, kw: dict) -> list[dict]:
    """split_unit over several work units (the body of pipeline's Ray task)."""
    return [row for unit in units for row in split_unit(unit, **kw)]


def video_uri(row: dict) -> str | None:
    """The uri of a work unit holding one video (or one of its segments), else None."""
    entries = json.loads(str(row["files"]))
    if len(entries) == 1 and entries[0]["media_type"] == "video":
        return entries[0]["uri"]
    return None


def unit_order(row: dict) -> int:
    """Sort key of a video's units: the segment index (0 for a whole video)."""
    return (json.loads(str(row["files"]))[0].get("segment") or {}).get("index", 0)


# --- decoding one segment (FaceCropper) -----------------------------------------------

def attempt_key(entry: dict) -> str:
    """The AttemptLedger key of a work entry: its uri, plus #segment=i for a segment (one
    crashing segment does not count against the others)."""
    seg = entry.get("segment")
    return entry["uri"] if seg is None else f"{entry['uri']}#segment={seg['index']}"


def describe(seg: dict) -> str:
    """'segment 2 of 4 (300-600 s)', for messages."""
    lo = "0" if seg["start_s"] is None else f"{seg['start_s']:g}"
    hi = "end" if seg["end_s"] is None else f"{seg['end_s']:g} s"
    return f"segment {seg['index'] + 1} of {seg['count']} ({lo}-{hi})"


class Window:
    """What decode.iter_frames needs to decode one segment: where to seek, the index of the
    first frame decoded after the seek, and which frames belong to the segment."""

    def __init__(self, seg: dict, seek: bool = True):
        self.seg, self.do_seek = seg, seek and seg["key_pts"] is not None
        self.lo = -math.inf if seg["start_s"] is None else seg["start_s"]
        self.hi = math.inf if seg["end_s"] is None else seg["end_s"]
        self.checked, self.ended, self.frames = not self.do_seek, False, 0

    @property
    def last(self) -> bool:
        """The segment runs to the end of the video (so decode checks for truncation)."""
        return self.seg["end_s"] is None

    def start(self, container, stream) -> tuple[int, float]:
        """Seek; returns (index before the first counted frame, sampler's next time)."""
        if not self.do_seek:
            return -1, self.lo if math.isfinite(self.lo) else 0.0
        container.seek(self.seg["key_pts"], backward=True, any_frame=False, stream=stream)
        return self.seg["first_index"] - 1, self.lo

    def skip(self, pts) -> bool:
        """True for a frame decoded only on the way to the keyframe (not counted); raises
        SeekMismatch when the first counted frame is not the keyframe."""
        if self.checked:
            return False
        if pts is None or pts < self.seg["key_pts"]:
            return True
        if pts != self.seg["key_pts"]:
            raise SeekMismatch(f"first frame after the seek has pts {pts}, "
                               f"not the keyframe's {self.seg['key_pts']}")
        self.checked = True
        return False

    def holds(self, t: float) -> bool:
        """Whether the frame at t seconds belongs to the segment; sets ended past its end."""
        if t + EPS_S >= self.hi:
            self.ended = True
            return False
        return self.count(t)

    def count(self, t: float) -> bool:
        """Counts a frame at t seconds (one decoded, or one the decoder skipped) when it
        belongs to the segment; whether it does."""
        inside = self.lo <= t + EPS_S < self.hi
        self.frames += inside
        return inside


def iter_unit_frames(file, entry: dict, *, stats: decode.VideoStats, **kw):
    """decode.iter_frames for a work entry: the whole video, or the frames of its segment
    (entry["segment"]) with the indexes and timestamps of the whole video. stats ends with
    frames_decoded = the frames of the segment. A seek that does not land on the planned
    keyframe falls back to decoding from the file's start (slower, same frames)."""
    seg = entry.get("segment")
    if seg is None:
        yield from decode.iter_frames(file, stats=stats, **kw)
        return
    window = Window(seg)
    try:
        try:
            yield from decode.iter_frames(file, stats=stats, window=window, **kw)
        except SeekMismatch:
            file.seek(0)
            window = Window(seg, seek=False)
            stats.__init__()  # counts start again
            yield from decode.iter_frames(file, stats=stats, window=window, **kw)
    finally:
        stats.frames_decoded = window.frames


# --- one files row per video (at the end of the run) ----------------------------------

def fold_rows(rows: pa.Table) -> pa.Table:
    """Partial files rows of segments -> one files row per source.

    rows: sink.SEGMENT_SCHEMA, at most one row per (source, segment) (deduplicated).
    Returns a sink.FILE_SCHEMA table: frames_decoded, faces and seconds summed; status error
    when a segment failed or is missing, with the segments' messages (each names its
    segment)."""
    file_schema = sink.FILE_SCHEMA
    cols = {n: rows[n].to_pylist() for n in rows.column_names}
    by_source: dict[str, list[int]] = {}
    for i, s in enumerate(cols["source"]):
        by_source.setdefault(s, []).append(i)
    out = {n: [] for n in file_schema.names}
    for source, idx in by_source.items():
        idx.sort(key=lambda i: cols["segment"][i])
        errors = [cols["error"][i] for i in idx if cols["status"][i] == "error"]
        count = cols["segments"][idx[0]]
        missing = sorted(set(range(count)) - {cols["segment"][i] for i in idx})
        if missing:
            errors.append(f"segments {[m + 1 for m in missing]} of {count} left no row")
        for n in file_schema.names:
            if n in ("frames_decoded", "faces", "seconds"):
                out[n].append(sum(cols[n][i] or 0 for i in idx))
            elif n == "status":
                out[n].append("error" if errors else "ok")
            elif n == "error":
                out[n].append("; ".join(e or "" for e in errors)[:1000] or None)
            else:
                out[n].append(cols[n][idx[0]])
    return pa.table(out, schema=file_schema)
