"""Stage ceilings, one core each, in CPU seconds (process_time), so that a busy shared
machine slows the wall clock but not the numbers: video decode (PyAV, per resolution and
threading mode), image decode, equalize + Haar detection (per resolution and detection
setting, with recall), crop/resize/Canny, ResNet-50 48x48 inference (per batch size and
thread count).

    python bench/stages.py --out bench/_work/stages.json [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common as C  # noqa: E402
from fer_batch import decode, detect, preprocess  # noqa: E402
from fer_batch.infer import predict  # noqa: E402
from fer_batch.model import build_model  # noqa: E402
from fer_batch.config import ANNOTATE_DEFAULTS  # noqa: E402

# Detection settings compared (scale_factor, min_neighbors, min_face, max_side, verify).
# "naive" is the full-resolution Haar of the naive loop and of the videos' manifest hint.
SETTINGS = {
    "naive: sf1.1 mn5 min24 full": (1.1, 5, 24, 0, True),
    "sf1.1 mn5 min24 1280": (1.1, 5, 24, 1280, True),
    "sf1.1 mn5 min24 960": (1.1, 5, 24, 960, True),
    "sf1.1 mn5 min24 640": (1.1, 5, 24, 640, True),
    "sf1.2 mn5 min24 full": (1.2, 5, 24, 0, True),
    "sf1.2 mn4 min24 960": (1.2, 4, 24, 960, True),
    "sf1.2 mn4 min32 960": (1.2, 4, 32, 960, True),
    "sf1.2 mn4 min24 640": (1.2, 4, 24, 640, True),
    "sf1.1 mn5 min24 full no-verify": (1.1, 5, 24, 0, False),
}
QUICK_SETTINGS = ("naive: sf1.1 mn5 min24 full", "sf1.2 mn4 min24 960")
INFER_BATCHES = (1, 16, 64, 256)
INFER_THREADS = (1, 2)


def cpu_timed(fn, *args, repeat=1, **kw):
    """(result, CPU seconds per call) of fn."""
    t = time.process_time()
    for _ in range(repeat):
        out = fn(*args, **kw)
    return out, (time.process_time() - t) / repeat


def video_decode(quick: bool) -> list[dict]:
    """Per video: CPU ms per frame to decode only and to decode + take the gray plane,
    one decoder thread; and the threading modes on the 1080p clip."""
    rows = []
    vids = C.media_files(C.VIDEOS)
    for v in vids[3:6] if quick else vids:
        for convert in (False, True):
            with av.open(str(v)) as c:
                s = c.streams.video[0]
                s.thread_type, s.thread_count = "SLICE", 1
                n, t, w0 = 0, time.process_time(), time.perf_counter()
                for fr in c.decode(s):
                    if convert:
                        fr.to_ndarray(format="gray")
                    n += 1
                cpu, wall = time.process_time() - t, time.perf_counter() - w0
            res = f"{s.codec_context.width}x{s.codec_context.height}"
            rows.append(dict(video=v.name, codec=s.codec_context.name, res=res, frames=n,
                             mode="1 thread" + (" + gray" if convert else ""),
                             cpu_ms_per_frame=round(1000 * cpu / n, 2),
                             fps_one_core=round(n / cpu, 1), wall_fps=round(n / wall, 1)))
    v = C.VIDEOS / "facenet_pytorch_street.mp4"
    for mode, threads in (("AUTO", 2), ("AUTO", 0), ("SLICE", 1)):
        with av.open(str(v)) as c:
            s = c.streams.video[0]
            s.thread_type, s.thread_count = mode, threads  # 0 = one per core
            n, t, w0 = 0, time.process_time(), time.perf_counter()
            for fr in c.decode(s):
                n += 1
            cpu, wall = time.process_time() - t, time.perf_counter() - w0
        rows.append(dict(video=v.name, codec="h264", res="1920x1080", frames=n,
                         mode=f"{mode}, {threads or 'all'} threads", cpu_ms_per_frame=round(1000 * cpu / n, 2),
                         fps_one_core=round(n / cpu, 1), wall_fps=round(n / wall, 1)))
    # iter_frames at the default 2 fps sampling, with --decode-threads 1 (the default) and 2:
    # CPU per decoded frame, best of 3 passes
    for threads in (1, 2):
        best, grays = None, []
        for _ in range(3):
            stats = decode.VideoStats()
            t = time.process_time()
            grays = [g for _, _, g in decode.iter_frames(str(v), sample_fps=2.0, stats=stats,
                                                         threads=threads)]
            cpu = time.process_time() - t
            best = cpu if best is None else min(best, cpu)
        n = stats.frames_decoded
        rows.append(dict(video=v.name, codec="h264", res="1920x1080", frames=n,
                         mode=f"iter_frames, sample 2 fps, --decode-threads {threads}",
                         cpu_ms_per_frame=round(1000 * best / n, 2),
                         fps_one_core=round(n / best, 1), wall_fps=None))
    # the croppers' share of detection in the GPU pool (--detect-on pool): the downscale
    t, reps = time.process_time(), 20
    for _ in range(reps):
        for g in grays:
            detect.centerface_small(g, ANNOTATE_DEFAULTS.centerface_max_side)
    cpu = (time.process_time() - t) / (reps * len(grays))
    rows.append(dict(video=v.name, codec="h264", res="1920x1080", frames=len(grays),
                     mode="pool: centerface_small to 576 (per sampled frame)",
                     cpu_ms_per_frame=round(1000 * cpu, 2), fps_one_core=round(1 / cpu, 1),
                     wall_fps=None))
    return rows


def _decode_passes(path: str, passes: int = 4) -> int:
    n = 0
    for _ in range(passes):
        with av.open(path) as c:
            s = c.streams.video[0]
            s.thread_type, s.thread_count = "SLICE", 1
            n += sum(1 for _ in c.decode(s))
    return n


def parallel_decode() -> dict:
    """Do the cores scale for decode? The 1080p clip decoded 4 times by one process, then by
    two processes at once (one thread each): frames/s of wall."""
    import multiprocessing as mp
    v = str(C.VIDEOS / "facenet_pytorch_street.mp4")
    rates = {}
    for k in (1, 2):
        t = time.perf_counter()
        with mp.get_context("spawn").Pool(k) as pool:
            n = sum(pool.map(_decode_passes, [v] * k))
        rates[k] = n / (time.perf_counter() - t)
    return dict(one_process_fps=round(rates[1], 1), two_processes_fps=round(rates[2], 1),
                scaling=round(rates[2] / rates[1], 2))


def flops() -> dict:
    """GFLOP per network call (torch's flop counter): CenterFace at the pool's 1080p input
    (1x3x352x576) and ResNet-50 at 1x1x48x48: the basis of the GPU rates docs/scaling.md
    assumes while no GPU has been measured."""
    from torch.utils.flop_counter import FlopCounterMode
    from fer_batch.detect_torch import load_centerface_torch
    out = {}
    for name, net, x in (("centerface_576x352", load_centerface_torch(),
                          torch.zeros(1, 3, 352, 576)),
                         ("resnet50_48x48", build_model().eval(), torch.zeros(1, 1, 48, 48))):
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            net(x)
        out[name] = round(fc.get_total_flops() / 1e9, 3)
    return out


def centerface_session(quick: bool) -> list[dict]:
    """CPU ms per frame of ``detect.detect_centerface`` (the shipped 576 side) with the ONNX
    Runtime session built two ways, alternating on the same frames: "weights as inputs" is
    how fer-batch built it until session 7 (only the input/output shapes removed: every
    weight stays a graph input, so ONNX Runtime folds no constants and fuses no batch norm);
    "shipped" is ``detect.load_centerface`` today. Also the largest output difference."""
    import onnx
    import onnxruntime as ort
    model = onnx.load(detect.centerface_path())
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.ClearField("shape")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sessions = {"weights as inputs (before)": ort.InferenceSession(
                    model.SerializeToString(), opts, providers=["CPUExecutionProvider"]),
                "shipped": detect.load_centerface()}
    street = [f for _, _, f in decode.iter_frames(str(C.VIDEOS / "facenet_pytorch_street.mp4"),
                                                   every_n=20)][:3 if quick else 5]
    small = [f for _, _, f in decode.iter_frames(
        str(C.VIDEOS / "face_recognition_short_hamilton_clip.mp4"), every_n=20)][:3 if quick else 5]
    frames = {"1920x1080": street, "1280x720": [cv2.resize(f, (1280, 720)) for f in street],
              "640x360": small}
    side = ANNOTATE_DEFAULTS.centerface_max_side
    rows = []
    for res, fs in frames.items():
        cpu = {name: [] for name in sessions}
        for _ in range(3):  # alternate, so drift of the machine falls on both
            for name, sess in sessions.items():
                for f in fs:
                    cpu[name].append(cpu_timed(detect.detect_centerface, f, sess, max_side=side)[1])
        blob, _ = detect.centerface_input(fs[0], side)
        outs = [s.run(list(detect.CENTERFACE_OUTPUTS), {"input.1": blob}) for s in sessions.values()]
        diff = max(float(np.abs(a - b).max()) for a, b in zip(*outs))
        ms = {name: round(1000 * float(np.median(v)), 2) for name, v in cpu.items()}
        before, after = ms.values()
        rows.append(dict(res=res, side=side, ms=ms, speedup=round(before / after, 2),
                         max_output_diff=diff))
    return rows


def image_decode() -> list[dict]:
    rows = []
    for p in C.media_files(C.PHOTOS) + sorted(C.CKPLUS.rglob("*.png"))[:50]:
        data = p.read_bytes()
        img, cpu = cpu_timed(decode.decode_image, data, repeat=3 if len(data) > 100_000 else 20)
        rows.append(dict(file=p.name, res=f"{img.shape[1]}x{img.shape[0]}",
                         kbytes=round(len(data) / 1024), cpu_ms=round(1000 * cpu, 2)))
    return rows


def frames_for_detection(per_video: int, quick: bool) -> list[tuple[str, np.ndarray]]:
    out = []
    for v in C.media_files(C.VIDEOS)[3:6] if quick else C.media_files(C.VIDEOS):
        frames = list(decode.iter_frames(str(v), every_n=1))
        idx = np.linspace(0, len(frames) - 1, per_video + 2)[1:-1].astype(int)
        out += [(f"{v.name}#{frames[i][0]}", frames[i][2]) for i in idx]
    return out


def detection(quick: bool) -> dict:
    """Per setting: CPU ms per frame (by resolution) and per photo, recall against the
    hand-labelled boxes, and the share of full-resolution (naive) detections found."""
    cascade = detect.load_cascade()
    verifier = detect.load_cascade(detect.VERIFY_CASCADE_FILE)
    frames = frames_for_detection(1 if quick else 2, quick)
    gt = C.ground_truth()
    photos = [(p.name, decode.decode_image(p.read_bytes())) for p in C.media_files(C.PHOTOS)
              if not quick or p.name in gt]
    names = QUICK_SETTINGS if quick else tuple(SETTINGS)
    found: dict[str, dict] = {}
    rows = []
    for name in names:
        sf, mn, mf, ms, ver = SETTINGS[name]
        kw = dict(scale_factor=sf, min_neighbors=mn, min_face=mf, max_side=ms,
                  verifier=verifier if ver else None)
        per_res: dict[str, list] = {}
        boxes = {}
        for key, g in frames + photos:
            b, cpu = cpu_timed(detect.detect_faces, g, cascade, **kw)
            boxes[key] = [tuple(x) for x in b.tolist()]
            kind = "photo" if "#" not in key else f"{g.shape[1]}x{g.shape[0]}"
            per_res.setdefault(kind, []).append(cpu)
        found[name] = boxes
        rows.append(dict(setting=name, ms_by_res={k: round(1000 * float(np.mean(v)), 1)
                                                 for k, v in per_res.items()},
                         gt=C.recall(boxes)))
    base = found[names[0]]
    for row in rows:
        b = found[row["setting"]]
        photo_keys = [k for k in base if "#" not in k]
        frame_keys = [k for k in base if "#" in k]
        for label, keys in (("of_full_res_photos", photo_keys), ("of_full_res_frames", frame_keys)):
            tot = sum(len(base[k]) for k in keys)
            hit = sum(C.match_count(base[k], b.get(k, [])) for k in keys)
            row[label] = dict(matched=hit, total=tot, share=round(hit / tot, 3) if tot else None)
        row["detections_photos"] = sum(len(b[k]) for k in photo_keys)
    return dict(rows=rows)


def classifier_bf16(quick: bool) -> dict:
    """Would bf16 autocast pay for the CPU classifier? The shipped model on FER2013's
    PublicTest faces (../shared/fer2013/val), with flip averaging as annotate runs it, in
    fp32 and under torch.autocast("cpu", bfloat16): CPU ms per face, label agreement and
    accuracy. Only meaningful on CPUs with bf16 kernels (AVX512-BF16 / AMX)."""
    from fer_batch import labeled
    from fer_batch.model import load_checkpoint
    from fer_batch.train_loop import use_bf16
    data = C.DATA.parent / "fer2013" / "val"
    if not data.is_dir():
        return dict(skipped=f"{data} not found")
    model, meta = load_checkpoint("default")
    model = model.float().eval().to(memory_format=torch.channels_last)
    classes = [labeled.canonical(c) for c in meta["classes"]]
    paths, labels, _ = labeled.list_labeled(str(data))
    keep = [i for i, lab in enumerate(labels) if lab in classes][:500 if quick else None]
    faces, ok, _ = labeled.load_faces([(str(data), paths[i]) for i in keep],
                                      channels=tuple(meta["input"]["channels"]))
    y = np.array([classes.index(labels[i]) for i, good in zip(keep, ok) if good])
    out = dict(faces=len(y), bf16_kernels=use_bf16("auto", "cpu"))
    probs = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            probs[name], cpu = cpu_timed(predict, model, faces, batch_size=256)
        out[name] = dict(ms_per_face=round(1000 * cpu / len(y), 2),
                         accuracy=round(float(np.mean(probs[name].argmax(1) == y)), 4))
    a, b = probs["fp32"].argmax(1), probs["bf16"].argmax(1)
    out.update(labels_differ=int((a != b).sum()), agreement=round(float(np.mean(a == b)), 4),
               max_prob_diff=round(float(np.abs(probs["fp32"] - probs["bf16"]).max()), 4))
    return out


def crop_canny() -> dict:
    g = decode.decode_image((C.PHOTOS / "facenet_multiface_group.jpg").read_bytes())
    boxes = np.array([[100, 100, 120, 120]] * 64, np.int32)
    crops, t_crop = cpu_timed(preprocess.crop_faces, g, boxes, repeat=20)
    _, t_prep = cpu_timed(preprocess.prepare_faces, crops, repeat=20)
    _, t_prep2 = cpu_timed(preprocess.prepare_faces, crops, ("equalized", "canny"), repeat=20)
    return dict(crop_resize_us_per_face=round(1e6 * t_crop / 64, 1),
                equalize_us_per_face=round(1e6 * t_prep / 64, 1),
                equalize_canny_us_per_face=round(1e6 * t_prep2 / 64, 1))


def inference(quick: bool) -> list[dict]:
    rows = []
    for layout in ("NCHW", "channels_last"):
        model = build_model().eval()
        if layout == "channels_last":  # what FacePredictor runs (fer_batch/infer.py)
            model = model.to(memory_format=torch.channels_last)
        for threads in INFER_THREADS[:1] if quick else INFER_THREADS:
            torch.set_num_threads(threads)
            for bs in INFER_BATCHES[:2] if quick else INFER_BATCHES:
                x = np.random.default_rng(0).integers(0, 255, (bs, 1, 48, 48), np.uint8)
                predict(model, x, batch_size=bs)  # warm-up
                reps = max(1, 256 // bs) if not quick else 1
                t, w0 = time.process_time(), time.perf_counter()
                for _ in range(reps):
                    predict(model, x, batch_size=bs)
                cpu, wall = time.process_time() - t, time.perf_counter() - w0
                n = bs * reps
                rows.append(dict(layout=layout, threads=threads, batch=bs,
                                 cpu_ms_per_face=round(1000 * cpu / n, 2),
                                 faces_per_core_s=round(n / cpu, 1),
                                 wall_faces_per_s=round(n / wall, 1)))
    torch.set_num_threads(1)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(C.WORK / "stages.json"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma list of parts to run")
    a = ap.parse_args(argv)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    parts = dict(video_decode=lambda: video_decode(a.quick), parallel_decode=parallel_decode,
                 flops=flops, centerface_session=lambda: centerface_session(a.quick),
                 image_decode=image_decode, classifier_bf16=lambda: classifier_bf16(a.quick),
                 detection=lambda: detection(a.quick), crop_canny=crop_canny,
                 inference=lambda: inference(a.quick))
    out = {}
    for name, fn in parts.items():
        if a.only and name not in a.only.split(","):
            continue
        C.log(f"stages: {name}")
        out[name] = fn()
    C.save_json(Path(a.out), out)


if __name__ == "__main__":
    main()
