"""fer_batch.sink: the row stream of real croppers and a real predictor -> the two Parquet
tables, every column defined once in sink.py."""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from conftest import drawn_face
from fer_batch import infer, preprocess, sink


def stream_batch(tmp_path, random_checkpoint) -> dict:
    ok, jpg = cv2.imencode(".jpg", drawn_face())
    path = tmp_path / "face.jpg"
    path.write_bytes(jpg.tobytes())
    entry = dict(uri=str(path), media_type="image", size_bytes=path.stat().st_size, mtime_ns=7)
    out = list(preprocess.FaceCropper().process(entry))
    batch = {k: np.concatenate([b[k] for b in out]) for k in out[0]}
    return infer.FacePredictor(checkpoint=random_checkpoint, device="cpu")(batch)


def test_split_batch_gives_one_files_row_and_a_row_per_face(tmp_path, random_checkpoint):
    batch = stream_batch(tmp_path, random_checkpoint)
    classes = infer.FacePredictor(checkpoint=random_checkpoint, device="cpu").classes
    faces, files = sink.split_batch(batch, classes)
    n = int((batch["kind"] == "face").sum())
    assert faces.schema == sink.FACE_SCHEMA and files.schema == sink.FILE_SCHEMA
    assert faces.num_rows == n >= 1 and files.num_rows == 1
    row = files.to_pylist()[0]
    assert row["status"] == "ok" and row["faces"] == n and row["mtime_ns"] == 7
    assert row["error"] is None and row["frames_decoded"] == 1
    assert faces["timestamp_s"].null_count == n  # images have no timestamp
    png = faces["crop_png"][0].as_py()
    crop = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(crop, batch["face"][0][0])  # the face the model saw, losslessly


def test_write_tables_round_trip(tmp_path, random_checkpoint):
    batch = stream_batch(tmp_path, random_checkpoint)
    classes = infer.FacePredictor(checkpoint=random_checkpoint, device="cpu").classes
    faces, files = sink.split_batch(batch, classes)
    stage = tmp_path / "stage"
    sink.write_tables(pafs.LocalFileSystem(), str(stage), faces, files, name="part")
    back = pq.read_table(next((stage / "faces").rglob("*.parquet")))
    assert back.num_rows == faces.num_rows
    assert back.column("label").to_pylist() == faces.column("label").to_pylist()
    assert pq.read_table(next((stage / "files").rglob("*.parquet"))).num_rows == 1


def test_names_that_are_not_utf8_are_escaped_text():
    bad = b"caf\xe9.jpg".decode("utf-8", "surrogateescape")
    assert sink.safe_text(bad) == "caf\\xe9.jpg"
    assert sink.safe_text("café.jpg") == "café.jpg"
