"""Face tracks: link the faces of a video across sampled frames, smooth each track's
expression probabilities over time and cut it into labelled segments.

Pure functions on pyarrow tables and numpy arrays: no Ray, no I/O. Tracking runs
after inference, on a run's staged faces, so that a video split into segments is
tracked across their borders: ``finish.track`` (a step of ``pipeline.run`` before the
commit) calls ``assign_tracks`` and stages the result (faces gain ``track_id``; a ``tracks``
table is written, schema ``sink.tracks_schema``).

Association, per source, frame by frame in frame_index order (no identity model):

    predict   each live track's box at the frame's time: its centre moves at the
              velocity of its last two observations (constant velocity), its size
              stays that of its last observation (Haar box sizes jitter ~10%)
    score     IoU(predicted box, detection); a pair with IoU < iou_threshold may
              still match on centres closer than MAX_CENTER_SHIFT face sides, for
              faces of similar size (fast motion at a low sampling rate)
    match     greedily, best IoU first (then nearest centre); unmatched detections
              start new tracks; a track unseen for more than max_gap_s ends, so a
              face the detector misses for a few sampled frames keeps its track

Faces without a timestamp (images) get a null track_id and no track.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fer_batch.config import ANNOTATE_DEFAULTS
from fer_batch.sampling import TIME_EPS_S
from fer_batch.sink import TRACK_COLUMNS, TRACK_SCHEMA, TRACK_TAIL, class_arrays, probability, \
    top_labels

IOU_THRESHOLD = ANNOTATE_DEFAULTS.track_iou_threshold  # SORT's 0.3 (Bewley et al. 2016)
MAX_GAP_S = ANNOTATE_DEFAULTS.track_max_gap_s  # 3 missed frames at the default 2 fps
SMOOTH_S = ANNOTATE_DEFAULTS.track_smooth_s  # moving-average window: 3 samples at 2 fps
MAX_CENTER_SHIFT = 0.5  # centroid fallback: centre distance / face side of a match, at most;
# 1.0 merged different passers-by on the street clip at 2 fps (checked on the crops), 0.5 did not
MAX_SIZE_RATIO = 1.5  # centroid fallback: larger / smaller face side of a match, at most
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU. a: shape = (n, 4), b: shape = (m, 4), float x, y, w, h -> (n, m) float64."""
    a, b = np.asarray(a, np.float64)[:, None, :], np.asarray(b, np.float64)[None, :, :]
    iw = np.clip(np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2])
                 - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3])
                 - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def match_boxes(pred: np.ndarray, det: np.ndarray, iou_threshold: float = IOU_THRESHOLD):
    """Greedy one-to-one matching of predicted track boxes to detections.

    pred: shape = (n, 4), det: shape = (m, 4), float x, y, w, h.
    Returns a list of (track row, detection row) pairs.
    """
    if len(pred) == 0 or len(det) == 0:
        return []
    iou = box_iou(pred, det)
    cp = pred[:, None, :2] + pred[:, None, 2:] / 2
    cd = det[None, :, :2] + det[None, :, 2:] / 2
    side = np.sqrt(pred[:, None, 2] * det[None, :, 2])
    shift = np.linalg.norm(cp - cd, axis=2) / np.maximum(side, 1e-9)
    ratio = np.maximum(pred[:, None, 2], det[None, :, 2]) / \
        np.maximum(np.minimum(pred[:, None, 2], det[None, :, 2]), 1e-9)
    ok = (iou >= iou_threshold) | ((shift <= MAX_CENTER_SHIFT) & (ratio <= MAX_SIZE_RATIO))
    ti, di = np.nonzero(ok)
    order = np.lexsort((shift[ti, di], -iou[ti, di]))  # best IoU first, then nearest centre
    used_t, used_d, pairs = set(), set(), []
    for k in order:
        t, d = int(ti[k]), int(di[k])
        if t not in used_t and d not in used_d:
            used_t.add(t)
            used_d.add(d)
            pairs.append((t, d))
    return pairs


def _centre(box: np.ndarray) -> np.ndarray:
    return box[:2] + box[2:] / 2


