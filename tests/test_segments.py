"""Long videos in segments (segments.py): a segmented decode gives exactly the frames,
indexes and timestamps of one-task decoding, and an annotate run writes one files row per
video whose tracks run across segment borders."""

from __future__ import annotations

import json

import av
import cv2
import numpy as np
import pyarrow as pa
import pytest

from conftest import face_image
from corpus import write_numbered_video as encode
from fer_batch import decode, segments, sink

FPS = 10
SEGMENT_S = 3.0  # borders at 3, 6, 9, 12 s: inside GOPs, so every segment seeks back


def split(path, *, segment_s=SEGMENT_S, sample_fps=2.0, every_n=0) -> list[dict]:
    row = {"files": json.dumps([dict(uri=str(path), media_type="video", size_bytes=0,
                                     mtime_ns=0)])}
    units = segments.split_unit(row, segment_s=segment_s, sample_fps=sample_fps,
                                every_n=every_n)
    return [json.loads(u["files"])[0] for u in units]


def decoded(path, entries, **kw) -> tuple[list, int]:
    """(index, timestamp, pixel checksum) of every sampled frame over the entries, and the
    frames decoded summed over them, as FaceCropper reads them."""
    frames, total = [], 0
    for entry in entries:
        stats = decode.VideoStats()
        with open(path, "rb") as f:
            frames += [(i, t, int(g.astype(np.int64).sum()))
                       for i, t, g in segments.iter_unit_frames(f, entry, stats=stats, **kw)]
        assert stats.error is None, stats.error
        total += stats.frames_decoded
    return frames, total


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("seg") / "v.mp4", 15 * FPS)  # 15 s


@pytest.mark.parametrize("mode", [dict(sample_fps=2.0), dict(sample_fps=3.0),
                                  dict(sample_fps=0.7), dict(every_n=1), dict(every_n=7)])
def test_segmented_decode_equals_one_task(video, mode):
    kw = dict(sample_fps=mode.get("sample_fps", 2.0), every_n=mode.get("every_n", 0))
    parts = split(video, **kw)
    assert len(parts) >= 5  # 0.7 fps: borders every 2 samples = 2.86 s, 6 segments
    assert [p["segment"]["index"] for p in parts] == list(range(len(parts)))
    # later segments start at a keyframe inside the video: a seek, not a decode from 0
    assert all(p["segment"]["key_pts"] > 0 for p in parts[1:])
    whole, n_whole = decoded(video, [dict(uri=video)], **kw)
    pieces, n_pieces = decoded(video, parts, **kw)
    assert pieces == whole
    assert n_pieces == n_whole == 15 * FPS
    if kw["every_n"] == 7:
        assert [i for i, _, _ in pieces] == list(range(0, 150, 7))
    if kw["sample_fps"] == 2.0 and not kw["every_n"]:  # a sample at each border (3 s = 6 steps)
        assert [i for i, _, _ in pieces] == list(range(0, 150, 5))
        assert [t for _, t, _ in pieces] == pytest.approx(np.arange(0, 15, 0.5))


def test_variable_frame_rate_and_matroska(tmp_path):
    mp4 = encode(tmp_path / "vfr.mp4", 130, vfr=True)
    mkv = tmp_path / "vfr.mkv"
    with av.open(mp4) as src, av.open(str(mkv), "w") as dst:  # same packets, other container
        s_in = src.streams.video[0]
        s_out = dst.add_stream_from_template(s_in)
        for p in src.demux(s_in):
            if p.dts is not None:
                p.stream = s_out
                dst.mux(p)
    for path in (mp4, str(mkv)):
        for kw in (dict(sample_fps=2.0, every_n=0), dict(sample_fps=2.0, every_n=3)):
            parts = split(path, **kw)
            assert len(parts) >= 4
            assert decoded(path, parts, **kw) == decoded(path, [dict(uri=path)], **kw)


def test_a_seek_that_lands_elsewhere_falls_back_to_the_file_start(video):
    parts = split(video)
    seg = parts[2]["segment"]
    seg["key_pts"] += 1  # no frame has this pts: the first frame after the seek differs
    whole, _ = decoded(video, [dict(uri=video)])
    pieces, _ = decoded(video, parts)
    assert pieces == whole


def test_short_videos_images_and_off_are_not_split(video, tmp_path):
    assert len(split(video, segment_s=11)) == 1  # 15 s < 1.5 x 11 s
    assert len(split(video, segment_s=0)) == 1
    assert "segment" not in split(video, segment_s=20)[0]
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 1000)
    assert split(junk) == [dict(uri=str(junk), media_type="video", size_bytes=0, mtime_ns=0)]


def test_segment_bounds_lie_on_the_sampling_grid():
    # the last segment takes the rest: 10 s in 3 s segments = 3, 3 and 4 s
    assert segments.segment_bounds(10.0, segment_s=3, sample_fps=2, every_n=0) == [3, 6]
    b = segments.segment_bounds(10.0, segment_s=3, sample_fps=3, every_n=0)
    assert b == [9 * (1 / 3), 18 * (1 / 3)]  # the sampler's own float products
    # 1 / 0.4 = 2.5 s between samples: borders every 2.5 s, the grid point nearest 3 s
    assert segments.segment_bounds(10.0, segment_s=3, sample_fps=0.4, every_n=0) == \
        [2.5, 5.0, 7.5]
    assert segments.segment_bounds(10.0, segment_s=3, sample_fps=2, every_n=5) == [3, 6]
    assert segments.segment_bounds(4.4, segment_s=3, sample_fps=2, every_n=0) == []
    assert segments.segment_bounds(4.6, segment_s=3, sample_fps=2, every_n=0) == [3]


