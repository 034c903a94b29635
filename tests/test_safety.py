"""Issue 13, the data-safety items: fer-batch never deletes what it did not write, a bad
checkpoint, file name or option stops nothing but itself (or is refused before any work),
and a commit that cannot complete is set aside instead of being retried every night."""

import dataclasses
import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

import corpus
import fer_batch
from conftest import delegating_fs
from fer_batch import cli, finish, readers, runs, sink, sources, storage
from fer_batch.config import EXPRESSIONS, AnnotateConfig, ConfigError, TrainConfig

RID_DEAD, RID_ORPHAN, RID_STUCK = ("20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb",
                                   "20260103T000000Z-cccccc")
USER_FILES = {  # what a user's folder may hold where fer-batch keeps its tables
    "faces/family/mom.jpg": b"\xff\xd8 mom",
    "files/2024_taxes/return.pdf": b"%PDF taxes",
    "tracks/notes/list.txt": b"groceries",
    "_staging/notes/todo.txt": b"todo",
    "_staging/plain.txt": b"a plain file in _staging",
    "_runs/notes.json": b"not json at all",
    "report.docx": b"PK",
}


def put_user_files(root: Path) -> None:
    for rel, data in USER_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def assert_user_files_intact(root: Path) -> None:
    for rel, data in USER_FILES.items():
        assert (root / rel).read_bytes() == data, f"{rel} was changed or deleted"


def stage_run(out: runs.Output, rid: str, classes, source: str = "v.mp4") -> dict:
    """A staged run as the sink writes it: one video face and one files row (real Parquet)."""
    row = {n: [0] for n, _ in sink.FACE_COLUMNS + sink.FACE_TAIL}
    row.update({c: [0.0] for c in classes})
    row.update(source=[source], media_type=["video"], timestamp_s=[0.5], label=[classes[0]],
               score=[1.0], model_id=["m"], crop_png=[b""], x=[1], y=[2], w=[30], h=[30])
    faces = sink.face_table(row, classes)
    files = sink.file_rows_table([dict(uri=source, media_type="video", status="ok",
                                       size_bytes=10, mtime_ns=5)], "m")
    sink.write_tables(out.fs, out.staging(rid), faces, files, name="0")
    finish.track(out, rid, classes)  # as pipeline.run: tracked before the commit
    return dict(run_id=rid, classes=list(classes), config={})


# --- 1. never delete what fer-batch did not write ------------------------------------

def test_recovery_touches_only_what_fer_batch_wrote(tmp_path):
    root = tmp_path / "out"
    out = runs.Output(str(root))
    put_user_files(root)  # folders of the user's own, where fer-batch keeps its tables
    (root / "_staging" / RID_DEAD).mkdir(parents=True)  # a run that died before READY
    (root / "_staging" / RID_DEAD / "config.json").write_text("{}")
    orphan = root / "faces" / f"run_id={RID_ORPHAN}"  # a partition without a manifest
    orphan.mkdir(parents=True)
    (orphan / "part-0.parquet").write_bytes(b"half")

    done = out.recover()

    assert_user_files_intact(root)
    assert not (root / "_staging" / RID_DEAD).exists() and not orphan.exists()
    assert f"discarded staging of unfinished run {RID_DEAD}" in done
    assert f"removed uncommitted faces/run_id={RID_ORPHAN}" in done
    assert "left alone _staging/plain.txt: not written by fer-batch" in done
    assert out.committed_runs() == {}  # _runs/notes.json is not a run


