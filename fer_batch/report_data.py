"""The report's data in bounded memory: streaming passes over the latest committed run of
each source (readers.iter_latest), never a whole faces table in memory.

    files rows (one per source) and the run manifests                   O(files)
    pass 1 over faces, narrow columns (no crops, no probabilities):
      -> faces per (source, media_type, label)                         O(files x labels)
      -> contact-sheet picks: per label the best CONTACT_PER_LABEL     O(labels x picks)
    -> the MAX_TIMELINES videos with most faces
    one pass over tracks: their number, the first MAX_TABLE_ROWS by (source, track_id), the
      MAX_LANES tracks with most faces of each drawn video             O(rows shown)
    pass 2 over the faces of the drawn videos only (a pushed-down source filter):
      -> mean class probabilities per sampled frame, the lanes' face times   O(frames drawn)
    crop_png of the picked faces only                                  O(picks)

Each pass holds one Arrow batch of at most BATCH_ROWS rows (plus what it keeps), so an
output of 10 million faces takes the memory of its files table and a few batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fer_batch import readers, runs, sink, tracks

BATCH_ROWS = 65_536  # face rows per scanned batch: pass 1 reads ~60 bytes a row, a few MB
MAX_TIMELINES = 12  # videos with a timeline, most faces first
MAX_LANES = 16  # track lanes per timeline, most faces first
CONTACT_PER_LABEL = 12  # crops per label on the contact sheet
MAX_TABLE_ROWS = 200  # rows of the tracks and errors tables
COUNT_KEYS = ["source", "media_type", "label"]  # pass 1 counts faces per these
PICK_COLUMNS = ["source", "run_id", "frame_index", "face_index", "track_id", "label", "score"]
TALLY_COLUMNS = [*PICK_COLUMNS, "media_type"]  # what pass 1 reads
TRACK_SUMMARY_COLUMNS = ["source", "track_id", "start_s", "end_s", "faces", "dominant_label",
                 "segments"]  # what the tracks table and the lanes show


@dataclass
class Timeline:
    """One drawn video. per_frame: index timestamp_s (float64, ascending), one float32
    column per class, the mean over the faces of each sampled frame; lanes: its MAX_LANES
    tracks with most faces (TRACK_SUMMARY_COLUMNS), by track_id; seen: track_id, timestamp_s of the
    lanes' faces; faces, tracks: counts over the whole video."""
    source: str
    faces: int
    tracks: int
    per_frame: pd.DataFrame
    lanes: pd.DataFrame
    seen: pd.DataFrame


@dataclass
class ReportData:
    """What report.py draws, every part bounded by the number of files or of picks.

    files: the files rows (pandas), latest run per source; counts: faces per (source,
    media_type, label), an int64 Series; picked: the contact sheet's faces (PICK_COLUMNS),
    by label in ``labels`` order; track_rows: the first MAX_TABLE_ROWS tracks by (source,
    track_id); faces, tracks, videos: totals (videos: videos with faces)."""
    out: runs.Output
    manifests: dict
    files: pd.DataFrame
    classes: list[str]
    smooth_s: float
    labels: list[str] = field(default_factory=list)
    faces: int = 0
    counts: pd.Series = field(default_factory=lambda: pd.Series(dtype=np.int64))
    picked: pd.DataFrame = field(default_factory=pd.DataFrame)
    videos: int = 0
    timelines: list[Timeline] = field(default_factory=list)
    tracks: int = 0
    track_rows: pd.DataFrame = field(default_factory=pd.DataFrame)