def test_a_segment_has_its_own_tries_and_a_partial_row_naming_it():
    from fer_batch import preprocess
    seg = dict(index=1, count=3, start_s=3.0, end_s=6.0, key_pts=20480, first_index=20)
    whole = dict(uri="a.mp4", media_type="video", size_bytes=9, mtime_ns=1)
    part = dict(whole, segment=seg)
    assert segments.attempt_key(whole) == "a.mp4"
    assert segments.attempt_key(part) == "a.mp4#segment=1"
    row = preprocess.file_row(part, status="error", error="video stream damaged", frames=30,
                              faces=2, seconds=1.0, face_size=48, channels=("equalized",))
    assert (row["kind"][0], row["segment"][0], row["segments"][0]) == ("segment", 1, 3)
    assert (row["frames_decoded"][0], row["faces"][0], row["frame_index"][0]) == (30, 2, 0)
    assert row["error"][0] == "segment 2 of 3 (3-6 s): video stream damaged"
    batch = {k: np.concatenate([v, v]) for k, v in row.items()}
    batch["kind"][0] = "file"  # a file row and a segment row in one stream batch
    batch["model_id"] = np.array(["m", "m"], object)
    staged = sink.segment_table(batch)
    assert staged.schema == sink.SEGMENT_SCHEMA and staged.num_rows == 1
    assert staged.to_pylist()[0]["segment"] == 1 and staged.to_pylist()[0]["segments"] == 3
    assert sink.files_table(batch, batch["kind"] == "file").num_rows == 1


def test_fold_rows_gives_one_row_per_source_naming_the_failed_segment():
    schema = sink.SEGMENT_SCHEMA
    rows = [dict(source="a.mp4", media_type="video", status="ok", error=None, size_bytes=9,
                 mtime_ns=1, frames_decoded=30, faces=2, seconds=1.5, model_id="m",
                 segment=i, segments=3) for i in range(3)]
    rows[1].update(status="error", error="segment 2 of 3 (3-6 s): video stream damaged")
    rows.append(dict(rows[0], source="b.mp4", segments=2))  # b: its segment 2 left no row
    folded = segments.fold_rows(pa.Table.from_pylist(rows, schema=schema))
    assert folded.schema == sink.FILE_SCHEMA
    got = {r["source"]: r for r in folded.to_pylist()}
    assert got["a.mp4"]["status"] == "error" and got["a.mp4"]["frames_decoded"] == 90
    assert got["a.mp4"]["faces"] == 6 and got["a.mp4"]["error"].startswith("segment 2 of 3")
    assert got["b.mp4"]["status"] == "error" and "segments [2] of 2" in got["b.mp4"]["error"]


# --- end to end: one annotate run on a real local Ray ---------------------------------

@pytest.fixture(scope="module")
def runs_split_and_whole(ray_local, random_checkpoint, tmp_path_factory):
    """The same archive annotated with 3 s segments and as one task per video."""
    import fer_batch
    from fer_batch import cli, readers
    root = tmp_path_factory.mktemp("archive")
    face = cv2.resize(face_image(), (240, 300), interpolation=cv2.INTER_AREA)[:180]
    # a face drifting right, 9 s at 10 fps: 3 segments of 3 s, one track across both borders
    encode(root / "drift.mp4", 90, frame=lambda i: np.roll(face, i // 2, axis=1))
    encode(root / "blank.mp4", 50)  # 5 s: 2 segments, no faces
    cv2.imwrite(str(root / "face.jpg"), face)
    outs = {}
    for name, seconds in (("split", "3"), ("whole", "0")):
        out = tmp_path_factory.mktemp(name) / "out"
        assert cli.main(["annotate", str(root), "--model", random_checkpoint, "--output",
                         str(out), "--segment-seconds", seconds]) == 0
        outs[name] = (fer_batch.read_files(str(out), as_pandas=True),
                      fer_batch.read_faces(str(out), as_pandas=True),
                      readers.read_tracks(str(out), as_pandas=True))
    return outs


def test_one_files_row_per_video_and_the_faces_of_one_task(runs_split_and_whole):
    (files, faces, tracks), (files1, faces1, tracks1) = (runs_split_and_whole["split"],
                                                         runs_split_and_whole["whole"])
    assert files["source"].is_unique and len(files) == 3
    cols = ["source", "status", "frames_decoded", "faces"]
    assert files.sort_values("source")[cols].values.tolist() == \
        files1.sort_values("source")[cols].values.tolist()
    drift = files[files["source"].str.endswith("drift.mp4")].iloc[0]
    assert drift["status"] == "ok" and drift["frames_decoded"] == 90 and drift["faces"] > 0
    key = ["source", "frame_index", "face_index", "timestamp_s", "x", "y", "w", "h", "track_id"]
    assert faces.sort_values(key[:3])[key].fillna(-1).values.tolist() == \
        faces1.sort_values(key[:3])[key].fillna(-1).values.tolist()  # images: no time, track
    video = faces[faces["source"].str.endswith("drift.mp4")]
    assert set(video["frame_index"]) <= set(range(0, 90, 5))  # 2 fps of 10 fps
    # tracks are linked after all faces are known (at commit): one track runs across the
    # 3 s and 6 s borders, as in the unsplit run
    tcols = ["source", "track_id", "start_s", "end_s", "faces"]
    assert tracks.sort_values(tcols[:2])[tcols].values.tolist() == \
        tracks1.sort_values(tcols[:2])[tcols].values.tolist()
    long = tracks[tracks["source"].str.endswith("drift.mp4")]
    assert ((long["start_s"] < 3) & (long["end_s"] > 6)).any()
