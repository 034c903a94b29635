"""The Parquet schemas of OUT/faces, OUT/files and OUT/tracks, and the split of the row
stream into them.

The pipeline carries face rows (kind == "face") and file rows (kind == "file")
in one Ray dataset, so each file's status travels with its faces. ``split_batch``
turns one batch of that stream into a faces table and a files table;
``write_tables`` writes them as Parquet into a run's staging folder. The commit
protocol that makes them visible lives in ``runs``.
"""

from __future__ import annotations

import uuid

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FACE_COLUMNS = (  # fixed columns of OUT/faces, before one float32 column per class
    ("source", pa.string()), ("media_type", pa.string()), ("frame_index", pa.int64()),
    ("timestamp_s", pa.float64()), ("face_index", pa.int32()),
    ("x", pa.int32()), ("y", pa.int32()), ("w", pa.int32()), ("h", pa.int32()),
    ("label", pa.string()), ("score", pa.float32()),
)
FACE_TAIL = (("model_id", pa.string()), ("crop_png", pa.binary()))  # after the class columns
FILE_SCHEMA = pa.schema([
    ("source", pa.string()), ("media_type", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("size_bytes", pa.int64()), ("mtime_ns", pa.int64()),
    ("frames_decoded", pa.int64()), ("faces", pa.int32()), ("seconds", pa.float64()),
    ("model_id", pa.string()),
])
FACE_KEY = ("source", "frame_index", "face_index")  # unique per run
FILE_KEY = ("source",)  # unique per run
# staged only: the partial files rows of a long video's segments (segments.py), folded into
# one files row per video before the commit (finish.fold_segments)
SEGMENT_SCHEMA = pa.schema(list(FILE_SCHEMA) + [("segment", pa.int32()),
                                                ("segments", pa.int32())])
SEGMENT_KEY = ("source", "segment")  # unique per run
SEGMENT_TYPE = pa.list_(pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()),
                                   ("label", pa.string())]))
TRACK_COLUMNS = (  # fixed columns of OUT/tracks, before one float32 mean per class
    ("source", pa.string()), ("track_id", pa.int32()), ("start_s", pa.float64()),
    ("end_s", pa.float64()), ("first_frame_index", pa.int64()), ("last_frame_index", pa.int64()),
    ("faces", pa.int32()), ("dominant_label", pa.string()),
)
TRACK_TAIL = (("segments", SEGMENT_TYPE), ("model_id", pa.string()))  # after the class columns
STREAM_COLUMNS = ("kind", "face")  # columns of the Ray row stream that are not in a table
# The row stream carries face rows (kind "face") and file rows (kind "file", or "segment"
# for a part of a long video) in one schema: the face columns (frame_index ... h), which
# file rows leave empty, and these file columns, which face rows leave empty.
STREAM_FACE_COLUMNS = (
    ("frame_index", np.int64), ("timestamp_s", np.float64), ("face_index", np.int32),
    ("x", np.int32), ("y", np.int32), ("w", np.int32), ("h", np.int32),
)
STREAM_FILE_COLUMNS = (
    ("status", object), ("error", object), ("size_bytes", np.int64), ("mtime_ns", np.int64),
    ("frames_decoded", np.int64), ("faces", np.int32), ("seconds", np.float64),
    ("segment", np.int32), ("segments", np.int32),
)
UNCERTAIN = "uncertain"  # the label below --min-score (infer and tracks use this one)


def tracks_schema(classes) -> pa.Schema:
    """OUT/tracks schema for a model with these classes (run_id is the hive partition)."""
    clash = set(classes) & {n for n, _ in TRACK_COLUMNS + TRACK_TAIL}
    if clash:
        raise ValueError(f"class names {sorted(clash)} clash with tracks column names")
    return pa.schema(list(TRACK_COLUMNS) + [(c, pa.float32()) for c in classes]
                     + list(TRACK_TAIL))


class ClassNameError(ValueError):
    """A checkpoint's class names cannot become output columns."""


def reserved_names() -> frozenset:
    """Every name a class must not take: the columns of OUT/faces, OUT/files and OUT/tracks
    (and their partition run_id), the stream's own columns, and the label 'uncertain'."""
    names = [n for n, _ in FACE_COLUMNS + FACE_TAIL + TRACK_COLUMNS + TRACK_TAIL]
    names += [*SEGMENT_SCHEMA.names, *STREAM_COLUMNS, "track_id", "run_id", UNCERTAIN]
    return frozenset(names)