def load(out_uri: str, endpoint_url: str | None = None,
         batch_rows: int = BATCH_ROWS) -> ReportData:
    """The report's data from one listing of the committed runs of OUT (local or s3://),
    reading faces and tracks in batches of at most batch_rows rows."""
    out = runs.Output(out_uri, endpoint_url)
    manifests = out.committed_runs()
    names = face_columns(out)
    scan = partial(readers.iter_latest, out, runs=manifests, batch_rows=batch_rows)
    d = ReportData(out=out, manifests=manifests,
                   files=readers.read_files(out, runs=manifests).to_pandas(),
                   classes=[c for c in model_classes(manifests)
                            if c in names or sink.OTHER_CLASSES in names],
                   smooth_s=track_smooth_s(manifests))
    d.faces, d.counts, picks = tally_faces(
        scan("faces", columns=[c for c in TALLY_COLUMNS if c in names]))
    d.labels = label_order(d.classes, d.counts.index.get_level_values("label"))
    d.picked = order_by_label(picks, d.labels)
    per_video = video_faces(d.counts)
    d.videos = len(per_video)
    drawn = per_video.head(MAX_TIMELINES)
    d.tracks, d.track_rows, lanes, n_tracks = scan_tracks(
        scan("tracks", columns=TRACK_SUMMARY_COLUMNS), list(drawn.index))
    d.timelines = build_timelines(scan, drawn, d.classes, names, lanes, n_tracks)
    return d


def face_columns(out: runs.Output) -> list[str]:
    """The column names of OUT/faces ([] when there is none)."""
    if not out.exists(out.path("faces")):
        return []
    return readers.table_dataset(out, "faces").schema.names  # every model's classes


def model_classes(manifests: dict) -> list[str]:
    """The classes of every run's model, first seen first."""
    classes: list[str] = []
    for m in manifests.values():
        classes += [c for c in m.get("classes", []) if c not in classes]
    return classes


def track_smooth_s(manifests: dict) -> float:
    """The runs' --track-smooth-s (the first run that recorded one), else tracks.SMOOTH_S."""
    smooth = [m.get("config", {}).get("track_smooth_s") for m in manifests.values()]
    return next((s for s in smooth if s is not None), tracks.SMOOTH_S)


def label_order(classes, labels) -> list[str]:
    """The model's classes in logit order, then any other label present (uncertain)."""
    return list(classes) + sorted({str(x) for x in labels} - set(classes))


# --- pass 1: counts and contact-sheet picks ---------------------------------------------

def tally_faces(batches, per_label: int = CONTACT_PER_LABEL):
    """Pass 1 over face batches (TALLY_COLUMNS). Returns (number of faces, faces per
    COUNT_KEYS as an int64 Series, the picks of ``keep_best``)."""
    n, counts, picks = 0, None, None
    for tbl in batches:
        df = tbl.to_pandas()
        if "track_id" not in df:  # an output written before tracks existed
            df["track_id"] = np.nan
        n += len(df)
        part = df.groupby(COUNT_KEYS).size()
        counts = part if counts is None else counts.add(part, fill_value=0).astype(np.int64)
        picks = keep_best(df if picks is None else pd.concat([picks, df[PICK_COLUMNS]],
                                                             ignore_index=True), per_label)
    if counts is None:
        index = pd.MultiIndex.from_arrays([[], [], []], names=COUNT_KEYS)
        return 0, pd.Series([], index=index, dtype=np.int64), pd.DataFrame(columns=PICK_COLUMNS)
    return n, counts, picks


def keep_best(faces: pd.DataFrame, per_label: int) -> pd.DataFrame:
    """Per label the first per_label faces by (rank in its track, score descending, source,
    frame_index, face_index): the best face of each track (an image face is its own track)
    first, then the second best of each, and so on.

    Folding batches through this keeps exactly the picks of the whole table: a face dropped
    here only falls further (its rank can only grow) while the per_label kept ahead of it
    only improve, and the kept faces of a track are always its best ones, so ranks counted
    among them are true ranks."""
    f = faces.loc[faces["label"].notna(), PICK_COLUMNS]
    f = f.sort_values(["score", "source", "frame_index", "face_index"],
                      ascending=[False, True, True, True], kind="stable")
    tracked = f["track_id"].notna()
    rank = np.zeros(len(f), np.int64)
    rank[tracked.to_numpy()] = f[tracked].groupby(["label", "source", "track_id"]).cumcount()
    f = f.iloc[np.argsort(rank, kind="stable")]
    return f.groupby("label", sort=False).head(per_label).reset_index(drop=True)


