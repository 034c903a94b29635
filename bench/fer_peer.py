"""The peer: PyPI `fer` 25.10.3 in Haar mode (FER(mtcnn=False)), every frame.

Runs only in its own venv, bench/.venv-fer (never a fer-batch dependency):

    python -m venv bench/.venv-fer
    bench/.venv-fer/bin/pip install "fer==25.10.3" "opencv-contrib-python<5" "setuptools<81" \
        "torch==2.14.1"
    bench/.venv-fer/bin/python bench/fer_peer.py ARCHIVE... --out result.json

Videos go through fer.classes.Video.analyze(frequency=1) (every frame, no files
written); photos through FER.detect_emotions. torch is imported before tensorflow
(fer needs both; the other order crashes on import here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch  # noqa: F401  (must come before tensorflow)

VIDEO_EXT = (".mp4", ".avi", ".mov", ".mkv")
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def walk(paths):
    for p in paths:
        if os.path.isdir(p):
            for root, _, files in os.walk(p, followlinks=True):
                for f in sorted(files):
                    yield os.path.join(root, f)
        else:
            yield p


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("archive", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    import cv2
    from fer.classes import Video
    from fer.fer import FER
    detector = FER(mtcnn=False)
    setup_s = time.perf_counter() - t_start
    n = dict(videos=0, images=0, frames=0, faces=0)
    boxes = {}
    t0, c0 = time.perf_counter(), time.process_time()
    cwd = os.getcwd()
    tmp = tempfile.mkdtemp(prefix="fer_peer_")
    os.chdir(tmp)  # Video.analyze may write output files into the working directory
    try:
        for path in walk(a.archive):
            ext = os.path.splitext(path)[1].lower()
            if ext in VIDEO_EXT:
                video = Video(path, outdir=tmp)
                try:
                    raw = video.analyze(detector, display=False, frequency=1,
                                        save_frames=False, save_video=False,
                                        annotate_frames=False, zip_images=False)
                except IndexError:  # fer 25.10.3 fails formatting a video with no face in it
                    raw = []  # (after analysing every frame: the work is done and timed)
                    n["no_face_videos"] = n.get("no_face_videos", 0) + 1
                cap = cv2.VideoCapture(path)
                frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
                cap.release()
                n["videos"] += 1
                n["frames"] += frames
                n["faces"] += len(raw)  # one entry per face (frame rows repeat per face)
            elif ext in IMAGE_EXT:
                img = cv2.imread(path)
                if img is None:
                    continue
                found = detector.detect_emotions(img)
                boxes[os.path.basename(path)] = [list(map(int, f["box"])) for f in found]
                n["images"] += 1
                n["faces"] += len(found)
    finally:
        os.chdir(cwd)
    res = dict(setup_s=round(setup_s, 2), wall_s=round(time.perf_counter() - t0, 2),
               cpu_s=round(time.process_time() - c0, 2), **n, boxes=boxes,
               fer_haar=dict(scale_factor=detector._FER__scale_factor if hasattr(
                   detector, "_FER__scale_factor") else None))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