def link_faces(frame: np.ndarray, t: np.ndarray, boxes: np.ndarray, *,
               iou_threshold: float = IOU_THRESHOLD, max_gap_s: float = MAX_GAP_S) -> np.ndarray:
    """Track ids for the faces of one video.

    frame: shape = (n,) int64 frame index, ascending; t: shape = (n,) float64 seconds;
    boxes: shape = (n, 4) float x, y, w, h in original pixels.
    Returns track ids, shape = (n,) int32, numbered 0, 1, ... by first appearance.
    """
    ids = np.full(len(frame), -1, np.int32)
    live: list[dict] = []  # id, last box, last time, centre velocity (px/s)
    next_id = 0
    starts = np.flatnonzero(np.r_[True, frame[1:] != frame[:-1]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(frame)]):
        now = t[lo]
        live = [tr for tr in live if now - tr["t"] <= max_gap_s + TIME_EPS_S]
        pred = np.array([np.r_[tr["box"][:2] + tr["v"] * (now - tr["t"]), tr["box"][2:]]
                         for tr in live], np.float64).reshape(-1, 4)  # size kept, centre moved
        det = boxes[lo:hi].astype(np.float64)
        matched = set()
        for ti, di in match_boxes(pred, det, iou_threshold):
            tr, dt = live[ti], now - live[ti]["t"]
            if dt > TIME_EPS_S:
                tr["v"] = (_centre(det[di]) - _centre(tr["box"])) / dt
            tr.update(box=det[di], t=now)
            ids[lo + di] = tr["id"]
            matched.add(di)
        for di in range(hi - lo):
            if di not in matched:
                live.append(dict(id=next_id, box=det[di], t=now, v=np.zeros(2)))
                ids[lo + di] = next_id
                next_id += 1
    return ids


def smooth_probs(t: np.ndarray, probs: np.ndarray, window_s: float = SMOOTH_S) -> np.ndarray:
    """Centred moving average over time: each row becomes the mean of the rows within
    window_s / 2 seconds of it (irregular sampling and gaps are fine).

    t: shape = (n,) float64 seconds, ascending; probs: shape = (n, k) float32.
    Returns shape = (n, k) float32 (a copy; window_s <= 0 leaves values unchanged).
    """
    probs = np.asarray(probs, np.float32)
    if window_s <= 0 or len(t) < 2:
        return probs.copy()
    half = window_s / 2 + TIME_EPS_S
    lo = np.searchsorted(t, t - half, "left")
    hi = np.searchsorted(t, t + half, "right")
    cs = np.vstack([np.zeros((1, probs.shape[1])), np.cumsum(probs, axis=0, dtype=np.float64)])
    return ((cs[hi] - cs[lo]) / (hi - lo)[:, None]).astype(np.float32)


def label_segments(t: np.ndarray, labels) -> list[tuple[float, float, str]]:
    """Runs of equal labels as (start_s, end_s, label). A label change falls halfway
    between the two observations around it; the track's first and last times bound it.

    t: shape = (n,) float64 seconds, ascending; labels: n strings.
    """
    if len(t) == 0:
        return []
    segs, start = [], float(t[0])
    for i in range(1, len(t)):
        if labels[i] != labels[i - 1]:
            cut = float(t[i - 1] + t[i]) / 2
            segs.append((start, cut, labels[i - 1]))
            start = cut
    segs.append((start, float(t[-1]), labels[-1]))
    return segs


def summarize_track(t, frame, probs, classes, *, smooth_s: float = SMOOTH_S,
                    min_score: float = ANNOTATE_DEFAULTS.min_score) -> dict:
    """One tracks row (without source, track_id, model_id) from a track's observations.

    t: shape = (n,) float64 seconds, ascending; frame: shape = (n,) int64;
    probs: shape = (n, k) float32, raw per-frame class probabilities.
    """
    smoothed = smooth_probs(t, probs, smooth_s)
    labels, _ = top_labels(smoothed, classes, min_score)
    mean = probs.mean(axis=0)
    names, counts = np.unique(labels, return_counts=True)
    rank = {c: float(mean[j]) for j, c in enumerate(classes)}  # breaks ties in frame counts
    dominant = max(zip(names, counts), key=lambda nc: (nc[1], rank.get(nc[0], -1.0)))[0]
    row = dict(start_s=float(t[0]), end_s=float(t[-1]), first_frame_index=int(frame[0]),
               last_frame_index=int(frame[-1]), faces=len(t), dominant_label=str(dominant),
               segments=[dict(start_s=s, end_s=e, label=str(lab))
                         for s, e, lab in label_segments(t, labels)])
    row.update({c: float(mean[j]) for j, c in enumerate(classes)})
    return row