def order_by_label(picks: pd.DataFrame, labels) -> pd.DataFrame:
    """The picks of each label in turn, in labels order."""
    parts = [picks[picks["label"] == lab] for lab in labels]
    return pd.concat(parts, ignore_index=True) if parts else picks


def video_faces(counts: pd.Series) -> pd.Series:
    """Faces per video (source -> count), most first; ties in source order."""
    video = counts[counts.index.get_level_values("media_type") == "video"]
    per = video.groupby(level="source").sum()
    return per.sort_values(ascending=False, kind="stable")


def source_label_table(counts: pd.Series, labels) -> pd.DataFrame:
    """Faces per source (index, sorted) and label (columns, labels order): int64."""
    tab = counts.groupby(level=["source", "label"]).sum().unstack(fill_value=0)
    return tab.reindex(columns=labels, fill_value=0).astype(np.int64)


# --- tracks: the table's first rows, the drawn videos' lanes ----------------------------

def scan_tracks(batches, videos: list[str], table_rows: int = MAX_TABLE_ROWS,
                per_video: int = MAX_LANES):
    """One pass over track batches (TRACK_SUMMARY_COLUMNS). Returns (number of tracks, the first
    table_rows by (source, track_id) as pandas, the per_video tracks with most faces of each
    of videos (ties: lower track_id) as pandas, {video: its number of tracks})."""
    n, first, lanes, n_tracks = 0, None, None, {}
    order = [("source", "ascending"), ("track_id", "ascending")]
    for tbl in batches:
        tbl = tbl.select(TRACK_SUMMARY_COLUMNS)
        n += tbl.num_rows
        first = tbl if first is None else pa.concat_tables([first, tbl])
        first = first.sort_by(order).slice(0, table_rows)
        mine = tbl.filter(pc.is_in(tbl["source"], pa.array(videos, pa.string())))
        for src, k in zip(*pc.value_counts(mine["source"]).flatten()):
            n_tracks[src.as_py()] = n_tracks.get(src.as_py(), 0) + k.as_py()
        lanes = mine if lanes is None else pa.concat_tables([lanes, mine])
        lanes = longest_tracks(lanes, per_video)
    empty = pd.DataFrame(columns=TRACK_SUMMARY_COLUMNS)
    return (n, empty if first is None else first.to_pandas(),
            empty if lanes is None else lanes.to_pandas(), n_tracks)


def longest_tracks(tbl: pa.Table, per_video: int) -> pa.Table:
    """The per_video tracks with most faces of each source (ties: lower track_id)."""
    if tbl.num_rows == 0:
        return tbl
    tbl = tbl.sort_by([("source", "ascending"), ("faces", "descending"),
                       ("track_id", "ascending")])
    src = tbl["source"].to_numpy()
    start = np.r_[0, np.flatnonzero(src[1:] != src[:-1]) + 1]  # first row of each source
    pos = np.arange(len(src)) - np.repeat(start, np.diff(np.r_[start, len(src)]))
    return tbl.filter(pa.array(pos < per_video))


# --- pass 2: the drawn videos' frames ----------------------------------------------------

