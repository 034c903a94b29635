"""The Parquet schemas of OUT/faces, OUT/files and OUT/tracks, and the split of the row
stream into them.

The pipeline carries face rows (kind == "face") and file rows (kind == "file")
in one Ray dataset, so each file's status travels with its faces. ``split_batch``
turns one batch of that stream into a faces table and a files table;
``write_tables`` writes them as Parquet into a run's staging folder. The commit
protocol that makes them visible lives in ``runs``.

One layout for every model: class probabilities go into one float32 column per expression
of the vocabulary (config.EXPRESSIONS), null where the model lacks the class, and a map
``other_classes`` for the classes of a model outside the vocabulary. So every run of every
model writes the same schema, and a plain glob over OUT/faces reads them all
(docs/output.md). ``probability`` reads one class wherever it is; ``conform`` turns a table
of an older layout (one column per class of its model) into this one.
"""

from __future__ import annotations

import uuid

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fer_batch.config import EXPRESSIONS

FACE_COLUMNS = (  # fixed columns of OUT/faces, before the class probabilities
    ("source", pa.string()), ("media_type", pa.string()), ("frame_index", pa.int64()),
    ("timestamp_s", pa.float64()), ("face_index", pa.int32()),
    ("x", pa.int32()), ("y", pa.int32()), ("w", pa.int32()), ("h", pa.int32()),
    ("label", pa.string()), ("score", pa.float32()),
)
FACE_TAIL = (("model_id", pa.string()), ("crop_png", pa.binary()))  # after the classes
OTHER_CLASSES = "other_classes"  # class -> probability, for classes outside EXPRESSIONS
CLASS_COLUMNS = tuple((c, pa.float32()) for c in EXPRESSIONS) + (
    (OTHER_CLASSES, pa.map_(pa.string(), pa.float32())),)
FACE_SCHEMA = pa.schema(list(FACE_COLUMNS + CLASS_COLUMNS + FACE_TAIL))  # run_id: partition
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
TRACK_COLUMNS = (  # fixed columns of OUT/tracks, before each class's mean probability
    ("source", pa.string()), ("track_id", pa.int32()), ("start_s", pa.float64()),
    ("end_s", pa.float64()), ("first_frame_index", pa.int64()), ("last_frame_index", pa.int64()),
    ("faces", pa.int32()), ("dominant_label", pa.string()),
)
TRACK_TAIL = (("segments", SEGMENT_TYPE), ("model_id", pa.string()))  # after the classes
TRACK_SCHEMA = pa.schema(list(TRACK_COLUMNS + CLASS_COLUMNS + TRACK_TAIL))
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


class ClassNameError(ValueError):
    """A checkpoint's class names cannot become output columns."""


def reserved_names() -> frozenset:
    """Every name a class must not take: the columns of OUT/faces, OUT/files and OUT/tracks
    but the expressions' own (and their partition run_id), the stream's own columns, and the
    label 'uncertain'."""
    names = [n for n, _ in FACE_COLUMNS + FACE_TAIL + TRACK_COLUMNS + TRACK_TAIL]
    names.append(OTHER_CLASSES)
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
        raise ClassNameError(f"{name}: duplicate class names {dupes} (each is a column or a "
                             "key); rename those classes and retrain")
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


def class_arrays(probs: dict, n: int) -> dict:
    """The probabilities of n rows in the output's layout: probs (a model's class -> (n,)
    floats) -> one float32 array per expression (null where the model lacks the class) and
    other_classes (a map of the model's classes outside EXPRESSIONS; null when none)."""
    out = {c: pa.array(np.asarray(probs[c], np.float32), pa.float32()) if c in probs
           else pa.nulls(n, pa.float32()) for c in EXPRESSIONS}
    others = [c for c in probs if c not in EXPRESSIONS]
    if others:
        values = np.stack([np.asarray(probs[c], np.float32) for c in others], axis=1)
        out[OTHER_CLASSES] = pa.array([list(zip(others, map(float, row))) for row in values],
                                      CLASS_COLUMNS[-1][1])
    else:
        out[OTHER_CLASSES] = pa.nulls(n, CLASS_COLUMNS[-1][1])
    return out