def check_class_names(classes, name: str = "checkpoint") -> None:
    """Raise ClassNameError (one line naming the classes and the fix) unless every class is a
    distinct, non-empty string that is no output column name (compared case-insensitively:
    DuckDB and Spark ignore case). Called before any work: a clash found at commit would
    waste the run."""
    classes = list(classes) if isinstance(classes, (list, tuple)) else classes
    if not isinstance(classes, list) or not classes:
        raise ClassNameError(f"{name}: classes must be a non-empty list of names, not "
                             f"{classes!r}; write checkpoints with `fer-batch train`")
    bad = [c for c in classes if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ClassNameError(f"{name}: class names must be non-empty text, found {bad!r}; "
                             "rename those classes and retrain")
    folded = [c.casefold() for c in classes]
    dupes = sorted({c for c, f in zip(classes, folded) if folded.count(f) > 1})
    if dupes:
        raise ClassNameError(f"{name}: duplicate class names {dupes} (each becomes a column); "
                             "rename those classes and retrain")
    reserved = {r.casefold() for r in reserved_names()}
    clash = [c for c in classes if c.casefold() in reserved]
    if clash:
        raise ClassNameError(f"{name}: class names {clash} clash with output column names or "
                             f"the label '{UNCERTAIN}'; rename those classes (e.g. the class "
                             "folders of the training data) and retrain")


def safe_text(text):
    """text that Arrow can store. A Linux file name that is not valid UTF-8 reaches Python
    with its bad bytes as surrogates (PEP 383); each bad byte becomes a backslash escape:
    the bytes ``caf`` 0xE9 ``.jpg`` give the text ``caf\\xe9.jpg`` (docs/output.md). Valid
    text, None and non-strings are returned unchanged."""
    if not isinstance(text, str):
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def safe_texts(values) -> list:
    """safe_text of each value (a column of names or messages)."""
    return [safe_text(v) for v in values]


def face_schema(classes) -> pa.Schema:
    """OUT/faces schema for a model with these classes (run_id is the hive partition)."""
    return pa.schema(list(FACE_COLUMNS) + [(c, pa.float32()) for c in classes] + list(FACE_TAIL))


def encode_crops(faces: np.ndarray) -> list[bytes]:
    """PNG bytes of each face's first input plane (the equalized 48x48 crop), for reports."""
    return [cv2.imencode(".png", f[0])[1].tobytes() for f in faces]


def stream_file_columns(n: int) -> dict:
    """The stream's file columns of n face rows: empty (STREAM_FILE_COLUMNS)."""
    return {name: np.full(n, "", object) if dtype is object else np.zeros(n, dtype)
            for name, dtype in STREAM_FILE_COLUMNS}


def split_batch(batch: dict, classes) -> tuple[pa.Table, pa.Table]:
    """(faces table, files table) from a batch of the row stream (column -> np.ndarray)."""
    kind = np.asarray(batch["kind"])
    f = kind == "face"
    schema = face_schema(classes)
    faces = {}
    for name, typ in zip(schema.names, schema.types):
        if name == "crop_png":
            faces[name] = encode_crops(batch["face"][f])
        elif name == "timestamp_s":
            ts = np.asarray(batch[name], np.float64)[f]
            faces[name] = pa.array(ts, typ, mask=np.isnan(ts))
        elif name == "source":
            faces[name] = pa.array(safe_texts(np.asarray(batch[name])[f]), typ)
        else:
            faces[name] = pa.array(np.asarray(batch[name])[f], typ)
    return pa.table(faces, schema=schema), files_table(batch, kind == "file")


def segment_table(batch: dict) -> pa.Table:
    """The segment rows (kind == 'segment') of a batch of the row stream, SEGMENT_SCHEMA."""
    r = np.asarray(batch["kind"]) == "segment"
    tbl = files_table(batch, r)
    return tbl.append_column("segment", pa.array(np.asarray(batch["segment"])[r], pa.int32())) \
        .append_column("segments", pa.array(np.asarray(batch["segments"])[r], pa.int32()))


def files_table(batch: dict, r: np.ndarray) -> pa.Table:
    """FILE_SCHEMA table of the rows r (bool mask) of a batch of the row stream."""
    files = {
        "source": safe_texts(batch["source"][r]), "media_type": batch["media_type"][r],
        "status": batch["status"][r],
        "error": [safe_text(e) or None for e in batch["error"][r]],
        "size_bytes": batch["size_bytes"][r], "mtime_ns": batch["mtime_ns"][r],
        "frames_decoded": batch["frames_decoded"][r], "faces": batch["faces"][r],
        "seconds": batch["seconds"][r],
        "model_id": batch["model_id"][r],
    }
    return pa.table({n: pa.array(np.asarray(files[n]) if n not in ("error", "source")
                                 else files[n], t)
                     for n, t in zip(FILE_SCHEMA.names, FILE_SCHEMA.types)})


def file_rows_table(entries, model_id: str) -> pa.Table:
    """Files rows for entries settled at listing time (skipped extensions, listing errors)."""
    cols = {n: [] for n in FILE_SCHEMA.names}
    for e in entries:
        cols["source"].append(safe_text(e["uri"]))
        cols["media_type"].append(e["media_type"])
        cols["status"].append(e["status"])
        cols["error"].append(safe_text(e.get("error")))
        cols["size_bytes"].append(e.get("size_bytes"))
        cols["mtime_ns"].append(e.get("mtime_ns"))
        cols["frames_decoded"].append(0)
        cols["faces"].append(0)
        cols["seconds"].append(0.0)
        cols["model_id"].append(model_id)
    return pa.table(cols, schema=FILE_SCHEMA)


def write_tables(fs, staging: str, faces: pa.Table, files: pa.Table, name: str | None = None,
                 segments: pa.Table | None = None):
    """Write one part of each table under staging/faces, staging/files (and
    staging/segments) (pyarrow fs)."""
    name = name or uuid.uuid4().hex
    for sub, tbl in (("faces", faces), ("files", files), ("segments", segments)):
        if tbl is not None and tbl.num_rows:
            fs.create_dir(f"{staging}/{sub}", recursive=True)
            pq.write_table(tbl, f"{staging}/{sub}/part-{name}.parquet", filesystem=fs,
                           compression="zstd")


def top_labels(probs: np.ndarray, classes, min_score: float = 0.0):
    """(labels, scores): the most probable class per row, or UNCERTAIN when its probability
    is below min_score. probs: shape = (n, k) -> labels (n,) object, scores (n,) float32."""
    probs = np.asarray(probs)
    if len(probs) == 0:
        return np.zeros(0, object), np.zeros(0, np.float32)
    top = probs.argmax(axis=1)
    scores = probs[np.arange(len(probs)), top].astype(np.float32)
    labels = np.asarray(list(classes), dtype=object)[top]
    return np.where(scores < min_score, UNCERTAIN, labels).astype(object), scores