def frame_means(batches, classes, lanes: pd.DataFrame):
    """Pass 2 over the faces of the drawn videos (timestamp_s, track_id, classes). Returns
    (mean probability per class and sampled frame: index (source, timestamp_s), float32,
    sorted; source, track_id, timestamp_s of the faces of the lanes' tracks)."""
    sums, seen = None, []
    keys = lanes[["source", "track_id"]].astype({"track_id": np.float64})
    for tbl in batches:
        df = with_class_columns(tbl, classes).to_pandas()
        if "track_id" not in df:
            df["track_id"] = np.nan
        grouped = df.astype({c: np.float64 for c in classes}).groupby(["source", "timestamp_s"])
        part = grouped[list(classes)].sum().assign(_n=grouped.size())
        sums = part if sums is None else sums.add(part, fill_value=0)
        ours = df[["source", "track_id", "timestamp_s"]].astype({"track_id": np.float64})
        seen.append(ours.merge(keys, on=["source", "track_id"]))
    if sums is None:
        index = pd.MultiIndex.from_arrays([[], []], names=["source", "timestamp_s"])
        means = pd.DataFrame(columns=list(classes), index=index, dtype=np.float32)
        return means, pd.DataFrame(columns=["source", "track_id", "timestamp_s"])
    means = sums[list(classes)].div(sums["_n"], axis=0).astype(np.float32).sort_index()
    return means, pd.concat(seen, ignore_index=True).sort_values(["source", "timestamp_s"])


def with_class_columns(tbl: pa.Table, classes) -> pa.Table:
    """tbl with one float32 column per class (sink.probability: its column, or its entry in
    other_classes), without the map."""
    for c in classes:
        if c not in tbl.column_names:
            tbl = tbl.append_column(c, sink.probability(tbl, c))
    return tbl.drop_columns([sink.OTHER_CLASSES]) if sink.OTHER_CLASSES in tbl.column_names \
        else tbl


def build_timelines(scan, drawn: pd.Series, classes, names, lanes: pd.DataFrame,
                    n_tracks: dict) -> list[Timeline]:
    """The Timeline of each drawn video (source -> faces, most first), from pass 2 over
    their faces only; scan(table, columns=..., filter=...) streams a table."""
    if drawn.empty:
        return []
    cols = [c for c in ("timestamp_s", "track_id") if c in names] + \
        [c for c in classes if c in names]
    if any(c not in names for c in classes):  # classes outside the vocabulary: in the map
        cols.append(sink.OTHER_CLASSES)
    per_frame, seen = frame_means(
        scan("faces", columns=cols, filter=pc.field("source").isin(list(drawn.index))),
        classes, lanes)
    return [Timeline(src, int(n), n_tracks.get(src, 0),
                     per_frame.loc[src] if src in per_frame.index else per_frame.iloc[:0],
                     lanes[lanes["source"] == src].sort_values("track_id"),
                     seen[seen["source"] == src])
            for src, n in drawn.items()]

# --- the picked crops ----------------------------------------------------------------------

def read_crops(out: runs.Output, picked: pd.DataFrame,
               batch_rows: int = BATCH_ROWS) -> list[bytes]:
    """crop_png of the picked faces, in picked's order (b"" for one not found), scanning
    only their partitions and frames and keeping only their crops."""
    if picked.empty:
        return []
    key = lambda s, r, f, i: (s, str(r), int(f), int(i))  # noqa: E731
    want = {key(*r) for r in picked[["source", "run_id", "frame_index", "face_index"]]
            .itertuples(index=False)}
    ds = readers.table_dataset(out, "faces")
    flt = (pc.field("run_id").isin(sorted({str(k[1]) for k in want}))
           & pc.field("source").isin(sorted({k[0] for k in want}))
           & pc.field("frame_index").isin(sorted({k[2] for k in want})))
    png = {}
    for b in ds.to_batches(columns=["source", "run_id", "frame_index", "face_index",
                                    "crop_png"], filter=flt, batch_size=batch_rows):
        for s, r, f, i, crop in zip(*(b.column(c).to_pylist() for c in b.schema.names)):
            if key(s, r, f, i) in want:
                png[key(s, r, f, i)] = crop
    return [png.get(key(*r), b"") for r in picked[["source", "run_id", "frame_index",
                                                    "face_index"]].itertuples(index=False)]
