"""The Parquet schemas of OUT/faces and OUT/files, and the split of the row stream into them.

The pipeline carries face rows (kind == "face") and file rows (kind == "file")
in one Ray dataset, so each file's status travels with its faces. ``split_batch``
turns one batch of that stream into a faces table and a files table;
``write_batch`` writes both as Parquet into a run's staging folder. The commit
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


def face_schema(classes) -> pa.Schema:
    """OUT/faces schema for a model with these classes (run_id is the hive partition)."""
    return pa.schema(list(FACE_COLUMNS) + [(c, pa.float32()) for c in classes] + list(FACE_TAIL))


def encode_crops(faces: np.ndarray) -> list[bytes]:
    """PNG bytes of each face's first input plane (the equalized 48x48 crop), for reports."""
    return [cv2.imencode(".png", f[0])[1].tobytes() for f in faces]


def split_batch(batch: dict, classes) -> tuple[pa.Table, pa.Table]:
    """(faces table, files table) from a batch of the row stream (column -> np.ndarray)."""
    kind = np.asarray(batch["kind"])
    f, r = kind == "face", kind == "file"
    schema = face_schema(classes)
    faces = {}
    for name, typ in zip(schema.names, schema.types):
        if name == "crop_png":
            faces[name] = encode_crops(batch["face"][f])
        elif name == "timestamp_s":
            ts = np.asarray(batch[name], np.float64)[f]
            faces[name] = pa.array(ts, typ, mask=np.isnan(ts))
        else:
            faces[name] = pa.array(np.asarray(batch[name])[f], typ)
    files = {
        "source": batch["source"][r], "media_type": batch["media_type"][r],
        "status": batch["status"][r],
        "error": [e or None for e in batch["error"][r]],
        "size_bytes": batch["size_bytes"][r], "mtime_ns": batch["mtime_ns"][r],
        "frames_decoded": batch["frame_index"][r],  # file rows carry counts in these columns
        "faces": batch["face_index"][r], "seconds": batch["timestamp_s"][r],
        "model_id": batch["model_id"][r],
    }
    files_tbl = pa.table({n: pa.array(np.asarray(files[n]) if n != "error" else files[n], t)
                          for n, t in zip(FILE_SCHEMA.names, FILE_SCHEMA.types)})
    return pa.table(faces, schema=schema), files_tbl


def file_rows_table(entries, model_id: str) -> pa.Table:
    """Files rows for entries settled at listing time (skipped extensions, listing errors)."""
    cols = {n: [] for n in FILE_SCHEMA.names}
    for e in entries:
        cols["source"].append(e["uri"])
        cols["media_type"].append(e["media_type"])
        cols["status"].append(e["status"])
        cols["error"].append(e.get("error"))
        cols["size_bytes"].append(e.get("size_bytes"))
        cols["mtime_ns"].append(e.get("mtime_ns"))
        cols["frames_decoded"].append(0)
        cols["faces"].append(0)
        cols["seconds"].append(0.0)
        cols["model_id"].append(model_id)
    return pa.table(cols, schema=FILE_SCHEMA)


def write_tables(fs, staging: str, faces: pa.Table, files: pa.Table, name: str | None = None):
    """Write one part of each table under staging/faces and staging/files (pyarrow fs)."""
    name = name or uuid.uuid4().hex
    for sub, tbl in (("faces", faces), ("files", files)):
        if tbl.num_rows:
            fs.create_dir(f"{staging}/{sub}", recursive=True)
            pq.write_table(tbl, f"{staging}/{sub}/part-{name}.parquet", filesystem=fs,
                           compression="zstd")
