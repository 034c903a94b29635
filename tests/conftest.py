"""Shared fixtures: a real local Ray, a real S3 server, a real random-weights checkpoint, real
test media."""

from __future__ import annotations

import contextlib
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


RAY_OPTIONS = dict(num_cpus=2, include_dashboard=False, log_to_driver=False)

# fixtures that start Ray work (actors, Ray Train): a test using one is marked slow
RAY_FIXTURES = {"ray_local", "ray_s3", "ray_crash_hook", "ray_cluster"}


def pytest_collection_modifyitems(config, items):
    """Marks every test that needs a Ray run `slow` (`-m "not slow"`: the quick tests only),
    then puts the modules with the most slow tests first, keeping the order within a
    module. `make test` runs two workers that take whole modules in this order (`-n 2
    --dist loadfile --no-loadscope-reorder`): the long modules start early and the short
    ones fill the end, so no long module runs alone at the end."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    slow: dict[str, int] = {}
    for item in items:
        if item.get_closest_marker("slow"):
            slow[item.module.__name__] = slow.get(item.module.__name__, 0) + 1
    items.sort(key=lambda item: -slow.get(item.module.__name__, 0))


@pytest.fixture(scope="session")
def _ray_run():
    """Stops the run's local Ray at the end of the test run."""
    yield
    import ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_run):
    """The test run's real local Ray with 2 CPUs: started by the first module that needs it
    and kept for the next ones (a start costs seconds); a module that needed a Ray of its
    own (``own_ray``) stopped it, and it starts again here."""
    import ray
    if not ray.is_initialized():
        ray.init(**RAY_OPTIONS)
    return ray


@contextlib.contextmanager
def own_ray(env: dict | None = None):
    """A local Ray of one module's own whose workers inherit env (variables set before
    ray.init reach the workers; later ones do not): the shared Ray stops, this one starts,
    and at the end it stops and env goes (the next module's ray_local starts the shared one
    again)."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
    old = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        ray.init(**RAY_OPTIONS)
        yield ray
    finally:
        ray.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- S3: a real S3 HTTP server (moto) behind a fault-injecting proxy, tests/s3_server.py

@pytest.fixture(scope="module")
def server():
    """moto's S3 server and the FaultProxy in front of it, for one module."""
    from s3_server import FaultProxy, MotoS3
    moto = MotoS3()
    proxy = FaultProxy(moto.port)
    proxy.hooks["delete"] = lambda bucket, key: moto.client().delete_object(Bucket=bucket,
                                                                            Key=key)
    yield moto, proxy
    proxy.stop()
    moto.stop()


@pytest.fixture(scope="module")
def s3_env(server, tmp_path_factory):
    """AWS settings of the test user, pointing at the proxy; no real ~/.aws, no IMDS."""
    from s3_server import set_test_user
    moto, proxy = server
    with pytest.MonkeyPatch.context() as mp:
        set_test_user(mp, moto, proxy.endpoint, tmp_path_factory.mktemp("aws"))
        yield moto, proxy


@pytest.fixture(scope="module")
def ray_s3(s3_env):
    """A local Ray started after s3_env, so that its workers inherit the AWS settings."""
    with own_ray() as ray:
        yield ray


@pytest.fixture(scope="module")
def s3(s3_env):
    """boto3 client of the test user, straight to moto (setup traffic stays off the proxy),
    with the buckets IN, OUT and MODELS."""
    from s3_server import IN, MODELS, OUT
    moto, _ = s3_env
    client = moto.client()
    for bucket in (IN, OUT, MODELS):
        client.create_bucket(Bucket=bucket)
    return client


def upload_tree(s3, root: Path, bucket: str, prefix: str) -> list[str]:
    """Every file under root to s3://bucket/prefix/<path relative to root>; the keys."""
    keys = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            keys.append(f"{prefix}/{p.relative_to(root).as_posix()}")
            s3.upload_file(str(p), bucket, keys[-1])
    return keys


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


