"""tracks: synthetic moving boxes with gaps -> track ids; smoothing; segments; tracks table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from fer_batch import sink, tracks

JAFFE = ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise")
FPS = 2.0  # the annotate default sampling rate


def faces_table(rows, classes=JAFFE) -> pa.Table:
    """Face rows like OUT/faces: rows are dicts with source, frame, box, probs (or label)."""
    cols = {k: [] for k in ("source", "media_type", "frame_index", "timestamp_s", "face_index",
                            "x", "y", "w", "h", "label", "score", *classes, "model_id")}
    for r in rows:
        p = np.asarray(r.get("probs", np.full(len(classes), 1 / len(classes))), np.float32)
        video = r.get("video", True)
        cols["source"].append(r["source"])
        cols["media_type"].append("video" if video else "image")
        cols["frame_index"].append(r["frame"])
        cols["timestamp_s"].append(r["frame"] / FPS if video else None)
        cols["face_index"].append(r["face"])
        for k, v in zip("xywh", r["box"]):
            cols[k].append(v)
        cols["label"].append(classes[int(p.argmax())])
        cols["score"].append(float(p.max()))
        for c, v in zip(classes, p):
            cols[c].append(float(v))
        cols["model_id"].append("m0")
    types = dict(frame_index=pa.int64(), timestamp_s=pa.float64(), face_index=pa.int32(),
                 x=pa.int32(), y=pa.int32(), w=pa.int32(), h=pa.int32(), score=pa.float32(),
                 **{c: pa.float32() for c in classes})
    return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in cols.items()})


def one_hot(name, classes=JAFFE, p=0.9):
    v = np.full(len(classes), (1 - p) / (len(classes) - 1), np.float32)
    v[classes.index(name)] = p
    return v


def moving(source, start, velocity, frames, size=100, missing=()):
    """Rows of one face moving at constant velocity (px per sampled frame), skipping
    the frames in `missing` (missed detections)."""
    out = []
    for f in frames:
        if f in missing:
            continue
        x, y = start[0] + velocity[0] * f, start[1] + velocity[1] * f
        out.append(dict(source=source, frame=f, box=(int(x), int(y), size, size)))
    return out


def ids_by_frame(tbl, source="v.mp4"):
    """frame_index -> track ids of the faces in that frame, in face_index order."""
    out = {}
    for s, f, t in zip(tbl["source"].to_pylist(), tbl["frame_index"].to_pylist(),
                       tbl["track_id"].to_pylist()):
        if s == source:
            out.setdefault(f, []).append(t)
    return out


def with_face_index(rows):
    """Number faces within each (source, frame) in list order, like the detector does."""
    seen = {}
    for r in rows:
        k = (r["source"], r["frame"])
        r["face"] = seen.get(k, 0)
        seen[k] = r["face"] + 1
    return rows


def test_two_faces_with_missed_detections_keep_their_tracks():
    a = moving("v.mp4", (50, 100), (20, 0), range(12), missing={4, 5, 6})  # 2 s unseen
    b = moving("v.mp4", (600, 120), (-15, 5), range(12), missing={8})
    rows = with_face_index(sorted(a + b, key=lambda r: r["frame"]))
    out, trk = tracks.assign_tracks(faces_table(rows), JAFFE)
    by_frame = ids_by_frame(out)
    assert by_frame[0] == [0, 1]  # numbered by first appearance
    assert all(by_frame[f] == [1] for f in (4, 5, 6))  # a missing; b keeps id 1
    assert by_frame[7] == [0, 1] and by_frame[8] == [0]  # a resumes with its id after the gap
    assert by_frame[11] == [0, 1]
    assert trk.num_rows == 2
    assert trk["faces"].to_pylist() == [9, 11]
    assert trk["start_s"].to_pylist() == [0.0, 0.0] and trk["end_s"].to_pylist() == [5.5, 5.5]
    assert trk["first_frame_index"].to_pylist() == [0, 0]
    assert trk["last_frame_index"].to_pylist() == [11, 11]


def test_gap_longer_than_max_gap_starts_a_new_track():
    rows = with_face_index(moving("v.mp4", (50, 100), (10, 0), range(10), missing={3, 4, 5, 6}))
    out, trk = tracks.assign_tracks(faces_table(rows), JAFFE, max_gap_s=2.0)  # unseen 2.5 s
    assert out["track_id"].to_pylist() == [0, 0, 0, 1, 1, 1]
    assert trk["track_id"].to_pylist() == [0, 1]
    out, trk = tracks.assign_tracks(faces_table(rows), JAFFE, max_gap_s=3.0)
    assert out["track_id"].to_pylist() == [0] * 6 and trk.num_rows == 1


def test_constant_velocity_refinds_a_face_hidden_while_crossing_another():
    # a walks right, b walks left, 30 px lower; a is not detected in frames 9-11 while the
    # two cross. In frame 12, b's box overlaps a's last seen box (frame 8) with IoU 0.54 and
    # a's own box does not overlap it at all: a static association would give b's face to
    # a's track. The velocity prediction puts a's track exactly on a's box.
    a = moving("v.mp4", (0, 0), (40, 0), range(16), missing={9, 10, 11})
    b = moving("v.mp4", (800, 30), (-40, 0), range(16))
    rows = with_face_index(sorted(a + b, key=lambda r: (r["frame"], r["box"][1])))
    assert tracks.box_iou(np.array([[320, 0, 100, 100]]), np.array([[320, 30, 100, 100]]))[0, 0] \
        > 0.5
    out, trk = tracks.assign_tracks(faces_table(rows), JAFFE)
    assert trk.num_rows == 2
    by_frame = ids_by_frame(out)
    assert all(by_frame[f] == [1] for f in (9, 10, 11))
    assert all(by_frame[f] == [0, 1] for f in range(16) if f not in (9, 10, 11))


def test_fast_diagonal_motion_matches_on_centres():
    # 35% of a side per frame diagonally: IoU with the last box 0.27 (< 0.3) on the second
    # frame, before the track has a velocity; the centre fallback links it
    rows = with_face_index(moving("v.mp4", (0, 0), (35, 35), range(6)))
    out, trk = tracks.assign_tracks(faces_table(rows), JAFFE)
    assert tracks.box_iou(np.array([[0, 0, 100, 100]]), np.array([[35, 35, 100, 100]]))[0, 0] < \
        tracks.IOU_THRESHOLD
    assert out["track_id"].to_pylist() == [0] * 6 and trk.num_rows == 1


def test_sources_are_tracked_separately_and_images_get_no_track():
    v1 = moving("b.mp4", (10, 10), (5, 0), range(4))
    v2 = moving("a.mp4", (10, 10), (5, 0), range(3))
    img = [dict(source="c.jpg", frame=0, box=(5, 5, 50, 50), video=False),
           dict(source="c.jpg", frame=0, box=(200, 5, 50, 50), video=False)]
    rows = with_face_index(v1[:2] + img + v2 + v1[2:])  # interleaved, as parts arrive
    faces = faces_table(rows)
    out, trk = tracks.assign_tracks(faces, JAFFE)
    assert out.num_rows == faces.num_rows
    assert out.drop_columns(["track_id"]).equals(faces)  # rows and columns untouched
    assert out.column_names.index("track_id") == out.column_names.index("face_index") + 1
    assert out.schema.field("track_id").type == pa.int32()
    assert out["track_id"].to_pylist() == [0, 0, None, None, 0, 0, 0, 0, 0]
    assert list(zip(trk["source"].to_pylist(), trk["faces"].to_pylist())) == \
        [("a.mp4", 3), ("b.mp4", 4)]


def test_smooth_probs_is_a_centred_moving_average_in_seconds():
    t = np.array([0.0, 0.5, 1.0, 1.5, 4.0])
    p = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0, 1]], np.float32)
    s = tracks.smooth_probs(t, p, window_s=1.0)  # neighbours within 0.5 s
    np.testing.assert_allclose(s[:, 0], [1 / 2, 2 / 3, 2 / 3, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(s.sum(axis=1), 1.0, rtol=1e-6)
    assert s.dtype == np.float32 and s.shape == p.shape
    np.testing.assert_array_equal(tracks.smooth_probs(t, p, window_s=0), p)


def test_label_segments_cut_halfway_between_observations():
    t = np.array([0.0, 0.5, 1.0, 2.0, 2.5])
    segs = tracks.label_segments(t, ["neutral", "neutral", "happiness", "happiness", "fear"])
    assert segs == [(0.0, 0.75, "neutral"), (0.75, 2.25, "happiness"), (2.25, 2.5, "fear")]
    assert tracks.label_segments(np.array([3.0]), ["anger"]) == [(3.0, 3.0, "anger")]


def test_tracks_table_smooths_a_one_frame_flicker_into_one_neutral_segment():
    rows = with_face_index(moving("v.mp4", (100, 100), (4, 0), range(10)))
    for r in rows:
        r["probs"] = one_hot("happiness" if r["frame"] == 4 else "neutral", p=0.6)
    for r in rows[7:]:
        r["probs"] = one_hot("surprise", p=0.9)
    faces = faces_table(rows)
    assert faces["label"].to_pylist()[3:6] == ["neutral", "happiness", "neutral"]  # raw flicker
    out, trk = tracks.assign_tracks(faces, JAFFE, smooth_s=1.0)
    assert out["label"].equals(faces["label"])  # raw per-frame labels untouched
    (row,) = trk.to_pylist()
    assert row["dominant_label"] == "neutral" and row["model_id"] == "m0"
    assert [(s["label"], s["start_s"], s["end_s"]) for s in row["segments"]] == \
        [("neutral", 0.0, 3.25), ("surprise", 3.25, 4.5)]
    probs = np.stack([faces[c].to_numpy() for c in JAFFE], 1)
    np.testing.assert_allclose([row[c] for c in JAFFE], probs.mean(axis=0), rtol=1e-6)
    _, raw = tracks.assign_tracks(faces, JAFFE, smooth_s=0)  # no smoothing: the flicker stays
    assert [s["label"] for s in raw.to_pylist()[0]["segments"]] == \
        ["neutral", "happiness", "neutral", "surprise"]


def test_min_score_marks_low_confidence_segments_uncertain():
    rows = with_face_index(moving("v.mp4", (100, 100), (0, 0), range(4)))
    for r in rows:
        r["probs"] = one_hot("neutral", p=0.3)
    out, trk = tracks.assign_tracks(faces_table(rows), JAFFE, min_score=0.5)
    assert trk["dominant_label"].to_pylist() == [sink.UNCERTAIN]
    assert [s["label"] for s in trk["segments"].to_pylist()[0]] == [sink.UNCERTAIN]


def test_empty_faces_and_clashing_class_names():
    faces = faces_table([])
    out, trk = tracks.assign_tracks(faces, JAFFE)
    assert out.num_rows == 0 and "track_id" in out.column_names
    assert trk.schema == sink.TRACK_SCHEMA and trk.num_rows == 0
    with pytest.raises(sink.ClassNameError, match="segments"):  # a tracks column
        sink.check_class_names(("happy", "segments"))


def test_uncertain_label_has_one_definition():
    from fer_batch import infer
    assert not hasattr(tracks, "UNCERTAIN")  # sink.py is its one home
    labels, scores = infer.top_labels(np.array([[0.2, 0.8], [0.55, 0.45]]), ["a", "b"], 0.6)
    assert labels.tolist() == ["b", sink.UNCERTAIN] and scores.tolist() == pytest.approx([0.8, 0.55])


def _staged_run(out, rid: str):
    """Two staged parts of faces (two tracks of one video, one image face) and the files rows,
    as the sink writes them; returns (rows, faces table)."""
    from fer_batch import sink
    a = moving("v.mp4", (50, 100), (20, 0), range(8), missing={3})
    b = moving("v.mp4", (600, 120), (-15, 5), range(8))
    rows = with_face_index(sorted(a + b, key=lambda r: r["frame"]))
    rows += with_face_index([dict(source="p.jpg", frame=0, box=(5, 5, 60, 60), video=False)])
    faces = sink.face_table(dict(faces_table(rows).to_pydict(),  # as the sink writes them
                                 crop_png=[b"\x89PNG%d" % i for i in range(len(rows))]), JAFFE)
    files = sink.file_rows_table([dict(uri=u, media_type=m, status="ok", size_bytes=1,
                                       mtime_ns=1) for u, m in (("v.mp4", "video"),
                                                                ("p.jpg", "image"))], "m0")
    stage = out.staging(rid)
    sink.write_tables(out.fs, stage, faces.slice(0, 7), files, name="a")
    sink.write_tables(out.fs, stage, faces.slice(7), sink.FILE_SCHEMA.empty_table(), name="b")
    return rows, faces


def test_tracking_before_ready_and_a_roll_forward_moves_the_tracked_rows(tmp_path):
    # the real end of a run on real Parquet: finish.track rewrites the staged faces and stages
    # the tracks; the run dies after READY; the next run's recovery commits the same rows
    from fer_batch import finish, readers, runs
    out = runs.Output(str(tmp_path / "out"))
    rid = "20260101T000000Z-abcdef"
    rows, faces = _staged_run(out, rid)
    assert finish.track(out, rid, JAFFE, min_score=0.0) == 2
    out.write_json(f"{out.staging(rid)}/READY.json", dict(run_id=rid, classes=list(JAFFE)))

    assert out.recover() == [f"rolled forward the commit of run {rid}"]
    got = readers.read_faces(out.uri)
    assert got.num_rows == len(rows)
    assert got.column_names == faces.column_names[:5] + ["track_id"] + \
        faces.column_names[5:] + ["run_id"]
    video = got.filter(pc.equal(got["source"], "v.mp4"))
    assert video["track_id"].null_count == 0 and set(video["track_id"].to_pylist()) == {0, 1}
    assert got.filter(pc.equal(got["source"], "p.jpg"))["track_id"].to_pylist() == [None]
    assert sorted(got["crop_png"].to_pylist()) == sorted(faces["crop_png"].to_pylist())
    trk = readers.read_tracks(out.uri)
    assert trk["faces"].to_pylist() == [7, 8] and trk["run_id"].to_pylist() == [rid, rid]
    stage = Path(out.staging(rid))
    assert not stage.exists() and (tmp_path / "out" / "tracks" / f"run_id={rid}").is_dir()


def test_a_run_that_dies_while_tracking_is_discarded_and_its_files_redone(tmp_path):
    # no READY yet: a half-written faces.tracked/ is a dead run's staging, which recovery
    # deletes; nothing of it becomes visible, and the next run does its files again
    from fer_batch import readers, runs
    out = runs.Output(str(tmp_path / "out"))
    rid = "20260101T000000Z-abcdef"
    _staged_run(out, rid)
    (Path(out.staging(rid)) / "faces.tracked").mkdir()
    (Path(out.staging(rid)) / "faces.tracked" / "part-a.parquet").write_bytes(b"half a file")
    assert out.recover() == [f"discarded staging of unfinished run {rid}"]
    assert not Path(out.staging(rid)).exists()
    assert readers.read_faces(out.uri) is None  # no committed run: nothing to read


def test_compact_keeps_tracks_and_track_ids(tmp_path):
    # tracks carry a list column (segments), which Arrow's hash join cannot carry
    from fer_batch import finish, readers, runs, sink
    out = runs.Output(str(tmp_path / "out"))
    for rid, src in (("20260101T000000Z-aaaaaa", "v.mp4"), ("20260102T000000Z-bbbbbb", "w.mp4")):
        faces = faces_table(with_face_index(moving(src, (50, 100), (20, 0), range(5))))
        faces = faces.append_column("crop_png", pa.array([b"png"] * faces.num_rows))
        files = sink.file_rows_table([dict(uri=src, media_type="video", status="ok",
                                           size_bytes=1, mtime_ns=1)], "m0")
        sink.write_tables(out.fs, out.staging(rid), faces, files, name="a")
        finish.track(out, rid, JAFFE)
        out.commit(rid, dict(run_id=rid, classes=list(JAFFE), config={}))
    before = readers.read_tracks(out.uri).drop_columns(["run_id"])
    assert "compacted 2 runs" in readers.compact(out.uri)
    after = readers.read_tracks(out.uri)
    assert len(set(after["run_id"].to_pylist())) == 1
    assert after.drop_columns(["run_id"]).equals(before)
    assert readers.read_faces(out.uri)["track_id"].to_pylist() == [0] * 10
