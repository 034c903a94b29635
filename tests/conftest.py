"""Shared fixtures: a real local Ray, a real random-weights checkpoint, real test media."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NO_SHARED = f"needs the shared test data at {SHARED_DATA} (../shared/data beside the repo)"

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def shared(*parts) -> Path:
    """Path under ../shared/data; skips the test when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(NO_SHARED)
    return p


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with 2 CPUs for the tests of one module."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> str:
    """model.pt with random weights, written by the real save function."""
    import torch
    from fer_batch import model as M
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    M.save_checkpoint(str(path), M.build_model(), classes=M.EMOTIONS,
                      model_args=dict(num_classes=7, in_channels=1, stem="imagenet"),
                      channels=["equalized"])
    return str(path)


def face_image() -> np.ndarray:
    """A real public-domain face photo as grayscale (h, w) uint8: a US-government portrait
    from ../shared/data/photos (skips when absent)."""
    import cv2
    img = cv2.imread(str(shared("photos", "fr_obama.jpg")), cv2.IMREAD_GRAYSCALE)
    assert img is not None
    return img


def encode_video(path: Path, frames, *, fps: int = 10, codec: str = "libx264",
                 pix_fmt: str = "yuv420p", rotate: int = 0) -> Path:
    """Encode grayscale frames (h, w) uint8 into a real video file with PyAV."""
    import av
    frames = list(frames)
    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if rotate:  # display matrix side data: players rotate by this many degrees
            stream.set_display_rotation(rotate)
        for g in frames:
            frame = av.VideoFrame.from_ndarray(np.dstack([g, g, g]), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
