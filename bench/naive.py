"""The naive baseline: one process, one file, one frame and one face at a time.

Same libraries and functions as the pipeline (fer_batch.decode / preprocess / infer),
same thread settings as one pipeline actor (OpenCV 1 thread, torch 1 thread), no Ray,
inference one face per call. Each stage is timed in CPU seconds of this process, so the
same pass also gives the per-stage costs the stage ceiling is computed from.

    python bench/naive.py ARCHIVE --model CKPT --out result.json [detection flags]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fer_batch import decode, detect, preprocess, sources, storage  # noqa: E402
from fer_batch.infer import predict  # noqa: E402
from fer_batch.sink import top_labels  # noqa: E402
from fer_batch.model import load_checkpoint  # noqa: E402


class Clock:
    """CPU seconds per stage (process_time: counts decoder threads too)."""

    def __init__(self):
        self.s: dict[str, float] = {}
        self.t = time.process_time()

    def lap(self, stage: str):
        now = time.process_time()
        self.s[stage] = self.s.get(stage, 0.0) + now - self.t
        self.t = now


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("archive", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sample-fps", type=float, default=2.0)
    ap.add_argument("--every-n-frames", type=int, default=0)
    ap.add_argument("--detect-max-side", type=int, default=0)
    ap.add_argument("--scale-factor", type=float, default=1.1)
    ap.add_argument("--min-neighbors", type=int, default=5)
    ap.add_argument("--min-face", type=int, default=24)
    ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-frames", type=int, default=0,
                    help="stop each video after this many sampled frames (rate sampling)")
    ap.add_argument("--no-infer", action="store_true", help="skip the model (detection only)")
    a = ap.parse_args(argv)

    t_start = time.perf_counter()
    cv2.setNumThreads(1)  # as FaceCropper does
    torch.set_num_threads(1)  # as FacePredictor does on CPU
    model, meta = load_checkpoint(a.model)
    model = model.eval().to(memory_format=torch.channels_last)  # as FacePredictor does
    cascade = detect.load_cascade()
    kw = dict(scale_factor=a.scale_factor, min_neighbors=a.min_neighbors, min_face=a.min_face,
              max_side=a.detect_max_side,
              verifier=detect.load_cascade(detect.VERIFY_CASCADE_FILE) if a.verify
              else None)
    channels, size = tuple(meta["input"]["channels"]), meta["input"]["size"]
    setup_s = time.perf_counter() - t_start

    clock = Clock()
    rows, boxes_by_file = [], {}
    n = dict(images=0, videos=0, frames_decoded=0, frames_sampled=0, faces=0)
    t0 = time.perf_counter()
    entries = [e for e in sources.list_files(a.archive) if e["status"] == "pending"]
    clock.lap("list")

    def faces_of(uri, index, ts, gray):
        boxes = detect.detect_faces(gray, cascade, **kw)
        clock.lap("detect")
        for k, box in enumerate(boxes):
            crop = preprocess.crop_faces(gray, box[None], size)
            x = preprocess.prepare_faces(crop, channels, size)
            clock.lap("crop")
            label = ""
            if not a.no_infer:
                probs = predict(model, x, batch_size=1)
                label = top_labels(probs, meta["classes"])[0][0]
                clock.lap("infer")
            rows.append(dict(source=uri, frame_index=index, timestamp_s=ts, face_index=k,
                             x=int(box[0]), y=int(box[1]), w=int(box[2]), h=int(box[3]),
                             label=label))
        n["faces"] += len(boxes)
        return boxes

    for e in entries:
        uri = e["uri"]
        try:
            if e["media_type"] == "image":
                gray = decode.decode_image(storage.read_bytes(uri))
                clock.lap("image_decode")
                b = faces_of(uri, 0, None, gray)
                boxes_by_file[uri] = b.tolist()
                n["images"] += 1
            else:
                stats = decode.VideoStats()
                with storage.open_input(uri) as f:
                    it = decode.iter_frames(f, sample_fps=a.sample_fps, every_n=a.every_n_frames,
                                            stats=stats)
                    while True:
                        nxt = next(it, None)
                        clock.lap("video_decode")
                        if nxt is None:
                            break
                        faces_of(uri, *nxt)
                        if a.max_frames and stats.frames_sampled >= a.max_frames:
                            break
                n["videos"] += 1
                n["frames_decoded"] += stats.frames_decoded
                n["frames_sampled"] += stats.frames_sampled
        except decode.DecodeError as err:
            print(f"{uri}: {err}", file=sys.stderr)
    tbl = pa.Table.from_pylist(rows) if rows else pa.table({})
    pq.write_table(tbl, a.out + ".parquet")
    clock.lap("write")
    wall = time.perf_counter() - t0
    res = dict(setup_s=round(setup_s, 2), wall_s=round(wall, 2),
               cpu_s=round(sum(clock.s.values()), 2),
               stage_cpu_s={k: round(v, 3) for k, v in clock.s.items()}, **n,
               boxes={os.path.basename(k): v for k, v in boxes_by_file.items()})
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
