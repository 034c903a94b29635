"""The end of a run: steps on its staged rows (OUT/_staging/RID) after the Ray Data chain
and before the commit, in the order ``pipeline.run`` calls them.

    deduplicate(out, rid)              rows written twice by retried Ray tasks go
    fold_segments(out, rid)            a long video's segment rows become one files row
    track(out, rid, classes, **opts)   faces linked across frames: track_id, OUT/tracks

Each reads and rewrites only the run's own staging. They all run before READY.json: a run
that dies in one of them is a dead run, whose staging the next run deletes and whose files
it does again; after READY the commit (runs.Output.commit) only moves what these made.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fer_batch import sink, tracks
from fer_batch.config import ANNOTATE_DEFAULTS
from fer_batch.runs import Output, move_dir


def deduplicate(out: Output, run_id: str) -> int:
    """Drop rows written twice by retried Ray tasks (same key). Returns rows dropped.
    Memory: the key columns of a table, and one staged file at a time."""
    dropped = 0
    for table, key in (("faces", sink.FACE_KEY), ("files", sink.FILE_KEY),
                       ("segments", sink.SEGMENT_KEY)):
        d = f"{out.staging(run_id)}/{table}"
        if out.exists(d):
            dropped += _drop_repeats(out.fs, d, key)
    return dropped


def _drop_repeats(fs: pafs.FileSystem, folder: str, key) -> int:
    """Keep the first row of each key among the Parquet files of folder; rewrite only the
    files that lose rows (the kept rows first, then the old file goes)."""
    frags = list(pds.dataset(folder, filesystem=fs, format="parquet").get_fragments())
    keys = pa.concat_tables([f.to_table(columns=list(key)) for f in frags])
    if keys.num_rows == 0:
        return 0
    keys = keys.append_column("_i", pa.array(np.arange(keys.num_rows)))
    first = keys.group_by(list(key)).aggregate([("_i", "min")])["_i_min"]
    if len(first) == keys.num_rows:
        return 0
    keep = np.zeros(keys.num_rows, bool)
    keep[first.to_numpy()] = True
    dropped = start = 0
    for i, frag in enumerate(frags):
        part = frag.to_table()
        mask = keep[start:start + part.num_rows]
        start += part.num_rows
        if mask.all():
            continue
        dropped += int((~mask).sum())
        if mask.any():
            pq.write_table(part.filter(pa.array(mask)), f"{folder}/part-dedup-{i:06d}.parquet",
                           filesystem=fs, compression="zstd")
        fs.delete_file(frag.path)
    return dropped


def fold_segments(out: Output, run_id: str) -> int:
    """One files row per segmented video (segments.fold_rows): the staged segment rows,
    deduplicated first, become files rows; staging/segments goes. Returns the videos
    folded."""
    from fer_batch import segments  # PyAV: only where segments were staged
    d = f"{out.staging(run_id)}/segments"
    if not out.exists(d):
        return 0
    rows = pds.dataset(d, filesystem=out.fs, format="parquet",
                       schema=sink.SEGMENT_SCHEMA).to_table()
    folded = segments.fold_rows(rows)
    sink.write_tables(out.fs, out.staging(run_id), sink.FILE_SCHEMA.empty_table(), folded,
                      name="segments")
    out.fs.delete_dir(d)
    return folded.num_rows


def track(out: Output, run_id: str, classes, *, min_score: float = ANNOTATE_DEFAULTS.min_score,
          iou_threshold: float = ANNOTATE_DEFAULTS.track_iou_threshold,
          max_gap_s: float = ANNOTATE_DEFAULTS.track_max_gap_s,
          smooth_s: float = ANNOTATE_DEFAULTS.track_smooth_s) -> int:
    """Link the staged faces into tracks (tracks.assign_tracks, with annotate's --min-score
    and --track-* options): the staged faces are rewritten with track_id and the tracks
    table is staged. After fold_segments, so a video split into segments is tracked across
    their borders. Returns the number of tracks."""
    stage = out.staging(run_id)
    faces, tracked = f"{stage}/faces", f"{stage}/faces.tracked"
    if not out.exists(faces):
        return 0
    ds = pds.dataset(faces, filesystem=out.fs, format="parquet")
    probs = [c for c in ds.schema.names if c in classes or c == sink.OTHER_CLASSES]
    narrow = ds.to_table(columns=[*sink.FACE_KEY, "timestamp_s", "x", "y", "w", "h",
                                  "model_id", *probs])  # no crops: stays small
    ids, tracks_table = tracks.assign_tracks(narrow, classes, min_score=min_score,
                                             iou_threshold=iou_threshold,
                                             max_gap_s=max_gap_s, smooth_s=smooth_s)
    ids = ids.select([*sink.FACE_KEY, "track_id"])
    out.fs.create_dir(tracked, recursive=True)
    for path in ds.files:  # one part at a time: the crops of one part in memory
        part = pq.read_table(path, filesystem=out.fs)
        # by key, not by a join: Arrow's hash join cannot carry map and list columns
        at = pc.index_in(_key(part), value_set=_key(ids))
        part = part.add_column(part.schema.get_field_index("face_index") + 1, "track_id",
                               pc.take(ids["track_id"], at))
        pq.write_table(part, f"{tracked}/{path.rsplit('/', 1)[1]}", filesystem=out.fs,
                       compression="zstd")
    out.fs.create_dir(f"{stage}/tracks", recursive=True)
    pq.write_table(tracks_table, f"{stage}/tracks/part-tracks.parquet", filesystem=out.fs,
                   compression="zstd")
    out.fs.delete_dir(faces)
    move_dir(out.fs, tracked, faces)
    return tracks_table.num_rows


def _key(table: pa.Table) -> pa.ChunkedArray:
    """One string per face row: its FACE_KEY (source, frame_index, face_index)."""
    return pc.binary_join_element_wise(*[pc.cast(table[c], pa.string()) for c in sink.FACE_KEY],
                                       "\x00")
