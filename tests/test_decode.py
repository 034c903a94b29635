import io

import cv2
import numpy as np
import pytest

from conftest import encode_video, face_image
from corpus import corrupt_middle, write_numbered_video
from fer_batch import decode, sampling


def test_decode_image_returns_gray_uint8_and_refuses_junk():
    img = np.full((30, 40, 3), 200, np.uint8)
    ok, png = cv2.imencode(".png", img)
    gray = decode.decode_image(png.tobytes())
    assert gray.shape == (30, 40) and gray.dtype == np.uint8
    with pytest.raises(decode.DecodeError, match="empty"):
        decode.decode_image(b"")
    with pytest.raises(decode.DecodeError, match="HTML"):
        decode.decode_image(b"<html><body>404 Not Found</body></html>")


def test_header_bomb_is_refused_before_decoding():
    ok, png = cv2.imencode(".png", np.zeros((4, 4), np.uint8))
    data = bytearray(png.tobytes())
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width, height
    with pytest.raises(decode.DecodeError, match="100000x100000"):
        decode.decode_image(bytes(data), max_pixels=10_000_000)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """2 s at 10 fps of a real face, H.264 in MP4."""
    face = cv2.resize(face_image(), (160, 120))
    frames = [np.roll(face, i, axis=1) for i in range(20)]
    return encode_video(tmp_path_factory.mktemp("v") / "face.mp4", frames, fps=10)


def test_sample_fps_picks_frames_by_timestamp(clip):
    got = list(decode.iter_frames(str(clip), sample_fps=2))
    assert [i for i, _, _ in got] == [0, 5, 10, 15]
    assert [t for _, t, _ in got] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert got[0][2].shape == (120, 160) and got[0][2].dtype == np.uint8


def test_every_n_frames_and_file_objects(clip):
    with open(clip, "rb") as f:
        got = list(decode.iter_frames(f, every_n=7))
    assert [i for i, _, _ in got] == [0, 7, 14]
    assert got[1][1] == pytest.approx(0.7)


def test_truncated_video_keeps_decoded_frames_and_reports(tmp_path):
    face = cv2.resize(face_image(), (160, 120))
    # Matroska streams (an MP4 cut before its index at the end cannot be opened at all)
    mkv = encode_video(tmp_path / "face.mkv", [np.roll(face, i, axis=1) for i in range(20)])
    data = mkv.read_bytes()
    stats = decode.VideoStats()
    got = list(decode.iter_frames(io.BytesIO(data[: len(data) * 9 // 10]), every_n=1,
                                  stats=stats))
    assert 0 < len(got) < 20
    assert stats.frames_decoded == len(got)


ENCODINGS = {  # 15 s at 10 fps, H.264
    "b-frames": dict(gop=20),  # two B-frames between references, a keyframe every 2 s
    "p-frames, 1 s gops": dict(gop=10, bframes=0),
    "open gops": dict(gop=10, bframes=3, x264_params="open-gop=1"),
    "matroska": dict(gop=7, suffix=".mkv"),
}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("enc")
    return {name: write_numbered_video(folder / f"{i}{kw.pop('suffix', '.mp4')}", 150, **kw)
            for i, (name, kw) in enumerate((n, dict(k)) for n, k in ENCODINGS.items())}


def sampled_from_every_frame(data: bytes, sample_fps: float) -> list:
    """The frames --sample-fps keeps, picked by decode's sampler from every decoded frame."""
    sampler = sampling.Sampler(sample_fps, 0)
    return [(i, t, g.tobytes()) for i, t, g in decode.iter_frames(io.BytesIO(data), every_n=1)
            if sampler.keep(i, t)]


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("sample_fps", [0.5, 2.0, 3.0, 10.0])
def test_sampling_skips_frames_it_drops_and_keeps_the_same_frames(encoded, encoding,
                                                                  sample_fps):
    """The decoder skips frames the sampler drops (non-reference B-frames; runs of frames up
    to the next keyframe), and the sampled frames, their indexes, times and pixels, and the
    frame count are those of decoding every frame."""
    data = open(encoded[encoding], "rb").read()
    stats = decode.VideoStats()
    got = [(i, t, g.tobytes()) for i, t, g in
           decode.iter_frames(io.BytesIO(data), sample_fps=sample_fps, stats=stats)]
    assert got == sampled_from_every_frame(data, sample_fps)
    assert stats.frames_decoded == 150 and stats.error is None
    if sample_fps == 10.0:  # every frame is sampled: nothing to skip
        assert stats.frames_skipped == 0
    else:
        assert stats.frames_skipped >= 20
    if encoding == "p-frames, 1 s gops" and sample_fps == 0.5:
        # one sample per 2 s: of each 2 s, the frames after the sampled one up to the
        # next keyframe and the second second's frames after its keyframe are not decoded
        assert stats.frames_skipped >= 120


def test_skipping_in_a_damaged_video_keeps_indexes_true_to_timestamps(encoded):
    """Frames lost to damage still count: a frame's index is its rank among the video's
    frames (timestamp x 10 fps here), whether the frames before it were decoded, skipped
    or undecodable."""
    data = corrupt_middle(open(encoded["b-frames"], "rb").read())
    stats = decode.VideoStats()
    got = list(decode.iter_frames(io.BytesIO(data), sample_fps=2.0, stats=stats))
    assert stats.bad_packets > 0 and "undecodable" in stats.error
    assert stats.frames_skipped > 0
    assert [i for i, _, _ in got] == [round(t * 10) for _, t, _ in got]
    assert len(got) >= 25  # 30 samples in 15 s, a few lost to the damage


def test_rotation_metadata_is_applied(tmp_path):
    g = np.zeros((64, 96), np.uint8)
    g[:, :10] = 255  # a white stripe on the left edge
    path = encode_video(tmp_path / "rot.mp4", [g] * 3, rotate=90)
    _, _, frame = next(decode.iter_frames(str(path), every_n=1))
    assert frame.shape == (96, 64)  # portrait after rotation
    assert frame[-1].mean() > 200  # rotated 90 degrees counter-clockwise: stripe at the bottom


def test_not_a_video_is_a_decode_error():
    with pytest.raises(decode.DecodeError):
        list(decode.iter_frames(io.BytesIO(b"this is a text file, not an mp4")))