def probability(table: pa.Table, name: str) -> pa.ChunkedArray:
    """The probabilities of class `name` in a faces or tracks table: its own column (an
    expression, or a class of an output written before this layout), else its entry in
    other_classes; null where a row's model lacks it."""
    if name in table.column_names:
        return pc.cast(table[name], pa.float32())
    if OTHER_CLASSES in table.column_names:
        return pc.cast(pc.map_lookup(table[OTHER_CLASSES], pa.scalar(name, pa.string()),
                                     "first"), pa.float32())
    return pa.chunked_array([pa.nulls(table.num_rows, pa.float32())])


def conform(table: pa.Table) -> pa.Table:
    """A faces or tracks table of any layout in this one. The columns of an older output's
    model classes (one column per class) become the expression columns and entries of
    other_classes (merged with the map rows of this layout may hold); the other columns keep
    their order and the classes sit where the first class column was. A table already in
    this layout comes back as it is."""
    layout = [n for n, _ in CLASS_COLUMNS]
    fixed = {n for n, _ in FACE_COLUMNS + FACE_TAIL + TRACK_COLUMNS + TRACK_TAIL}
    old = [c for c in table.column_names if c not in fixed | set(layout) | {"track_id", "run_id"}]
    if not old and all(c in table.column_names for c in layout):
        return table
    n = table.num_rows
    arrays = {c: pc.cast(table[c], pa.float32()) if c in table.column_names
              else pa.chunked_array([pa.nulls(n, pa.float32())]) for c in EXPRESSIONS}
    maps = table[OTHER_CLASSES].to_pylist() if OTHER_CLASSES in table.column_names \
        else [None] * n
    values = {c: table[c].to_pylist() for c in old}
    for i in range(n):
        entries = [*(maps[i] or []), *((c, values[c][i]) for c in old if values[c][i] is not None)]
        maps[i] = entries or None
    arrays[OTHER_CLASSES] = pa.array(maps, CLASS_COLUMNS[-1][1])
    classes = set(layout) | set(old)
    first = next(i for i, c in enumerate(table.column_names) if c in classes)
    rest = [c for c in table.column_names if c not in classes]
    at = len([c for c in table.column_names[:first] if c not in classes])
    order = rest[:at] + layout + rest[at:]
    columns = {**{c: table[c] for c in rest}, **arrays}
    return pa.table([columns[c] for c in order], names=order)


def encode_crops(faces: np.ndarray) -> list[bytes]:
    """PNG bytes of each face's first input plane (the equalized 48x48 crop), for reports."""
    return [cv2.imencode(".png", f[0])[1].tobytes() for f in faces]


def stream_file_columns(n: int) -> dict:
    """The stream's file columns of n face rows: empty (STREAM_FILE_COLUMNS)."""
    return {name: np.full(n, "", object) if dtype is object else np.zeros(n, dtype)
            for name, dtype in STREAM_FILE_COLUMNS}


def split_batch(batch: dict, classes) -> tuple[pa.Table, pa.Table]:
    """(faces table, files table) from a batch of the row stream (column -> np.ndarray);
    classes: the model's, whose probability columns the predictor added to the batch."""
    kind = np.asarray(batch["kind"])
    f = kind == "face"
    columns = {name: np.asarray(batch[name])[f] for name in (
        *[n for n, _ in FACE_COLUMNS], *classes, "model_id")}
    columns["crop_png"] = encode_crops(batch["face"][f])
    ts = columns["timestamp_s"].astype(np.float64)
    columns["timestamp_s"] = pa.array(ts, pa.float64(), mask=np.isnan(ts))
    columns["source"] = safe_texts(columns["source"])
    return face_table(columns, classes), files_table(batch, kind == "file")


def face_table(columns: dict, classes) -> pa.Table:
    """OUT/faces rows (FACE_SCHEMA) from columns: FACE_COLUMNS and FACE_TAIL by name, and
    each of the model's classes' probabilities by class name (class_arrays lays them out)."""
    n = len(columns["source"])
    arrays = class_arrays({c: columns[c] for c in classes}, n)
    def array(value, typ):
        return value.cast(typ) if isinstance(value, pa.Array) else pa.array(value, typ)
    return pa.table([arrays[name] if name in arrays else array(columns[name], typ)
                     for name, typ in zip(FACE_SCHEMA.names, FACE_SCHEMA.types)],
                    schema=FACE_SCHEMA)


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