def drawn_face(side: int = 150, frame: tuple = (240, 360)) -> np.ndarray:
    """A face drawn by this function (the project's own pixels: ellipse, brows, eyes, nose,
    mouth, blurred, a little noise) that the Haar cascade and its verifier find at sides
    of 100-300 px: unit tests need no ../shared. Centred in a frame of shape `frame` =
    (h, w) of flat background. Returns (h, w) uint8."""
    import cv2
    s = side
    face = np.full((s, s), 70, np.uint8)
    c = s // 2
    cv2.ellipse(face, (c, c + 5), (int(s * 0.33), int(s * 0.43)), 0, 0, 360, 185, -1)
    ey, ex = int(c - s * 0.08), int(s * 0.14)
    for k in (-1, 1):
        cv2.ellipse(face, (c + k * ex, ey - int(s * 0.09)), (int(s * 0.09), int(s * 0.025)),
                    0, 0, 360, 60, -1)  # brow
        cv2.ellipse(face, (c + k * ex, ey), (int(s * 0.07), int(s * 0.035)), 0, 0, 360, 40, -1)
    cv2.ellipse(face, (c, c + int(s * 0.08)), (int(s * 0.04), int(s * 0.09)), 0, 0, 360, 150, -1)
    cv2.ellipse(face, (c, c + int(s * 0.22)), (int(s * 0.12), int(s * 0.035)), 0, 0, 360, 80, -1)
    face = cv2.GaussianBlur(face, (0, 0), s * 0.02)
    noise = np.random.default_rng(0).normal(0, 4, face.shape)
    h, w = frame
    out = np.full((h, w), 90, np.uint8)
    y0, x0 = (h - s) // 2, (w - s) // 2
    out[y0:y0 + s, x0:x0 + s] = np.clip(face + noise, 0, 255).astype(np.uint8)
    return out


def photo_truth() -> dict[str, list]:
    """The 43 hand-labelled faces of ../shared/data/photos (face_boxes.csv): file name ->
    list of (x, y, w, h) boxes (skips when absent)."""
    import csv
    truth: dict[str, list] = {}
    with open(shared("photos", "face_boxes.csv")) as f:
        for r in csv.DictReader(f):
            truth.setdefault(r["file"], []).append(tuple(int(float(r[k])) for k in "xywh"))
    return truth


def truth_found(truth: list, boxes, iou: float = 0.5) -> int:
    """How many of the truth boxes some detected box overlaps with IoU >= iou."""
    from fer_batch.tracks import box_iou
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(truth) == 0 or len(boxes) == 0:
        return 0
    return int((box_iou(np.asarray(truth, np.float64), boxes) >= iou).any(axis=1).sum())


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


def delegating_fs(inner, **overrides):
    """A pyarrow filesystem that does what `inner` (the local disk or S3) does, but for the
    operations named in overrides (name -> function taking the handler's arguments): the
    tests' way to make a commit meet a full disk, or another process act between two steps
    of the code under test."""
    import pyarrow.fs as pafs

    class Handler(pafs.FileSystemHandler):
        def get_type_name(self):
            return "delegating"

        def normalize_path(self, path):
            return path

        def get_file_info(self, paths):
            return inner.get_file_info(paths)

        def get_file_info_selector(self, selector):
            return inner.get_file_info(selector)

        def create_dir(self, path, recursive):
            inner.create_dir(path, recursive=recursive)

        def delete_dir(self, path):
            inner.delete_dir(path)

        def delete_dir_contents(self, path, missing_dir_ok=False):
            inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

        def delete_root_dir_contents(self):
            raise OSError("not in these tests")

        def delete_file(self, path):
            inner.delete_file(path)

        def move(self, src, dest):
            inner.move(src, dest)

        def copy_file(self, src, dest):
            inner.copy_file(src, dest)

        def open_input_stream(self, path):
            return inner.open_input_stream(path)

        def open_input_file(self, path):
            return inner.open_input_file(path)

        def open_output_stream(self, path, metadata):
            return inner.open_output_stream(path, metadata=metadata)

        def open_append_stream(self, path, metadata):
            return inner.open_append_stream(path, metadata=metadata)

    handler = Handler()
    for name, fn in overrides.items():
        setattr(handler, name, fn)
    return pafs.PyFileSystem(handler)
