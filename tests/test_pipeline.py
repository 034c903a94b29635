"""The annotate job end to end on a real local Ray: real videos, real faces, real Parquet."""

import os

import cv2
import numpy as np
import pyarrow.dataset as pds
import pytest

import fer_batch
from conftest import encode_video, face_image, photo_truth, shared, truth_found
from fer_batch import cli, sink
from fer_batch.config import AnnotateConfig

FPS = 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    face = face_image()
    small = cv2.resize(face, (240, 300), interpolation=cv2.INTER_AREA)[:180]  # head and shoulders
    moving = [np.roll(small, 2 * i, axis=1) for i in range(30)]  # 3 s at 10 fps
    (root / "photos").mkdir()
    cv2.imwrite(str(root / "photos" / "face.jpg"), face)
    encode_video(root / "face_h264.mp4", moving, fps=FPS)
    encode_video(root / "face_mpeg4.avi", moving, fps=FPS, codec="mpeg4")
    # stored sideways, like a phone clip; the display matrix turns it upright (90 deg clockwise)
    sideways = [cv2.rotate(f, cv2.ROTATE_90_COUNTERCLOCKWISE) for f in moving[:10]]
    encode_video(root / "face_rotated.mp4", sideways, fps=FPS, rotate=-90)
    encode_video(root / "blank.mp4", [np.full((120, 160), 90, np.uint8)] * 10, fps=FPS)
    mkv = encode_video(root / "tmp.mkv", moving, fps=FPS).read_bytes()
    (root / "truncated.mkv").write_bytes(mkv[: len(mkv) * 9 // 10])
    os.remove(root / "tmp.mkv")
    (root / "photos" / "corrupt.jpg").write_bytes(os.urandom(3000))
    (root / "notes.txt").write_text("not media")
    return root


NO_FACE = "noface_dlib_dogs.jpg"  # a shared photo without faces


@pytest.fixture(scope="module")
def photo_list(tmp_path_factory):
    """A list file naming the hand-labelled shared photos and one without faces."""
    path = tmp_path_factory.mktemp("list") / "list.txt"
    path.write_text("\n".join(str(shared("photos", n)) for n in [*photo_truth(), NO_FACE]))
    return path


@pytest.fixture(scope="module")
def result(ray_local, corpus, photo_list, random_checkpoint, tmp_path_factory):
    """One run with the defaults over the corpus folder and the shared photos' list."""
    out = tmp_path_factory.mktemp("out") / "fer"
    code = cli.main(["annotate", str(corpus), str(photo_list), "--model", random_checkpoint,
                     "--output", str(out)])
    assert code == 0
    return out


def corpus_rows(table, corpus):
    return table[table["source"].str.startswith(f"{corpus}/")]


def test_every_file_has_exactly_one_status_row(result, corpus, photo_list):
    every = fer_batch.read_files(str(result), as_pandas=True)
    files = corpus_rows(every, corpus)
    on_disk = sorted(str(p) for p in corpus.rglob("*") if p.is_file())
    assert sorted(files["source"]) == on_disk
    listed = photo_list.read_text().split("\n")
    assert sorted(every["source"]) == sorted(on_disk + listed)
    assert (every.set_index("source").loc[listed, "status"] == "ok").all()
    status = dict(zip(files["source"].map(os.path.basename), files["status"]))
    assert status == {"face.jpg": "ok", "face_h264.mp4": "ok", "face_mpeg4.avi": "ok",
                      "face_rotated.mp4": "ok", "blank.mp4": "ok", "truncated.mkv": "error",
                      "corrupt.jpg": "error", "notes.txt": "skipped"}
    err = files.set_index(files["source"].map(os.path.basename))["error"]
    assert "decod" in err["corrupt.jpg"]
    assert "extension" in err["notes.txt"]
    assert "truncat" in err["truncated.mkv"].lower()
    # the frames decoded before the damage still give their faces
    faces = corpus_rows(fer_batch.read_faces(str(result), as_pandas=True), corpus)
    assert faces["source"].str.endswith("truncated.mkv").any()


def test_faces_from_video_carry_frame_indexes_and_timestamps(result):
    faces = fer_batch.read_faces(str(result), as_pandas=True)
    video = faces[faces["source"].str.endswith("face_h264.mp4")]
    # --sample-fps 2 on a 10 fps clip: frames 0, 5, 10, ... at 0.0, 0.5, 1.0, ... s
    assert len(video) >= 4
    assert set(video["frame_index"]) <= {0, 5, 10, 15, 20, 25}
    assert np.allclose(video["timestamp_s"], video["frame_index"] / FPS)
    images = faces[faces["media_type"] == "image"]
    assert len(images) >= 1 and images["timestamp_s"].isna().all()
    assert not faces["source"].str.endswith("blank.mp4").any()


def test_boxes_fall_inside_the_frame_also_after_rotation(result):
    """The sideways-stored clip only yields faces if its rotation metadata was applied."""
    faces = fer_batch.read_faces(str(result), as_pandas=True)
    for name in ("face_h264.mp4", "face_mpeg4.avi", "face_rotated.mp4"):
        rows = faces[faces["source"].str.endswith(name)]
        assert len(rows) >= 1, name
        assert (rows["x"] >= 0).all() and (rows["y"] >= 0).all()
        assert (rows["x"] + rows["w"] <= 240).all() and (rows["y"] + rows["h"] <= 180).all()


def test_output_schema_labels_and_probabilities(result, random_checkpoint):
    from fer_batch.model import EMOTIONS
    faces = fer_batch.read_faces(str(result), as_pandas=True)
    for col in ("source", "media_type", "frame_index", "timestamp_s", "face_index", "x", "y",
                "w", "h", "label", "score", "model_id", "run_id", *EMOTIONS):
        assert col in faces.columns, col
    min_score = AnnotateConfig().min_score  # the run used the default
    sure = faces["score"] >= min_score
    assert faces.loc[sure, "label"].isin(EMOTIONS).all()
    assert (faces.loc[~sure, "label"] == sink.UNCERTAIN).all()
    probs = faces[list(EMOTIONS)].to_numpy()
    assert probs.dtype == np.float32 and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert np.allclose(faces["score"], probs.max(1))
    # no face appears twice
    assert not faces.duplicated(["source", "frame_index", "face_index"]).any()


def test_readable_with_pyarrow_hive_and_duckdb(result):
    import duckdb
    ds = pds.dataset(str(result / "faces"), partitioning="hive")
    tbl = ds.to_table()
    assert "run_id" in tbl.column_names and tbl.num_rows > 0
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{result}/files/*/*.parquet', "
                   "hive_partitioning=true) WHERE media_type = 'video'").fetchall()[0][0]
    assert n == 5  # the corpus's videos


def test_bad_arguments_exit_nonzero_with_a_message(tmp_path, random_checkpoint, capsys):
    assert cli.main(["annotate", str(tmp_path), "--model", str(tmp_path / "none.pt"),
                     "--output", str(tmp_path / "o")]) == 2
    assert "none.pt" in capsys.readouterr().err
    assert cli.main(["annotate", str(tmp_path / "missing"), "--model", random_checkpoint,
                     "--output", str(tmp_path / "o")]) == 2
    assert "source not found" in capsys.readouterr().err


def test_real_photos_recall_matches_full_resolution_haar(result):
    """On the hand-labelled photos, the pipeline's defaults find at least 95% of the
    ground-truth faces that full-resolution Haar detection finds."""
    from fer_batch import decode, detect
    truth = photo_truth()
    faces = fer_batch.read_faces(str(result), as_pandas=True)
    cascade = detect.load_cascade()
    full_hits = pipe_hits = 0
    for name, boxes in truth.items():
        gray = decode.decode_image(shared("photos", name).read_bytes())
        full = detect.detect_faces(gray, cascade)
        got = faces[faces["source"].str.endswith(f"/{name}")][["x", "y", "w", "h"]].to_numpy()
        full_hits += truth_found(boxes, full)
        pipe_hits += truth_found(boxes, got)
    assert full_hits > 25
    assert pipe_hits >= 0.95 * full_hits


def test_the_default_detector_is_centerface_and_the_run_records_it(result):
    """The defaults run CenterFace: it finds the faces of two group photos, none on a photo
    of dogs, and the manifest names the detector and its settings."""
    from fer_batch import runs
    truth = photo_truth()
    faces = fer_batch.read_faces(str(result), as_pandas=True)
    for name in ["dlib_voc_2008_004176.jpg", "dlib_voc_2008_002079.jpg"]:  # 7 + 6 faces
        got = faces[faces["source"].str.endswith(f"/{name}")][["x", "y", "w", "h"]].to_numpy()
        assert truth_found(truth[name], got) >= len(truth[name]) - 1, name
    assert not faces["source"].str.endswith(NO_FACE).any()
    (manifest,) = runs.Output(str(result)).committed_runs().values()
    assert manifest["config"]["detector"] == "centerface" == AnnotateConfig().detector
    assert manifest["config"]["centerface_max_side"] == AnnotateConfig().centerface_max_side


def test_small_images_are_grouped_into_tasks_videos_run_alone():
    from fer_batch.pipeline import IMAGES_PER_UNIT, UNIT_BYTES, work_units
    import json
    img = [dict(uri=f"/a/{i}.png", media_type="image", size_bytes=2_000, mtime_ns=i,
                status="pending") for i in range(IMAGES_PER_UNIT + 5)]
    big = dict(uri="/a/big.jpg", media_type="image", size_bytes=UNIT_BYTES, mtime_ns=0)
    vid = dict(uri="/a/v.mp4", media_type="video", size_bytes=10**9, mtime_ns=0)
    units = [json.loads(u["files"]) for u in work_units(img[:3] + [vid] + img[3:] + [big])]
    assert [len(u) for u in units] == [1, IMAGES_PER_UNIT, 5, 1]
    assert units[0][0]["uri"] == "/a/v.mp4" and units[-1][0]["uri"] == "/a/big.jpg"
    flat = [e["uri"] for u in units for e in u]  # every file exactly once, fields kept
    assert sorted(flat) == sorted(e["uri"] for e in img + [vid, big])
    assert set(units[1][0]) == {"uri", "media_type", "size_bytes", "mtime_ns"}


def test_what_the_croppers_unpickle_does_not_import_torch():
    """Cropper actors, split tasks and the attempt ledger load what they are sent (the
    attempt counter, the split task's function, the cropper and pool-detector classes);
    none of it may pull in torch or Ray Data, which cost each such process ~3.8 CPU s and
    ~750 MB (BENCHMARKS.md section 11)."""
    import subprocess
    import sys

    import cloudpickle

    from fer_batch import segments
    from fer_batch.attempts import AttemptCounter
    from fer_batch.detect_torch import PoolDetector
    from fer_batch.preprocess import FaceCropper
    sent = cloudpickle.dumps([AttemptCounter(None, 300.0), segments.split_units, FaceCropper,
                              PoolDetector])
    code = ("import pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
            "print(sorted(m for m in ('torch', 'ray.data') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], input=sent, capture_output=True,
                         check=True, timeout=120)
    assert out.stdout.decode().strip() == "[]", out.stderr.decode()[-2000:]


def test_what_the_write_tasks_unpickle_does_not_import_torch():
    """Ray Data's write tasks load the staging sink (a fresh worker process each run): it
    may pull in Ray Data, not torch (~4 CPU s more in each such worker)."""
    import subprocess
    import sys

    import cloudpickle

    from fer_batch.staging import StagingSink
    sent = cloudpickle.dumps(StagingSink("out", "rid", ["happiness"]))
    code = ("import pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
            "print('torch' in sys.modules, 'ray.data' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], input=sent, capture_output=True,
                         check=True, timeout=120)
    assert out.stdout.decode().split() == ["False", "True"], out.stderr.decode()[-2000:]