def test_annotate_refuses_a_non_empty_folder_that_is_not_a_fer_batch_output(
        tmp_path, random_checkpoint, capsys):
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "a.jpg"), corpus.face_image())
    root = tmp_path / "documents"
    put_user_files(root)
    code = cli.main(["annotate", str(src), "--model", random_checkpoint, "--output", str(root)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(root) in err and "new or empty folder" in err
    assert_user_files_intact(root)
    assert not (root / "_lock").exists() and not (root / runs.MARKER).exists()


def test_compact_refuses_a_folder_it_did_not_write(tmp_path):
    root = tmp_path / "documents"
    put_user_files(root)
    with pytest.raises(ValueError, match=str(root)) as refused:
        readers.compact(str(root))
    assert isinstance(refused.value, runs.ForeignOutputError)
    assert_user_files_intact(root)
    assert not (root / "_lock").exists() and not (root / runs.MARKER).exists()
    new = tmp_path / "new"
    with pytest.raises(FileNotFoundError, match="no such folder"):
        readers.compact(str(new))
    assert not new.exists()  # a missing folder is an error, and nothing is created


@pytest.mark.parametrize("command", ["report", "compact"])
def test_report_and_compact_refuse_a_missing_or_foreign_folder_in_one_line(
        tmp_path, capsys, command):
    """`fer-batch report /path/typo` and `report photos/` wrote report/ folders there and
    exited 0: now exit 2, one line naming the folder, nothing created."""
    from fer_batch import cli
    photos = tmp_path / "photos"
    put_user_files(photos)
    for folder in (tmp_path / "typo", photos):
        assert cli.main([command, str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(folder) in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "typo").exists() and not (photos / "report").exists()
    assert_user_files_intact(photos)


def test_outputs_of_older_versions_without_the_marker_keep_working(tmp_path):
    root = tmp_path / "old"
    out = runs.Output(str(root))
    out.commit(RID_DEAD, stage_run(out, RID_DEAD, corpus_classes()))  # no marker written
    assert not (root / runs.MARKER).exists()
    out.acquire(RID_ORPHAN)  # accepted: _runs/RID.json is fer-batch's layout
    try:
        assert out.recover() == []
    finally:
        out.release()
    assert json.loads((root / runs.MARKER).read_text())["format"] == runs.MARKER_FORMAT
    assert fer_batch.read_files(str(root), as_pandas=True)["source"].tolist() == ["v.mp4"]


def corpus_classes():
    from fer_batch.model import EMOTIONS
    return list(EMOTIONS)


def test_output_folder_inside_a_source_is_left_out_of_the_listing(tmp_path):
    src = tmp_path / "photos"
    (src / "trip").mkdir(parents=True)
    (src / "trip" / "a.jpg").write_bytes(b"x")
    out = src / "annotations"
    for rel in ("report/contact_sheet.png", "faces/run_id=x/part-0.parquet", "_lock"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"ours")
    (src / "link.png").symlink_to(out / "report" / "contact_sheet.png")
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{src / 'trip' / 'a.jpg'}\n{out / 'report' / 'contact_sheet.png'}\n")
    want = [str(src / "trip" / "a.jpg")]
    for given in (str(out), str(out) + "/", os.path.relpath(out)):
        got = sources.list_files([str(src)], exclude=[given])
        assert [e["uri"] for e in got] == want
    assert [e["uri"] for e in sources.list_files([str(manifest)], exclude=[str(out)])] == want
    assert len(sources.list_files([str(src)])) == 5  # without exclude: everything


# --- 2. a checkpoint whose class names clash with a column -----------------------------

def all_column_names() -> set:
    """Every output column but the expressions' (a model's classes may be those)."""
    return ({*sink.FACE_SCHEMA.names, *sink.FILE_SCHEMA.names, *sink.TRACK_SCHEMA.names,
             "track_id", "run_id"} - set(EXPRESSIONS))


def test_every_column_name_and_uncertain_is_refused_as_a_class_name():
    names = sorted(all_column_names() | {"uncertain"})
    assert {"faces", "segments", "start_s", "end_s", "dominant_label", "first_frame_index",
            "last_frame_index", "crop_png", "frames_decoded"} <= set(names)
    for name in names:
        classes = [*corpus_classes()[:6], name]
        with pytest.raises(sink.ClassNameError, match=rf"m\.pt: class names \['{name}'\]"):
            sink.check_class_names(classes, "m.pt")
    with pytest.raises(sink.ClassNameError, match="duplicate"):
        sink.check_class_names(["anger", "Anger"], "m.pt")
    with pytest.raises(sink.ClassNameError, match="non-empty list"):
        sink.check_class_names("anger", "m.pt")  # a string: each letter would be a class
    sink.check_class_names(corpus_classes(), "m.pt")  # the real classes pass


@pytest.fixture(scope="module")
def clashing_checkpoints(tmp_path_factory):
    """name -> model.pt whose last class is named like an output column (real weights)."""
    import torch
    from fer_batch import model as M
    torch.manual_seed(0)
    net, folder = M.build_model(), tmp_path_factory.mktemp("clash")
    paths = {}
    for name in ("faces", "segments", "uncertain"):
        paths[name] = str(folder / f"{name}.pt")
        M.save_checkpoint(paths[name], net, classes=[*M.EMOTIONS[:6], name],
                          model_args=dict(num_classes=7, in_channels=1, stem="imagenet"),
                          channels=["equalized"])
    return paths


@pytest.mark.parametrize("name", ["faces", "segments", "uncertain"])
def test_annotate_refuses_a_checkpoint_whose_class_clashes_before_any_work(
        name, clashing_checkpoints, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "a.jpg"), corpus.face_image())
    out = tmp_path / "out"
    code = cli.main(["annotate", str(src), "--model", clashing_checkpoints[name],
                     "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and f"'{name}'" in err and "retrain" in err
    assert not out.exists()  # refused before anything was written


def disk_full_for(*run_ids):
    """The local disk, on which writing a file of these runs into faces/ fails with ENOSPC:
    a disk that fills up while a commit copies its rows (the copy path, as on S3)."""
    import errno

    import pyarrow.fs as pafs
    disk = pafs.LocalFileSystem()

    def copy_file(src, dest):
        if any(f"/faces/run_id={r}/" in dest for r in run_ids):
            raise OSError(errno.ENOSPC, "No space left on device", dest)
        disk.copy_file(src, dest)
    return delegating_fs(disk, copy_file=copy_file)


def test_a_commit_that_cannot_complete_is_set_aside_not_retried_forever(tmp_path):
    root = tmp_path / "out"
    own = "20260105T000000Z-eeeeee"  # a run's own commit that fails: set aside, then raised
    out = runs.Output(str(root))
    out.fs = disk_full_for(RID_STUCK, own)
    classes = corpus_classes()
    out.write_json(f"{out.staging(RID_STUCK)}/READY.json",
                   stage_run(out, RID_STUCK, classes, "stuck.mp4"))

    done = out.recover()

    assert len(done) == 1 and done[0].startswith(f"set aside run {RID_STUCK}: its commit "
                                                 "failed (OSError: [Errno 28] No space left")
    failed = root / "_failed" / RID_STUCK
    info = json.loads((failed / "FAILED.json").read_text())
    assert info["run_id"] == RID_STUCK and "No space left on device" in info["error"]
    assert (failed / "staging" / "READY.json").exists()  # its rows are kept
    assert list((failed / "staging" / "faces").glob("*.parquet"))
    assert not (root / "_staging" / RID_STUCK).exists()
    assert not (root / "faces" / f"run_id={RID_STUCK}").exists()  # a half copy went too
    assert out.recover() == []  # the next night is not held up by it
    assert out.committed_runs() == {} and fer_batch.read_faces(str(root)) is None
    with pytest.raises(runs.CommitError, match=rf"set aside run {own}: .*_failed/{own}"):
        out.commit_or_set_aside(own, stage_run(out, own, classes, "own.mp4"))
    assert (root / "_failed" / own / "FAILED.json").exists()
    assert not (root / "_staging" / own).exists() and out.recover() == []
    good = "20260104T000000Z-dddddd"  # and a good run still commits
    out.commit_or_set_aside(good, stage_run(out, good, classes, "good.mp4"))
    assert fer_batch.read_files(str(root), as_pandas=True)["source"].tolist() == ["good.mp4"]


# --- 3. file names that are not valid UTF-8 ---------------------------------------------

def test_names_that_are_not_utf8_are_read_and_stored_escaped(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9.jpg"
    with open(raw, "wb") as f:
        f.write(b"bytes of the photo")
    (entry,) = sources.list_files([str(tmp_path)])
    assert entry["status"] == "pending" and not storage.utf8_name(entry["uri"])
    assert storage.read_bytes(entry["uri"]) == b"bytes of the photo"
    with storage.open_input(entry["uri"]) as f:
        assert f.read() == b"bytes of the photo"
    assert sink.safe_text(entry["uri"]) == f"{tmp_path}/caf\\xe9.jpg"
    tbl = sink.file_rows_table([dict(entry, status="error", error=f"bad {entry['uri']}")], "m")
    assert tbl["source"].to_pylist() == [f"{tmp_path}/caf\\xe9.jpg"]
    assert tbl["error"].to_pylist() == [f"bad {tmp_path}/caf\\xe9.jpg"]
    assert sink.safe_text("Émotions été.jpg") == "Émotions été.jpg"  # valid names unchanged


def test_run_with_undecodable_names_and_its_output_inside_the_source(
        ray_local, random_checkpoint, tmp_path):
    """Two nightly --incremental runs of a folder holding names that are not UTF-8 and the
    run's own output: both commit, the names are stored escaped, the photo with a bad name
    is processed, and the second night finds nothing new (the output is not listed)."""
    src = tmp_path / "archive"
    src.mkdir()
    ok, photo = cv2.imencode(".jpg", corpus.face_image(400, 300))
    assert ok
    raw = os.fsencode(str(src))
    for name, data in ((b"good.jpg", photo.tobytes()), (b"caf\xe9.jpg", photo.tobytes()),
                       (b"notes\xff.txt", b"not media")):
        with open(raw + b"/" + name, "wb") as f:
            f.write(data)
    out = src / "annotations"
    args = ["annotate", str(src), "--model", random_checkpoint, "--output", str(out),
            "--incremental"]
    assert cli.main(args) == 0
    files = fer_batch.read_files(str(out), as_pandas=True).set_index("source")
    bad_jpg, bad_txt = f"{src}/caf\\xe9.jpg", f"{src}/notes\\xff.txt"
    assert sorted(files.index) == sorted([bad_jpg, bad_txt, f"{src}/good.jpg"])
    assert files.loc[bad_jpg, "status"] == "ok" and files.loc[bad_txt, "status"] == "skipped"
    assert files.loc[bad_jpg, "faces"] == files.loc[f"{src}/good.jpg", "faces"]
    if corpus.has_faces():
        assert files.loc[bad_jpg, "faces"] >= 1
        faces = fer_batch.read_faces(str(out), as_pandas=True)
        assert bad_jpg in set(faces["source"])
    assert cli.main(args) == 0  # the output now holds Parquet, manifests, a lock, a marker
    second = list(runs.Output(str(out)).committed_runs().values())[-1]
    assert second["files_listed"] == 3 and second["files_already_done"] == 3
    assert second["files_ok"] + second["files_error"] + second["files_skipped"] == 0


# --- 4. option values are checked before Ray starts ------------------------------------

BAD_OPTIONS = [
    ("--limit", "-2", "0 or more"), ("--max-file-retries", "-1", "0 or more"),
    ("--scale-factor", "1", "greater than 1"), ("--detect-max-side", "-10", "0 or more"),
    ("--sample-fps", "0", "greater than 0"), ("--sample-fps", "nan", "finite"),
    ("--sample-fps", "inf", "finite"), ("--batch-size", "0", "1 or more"),
    ("--images-per-task", "0", "1 or more"), ("--min-score", "1.5", "0 to 1"),
    ("--min-score", "-0.1", "0 to 1"), ("--track-iou-threshold", "2", "0 to 1"),
    ("--track-max-gap-s", "-1", "0 or more"), ("--track-smooth-s", "-0.5", "0 or more"),
    ("--every-n-frames", "-1", "0 or more"), ("--max-pixels", "0", "1 or more"),
]


@pytest.mark.parametrize("flag,value,allowed", BAD_OPTIONS)
def test_out_of_range_options_are_refused_before_any_work(flag, value, allowed,
                                                          random_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["annotate", str(tmp_path), "--model", random_checkpoint,
                     "--output", str(out), flag, value])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"fer-batch annotate: error: {flag} ")
    assert allowed in err
    assert not out.exists()


def test_every_numeric_option_has_bounds_and_the_defaults_pass():
    numeric = [f for f in dataclasses.fields(AnnotateConfig)
               if f.type in ("int", "float", int, float)]
    assert len(numeric) >= 15
    for f in numeric:
        assert {"min", "gt", "max"} & set(f.metadata), f"--{f.name} has no bounds"
    AnnotateConfig().check()
    with pytest.raises(ConfigError, match=r"--sample-fps nan must be a finite"):
        AnnotateConfig(sample_fps=math.nan).check()
    with pytest.raises(ConfigError, match=r"--detector 'hog': choose from centerface, haar"):
        AnnotateConfig(detector="hog").check()  # a choice the CLI's parser would refuse


def test_training_options_are_checked_by_the_config_as_the_cli_checks_them():
    """TrainConfig.check: the bounds in its field metadata and the rules between options,
    for a library caller of train.check_training as for the CLI."""
    ok = TrainConfig(data=("x",))
    ok.check()
    refused = {"--epochs 0 is out of range; allowed: 1 or more": dict(epochs=0),
               "--lr 0 is out of range; allowed: greater than 0": dict(lr=0),
               "--crop-margin 1.5 is out of range; allowed: 0 to 1": dict(crop_margin=1.5),
               "--calibration-fraction 0.6 is out of range": dict(calibration_fraction=0.6),
               "--split 'by-age': choose from random, subject": dict(split="by-age"),
               "--folds must be 0 (one split) or at least 2": dict(folds=1),
               "--test-fraction 1.0 is out of range; allowed: greater than 0 and less than 1":
                   dict(test_fraction=1.0),
               "--schedule 'linear': choose from constant, cosine, onecycle, restarts":
                   dict(schedule="linear"),
               "name at least one labeled folder": dict(data=()),
               "--start-epoch goes on from --pretrained": dict(start_epoch=8)}
    for words, change in refused.items():
        with pytest.raises(ConfigError) as e:
            dataclasses.replace(ok, **change).check()
        assert words in str(e.value), change


def test_an_output_that_is_a_file_or_under_a_file_is_refused_before_ray(
        tmp_path, capsys, random_checkpoint, monkeypatch):
    """--output at a regular file was found after Ray had started (exit 1): now exit 2 with
    one line naming it, before Ray, and nothing is created."""
    monkeypatch.setattr(cli, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    src = tmp_path / "src"
    put_user_files(src)
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for output in (afile, afile / "out"):
        code = cli.main(["annotate", str(src), "--model", random_checkpoint,
                         "--output", str(output)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and str(afile) in err, err
        assert "is a file" in err
    assert afile.read_text() == "mine"
    assert_user_files_intact(src)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_a_read_only_output_folder_is_refused_before_ray(tmp_path, capsys, random_checkpoint):
    src, locked = tmp_path / "src", tmp_path / "locked"
    put_user_files(src)
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code = cli.main(["annotate", str(src), "--model", random_checkpoint,
                         "--output", str(locked / "out")])
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not writable" in err and not (locked / "out").exists()


def test_a_full_disk_inside_ray_is_told_in_one_line():
    """A full disk while writing came as a 52-line Ray traceback whose last line named the
    cause: the OSError is found down the chain and told plainly."""
    import errno

    class RayLike(Exception):  # how Ray's task errors carry the worker's exception
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last):\n  ...\n" * 20)
            self.cause = cause

    full = OSError(errno.ENOSPC, "No space left on device", "/out/_staging/x/part-1.parquet")
    try:
        try:
            raise full
        except OSError as inner:
            raise RuntimeError("write failed") from RayLike(inner)
    except RuntimeError as e:
        found = cli.os_error_in(e)
    assert found is full
    line = cli.one_line(found)
    assert line == "/out/_staging/x/part-1.parquet: No space left on device"
    assert cli.os_error_in(ValueError("no cause")) is None


def test_incremental_counts_files_of_another_model_and_relabel_redoes_them():
    """Night 2 with another model: the done files labelled by night 1's model are counted
    (kept by default), and --relabel processes them again. pipeline.incremental_split is
    the whole rule; readers.labelled_by reads the model of each file's latest ok row."""
    from fer_batch import pipeline
    entries = [dict(uri=u, size_bytes=1, mtime_ns=2) for u in ("/a.jpg", "/b.jpg", "/c.jpg")]
    done = {"/a.jpg": (1, 2), "/b.jpg": (1, 2), "/c.jpg": (9, 9)}  # c changed since
    by = {"/a.jpg": "old", "/b.jpg": "new", "/c.jpg": "old"}
    already, other = pipeline.incremental_split(entries, done, by, "new")
    assert [e["uri"] for e in already] == ["/a.jpg", "/b.jpg"]
    assert [e["uri"] for e in other] == ["/a.jpg"]
    already, other = pipeline.incremental_split(entries, done, by, "new", relabel=True)
    assert [e["uri"] for e in already] == ["/b.jpg"] and [e["uri"] for e in other] == ["/a.jpg"]
    files = pa.table({"source": ["/a.jpg", "/n.txt"], "status": ["ok", "skipped"],
                      "model_id": ["old", "old"]})
    assert readers.labelled_by(files) == {"/a.jpg": "old"}  # a skipped file has no model


def duckdb_faces(root: Path, columns: str) -> list:
    """A plain DuckDB glob over OUT/faces (no union_by_name), rows sorted by source."""
    import duckdb
    glob = str(root / "faces" / "*" / "*.parquet")
    return duckdb.sql(f"SELECT {columns} FROM read_parquet('{glob}', hive_partitioning=true) "
                      "ORDER BY source, run_id").fetchall()


def test_two_models_in_one_output_are_read_whole_by_a_plain_glob(tmp_path):
    """Night 1: a 7-class FER2013 model; night 2 relabels a.mp4 with a CK+ model (contempt,
    no neutral), night 3 adds c.mp4 with a model of a custom label set. Every run writes one
    layout (a column per expression, other_classes for the rest), so a plain DuckDB glob,
    pandas and pyarrow read every night's rows and every model's probabilities; compact
    keeps the latest view and drops the superseded run."""
    import pandas as pd
    fer = ["anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"]
    ck = corpus_classes()
    out = runs.Output(str(tmp_path / "out"))
    out.claim()
    rid3 = "20260104T000000Z-dddddd"
    out.commit(RID_DEAD, stage_run(out, RID_DEAD, fer, "a.mp4"))
    out.commit(RID_ORPHAN, stage_run(out, RID_ORPHAN, fer, "b.mp4"))
    out.commit(RID_STUCK, stage_run(out, RID_STUCK, ck, "a.mp4"))  # b.mp4 stays night 1's
    out.commit(rid3, stage_run(out, rid3, ["smirk", "anger"], "c.mp4"))

    def check(faces):
        faces = faces.set_index("source")
        assert sorted(faces.index) == ["a.mp4", "b.mp4", "c.mp4"]
        assert faces.loc["a.mp4", "contempt"] == 0 and np.isnan(faces.loc["a.mp4", "neutral"])
        assert faces.loc["b.mp4", "neutral"] == 0 and np.isnan(faces.loc["b.mp4", "contempt"])
        assert faces.loc["c.mp4", "anger"] == 0 and faces.loc["c.mp4", "label"] == "smirk"
        assert dict(faces.loc["c.mp4", "other_classes"]) == {"smirk": 0.0}

    check(fer_batch.read_faces(out.uri, as_pandas=True))
    plain = pd.read_parquet(tmp_path / "out" / "faces")  # plain pandas: every partition
    assert len(plain) == 4 and {"contempt", "neutral", "other_classes"} <= set(plain.columns)
    check(plain[plain["run_id"].astype(str) != RID_DEAD])  # a.mp4's first night superseded
    rows = duckdb_faces(tmp_path / "out", "source, contempt, neutral, other_classes['smirk']")
    assert rows == [("a.mp4", None, 0.0, None), ("a.mp4", 0.0, None, None),
                    ("b.mp4", None, 0.0, None), ("c.mp4", None, None, 0.0)]
    assert "contempt" in fer_batch.read_faces(out.uri, columns=["contempt"]).column_names
    from fer_batch import report_data
    assert {"contempt", "neutral", "smirk"} <= set(report_data.load(out.uri).classes)
    assert "compacted 4 runs" in readers.compact(out.uri)
    (rid,) = out.committed_runs()
    check(fer_batch.read_faces(out.uri, as_pandas=True))
    assert not (tmp_path / "out" / "faces" / f"run_id={RID_DEAD}").exists()
    assert duckdb_faces(tmp_path / "out", "source, contempt, neutral") == \
        [("a.mp4", 0.0, None), ("b.mp4", None, 0.0), ("c.mp4", None, None)]


def test_an_output_of_the_older_layout_is_read_in_the_one_layout_and_compacted_into_it(
        tmp_path):
    """Runs written before the one layout have a column per class of their model. The
    readers fold those columns into it, and compact rewrites the output in it, after which
    a plain glob reads it."""
    fer = ["anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"]
    out = runs.Output(str(tmp_path / "out"))
    out.claim()
    for rid, classes, source in ((RID_DEAD, fer, "a.mp4"), (RID_ORPHAN, ["calm", "anger"],
                                                             "b.mp4")):
        old = pa.schema(list(sink.FACE_COLUMNS) + [(c, pa.float32()) for c in classes]
                        + list(sink.FACE_TAIL))
        row = {n: [0] for n in old.names}
        row.update(source=[source], media_type=["video"], timestamp_s=[0.5],
                   label=[classes[0]], model_id=["m"], crop_png=[b""], **{classes[0]: [0.75]})
        sink.write_tables(out.fs, out.staging(rid), pa.table(row, schema=old),
                          sink.file_rows_table([dict(uri=source, media_type="video",
                                                     status="ok", size_bytes=1, mtime_ns=1)],
                                               "m"), name="0")
        out.commit(rid, dict(run_id=rid, classes=classes, config={}))
    faces = fer_batch.read_faces(out.uri)
    assert faces.select(sink.FACE_SCHEMA.names).schema == sink.FACE_SCHEMA
    got = {r["source"]: r for r in faces.to_pylist()}
    assert got["a.mp4"]["anger"] == 0.75 and got["a.mp4"]["other_classes"] is None
    assert got["b.mp4"]["other_classes"] == [("calm", 0.75)] and got["b.mp4"]["neutral"] is None
    assert "compacted 2 runs" in readers.compact(out.uri)
    assert duckdb_faces(tmp_path / "out", "source, anger, other_classes['calm']") == \
        [("a.mp4", 0.75, None), ("b.mp4", 0.0, 0.75)]


def test_a_library_caller_gets_the_clis_refusal_of_pool_with_haar():
    """--detect-on pool runs CenterFace: the rule lived in the CLI only, so a library call
    with detector="haar" ran CenterFace silently. It is the config check's now."""
    from fer_batch import pipeline
    with pytest.raises(ConfigError, match="--detect-on pool runs CenterFace"):
        AnnotateConfig(detect_on="pool", detector="haar").check()
    AnnotateConfig(detect_on="pool").check()  # centerface: fine
    with pytest.raises(ConfigError, match="--detect-on pool runs CenterFace"):  # before Ray
        pipeline.run(AnnotateConfig(sources=("x",), detect_on="pool", detector="haar"))
