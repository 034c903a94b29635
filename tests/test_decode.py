import io

import cv2
import numpy as np
import pytest

from conftest import encode_video, face_image
from fer_batch import decode


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