def _columns(faces: pa.Table, classes: list) -> tuple:
    """The face columns tracking reads, as numpy arrays: source (object), frame_index,
    has a timestamp (bool), timestamp_s (0 where null), boxes (n, 4), probabilities (n, k)
    float32, model_id (list), face_index."""
    n = faces.num_rows
    ts = faces["timestamp_s"]
    boxes = np.stack([faces[c].to_numpy(zero_copy_only=False) for c in "xywh"], 1) if n else \
        np.zeros((0, 4))
    probs = np.stack([probability(faces, c).to_numpy(zero_copy_only=False) for c in classes],
                     1).astype(np.float32) if n else np.zeros((0, len(classes)), np.float32)
    names = faces.column_names
    return (np.asarray(faces["source"].to_pylist(), object),
            faces["frame_index"].to_numpy(zero_copy_only=False).astype(np.int64),
            np.asarray(pc.is_valid(ts).to_numpy(zero_copy_only=False), bool),
            np.asarray(pc.fill_null(ts, 0.0).to_numpy(zero_copy_only=False), np.float64),
            boxes, probs,
            faces["model_id"].to_pylist() if "model_id" in names else [None] * n,
            faces["face_index"].to_numpy(zero_copy_only=False) if "face_index" in names
            else np.zeros(n, np.int64))


def assign_tracks(faces: pa.Table, classes, *, iou_threshold: float = IOU_THRESHOLD,
                  max_gap_s: float = MAX_GAP_S, smooth_s: float = SMOOTH_S,
                  min_score: float = ANNOTATE_DEFAULTS.min_score) -> tuple[pa.Table, pa.Table]:
    """Link faces into tracks, per source, and summarise each track.

    Parameters
    ----------
    faces: face rows of any number of sources, in any order, with at least source,
        frame_index, timestamp_s, x, y, w, h and every class's probabilities (its column,
        or other_classes: sink.probability); model_id is carried into the tracks.
    classes: class names in logit order (the model's classes).
    iou_threshold, max_gap_s: association (module docstring); smooth_s: centred
        moving-average window in seconds for the segment labels (0 = none);
    min_score: smoothed top probability below which a segment is UNCERTAIN.

    Returns
    -------
    faces_with_track_id: ``faces`` with an int32 ``track_id`` column after face_index
        (null where timestamp_s is null), rows and other columns untouched.
    tracks: one row per (source, track_id), schema ``sink.TRACK_SCHEMA`` (each class's mean
        probability in its expression column or other_classes), sorted by source and
        track_id.
    """
    classes = list(classes)
    n = faces.num_rows
    src, frame, has_t, t, boxes, probs, model, face_index = _columns(faces, classes)
    track_id = np.full(n, -1, np.int32)
    rows = []
    _, code = np.unique(src, return_inverse=True)  # sources in sorted order
    order = np.lexsort((face_index, frame, code))
    order = order[has_t[order]]
    cuts = np.flatnonzero(np.diff(code[order])) + 1
    for idx in np.split(order, cuts) if len(order) else []:
        ids = link_faces(frame[idx], t[idx], boxes[idx], iou_threshold=iou_threshold,
                         max_gap_s=max_gap_s)
        track_id[idx] = ids
        by_track = np.argsort(ids, kind="stable")  # keeps time order inside each track
        for sel in np.split(idx[by_track], np.flatnonzero(np.diff(ids[by_track])) + 1):
            row = summarize_track(t[sel], frame[sel], probs[sel], classes, smooth_s=smooth_s,
                                  min_score=min_score)
            rows.append(dict(row, source=src[sel[0]], track_id=int(track_id[sel[0]]),
                             model_id=model[sel[0]]))

    tid = pa.array(track_id, pa.int32(), mask=track_id < 0)
    if "track_id" in faces.column_names:  # re-tracking replaces the old ids
        faces = faces.drop_columns(["track_id"])
    pos = faces.schema.get_field_index("face_index") + 1 if "face_index" in faces.column_names \
        else faces.num_columns
    out = faces.add_column(pos, pa.field("track_id", pa.int32()), tid)
    return out, tracks_table(rows, classes)


def tracks_table(rows: list, classes: list) -> pa.Table:
    """TRACK_SCHEMA table of summarize_track rows (with source, track_id and model_id)."""
    if not rows:
        return TRACK_SCHEMA.empty_table()
    base = pa.Table.from_pylist([{k: v for k, v in r.items() if k not in classes}
                                 for r in rows], schema=pa.schema(list(TRACK_COLUMNS +
                                                                       TRACK_TAIL)))
    columns = {**{c: base[c] for c in base.column_names},
               **class_arrays({c: np.array([r[c] for r in rows]) for c in classes}, len(rows))}
    return pa.table([columns[c] for c in TRACK_SCHEMA.names], schema=TRACK_SCHEMA)
