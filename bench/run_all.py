"""Run every benchmark and write BENCHMARKS.md's tables (bench/_work/results.json too).

    .venv/bin/python bench/run_all.py            # full: the sizes recorded in BENCHMARKS.md
    .venv/bin/python bench/run_all.py --quick    # minutes: tiny archives, same code paths
    .venv/bin/python bench/run_all.py --only e2e,scale   # some parts; others from results.json

Parts: stages (bench/stages.py), peer (fer vs fer-batch, every frame), same (naive loop vs
pipeline with the naive's detection settings, and the stage ceiling), defaults (shipped
defaults vs the naive loop on the 1080p/720p clips), scale (1x/4x/16x: memory and time per
item), small (10,000+ small files). Every run is a subprocess sampled with psutil (RSS/PSS
of the whole process tree, CPU seconds). The machine is shared: CPU seconds are the robust
measure; wall-clock ratios are only compared within one part, runs interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common as C  # noqa: E402
from bench import report  # noqa: E402

SMALL_VIDEOS = ("intel_head-pose-face-detection-male.mp4",
                "intel_head-pose-face-detection-female-and-male.avi",
                "intel_face-demographics-walking.mp4", "face_recognition_short_hamilton_clip.mp4")
STREET = "facenet_pytorch_street.mp4"  # the 1080p clip
# Same detection settings as the naive loop (full-resolution Haar, the videos' manifest hint)
FER_MIN_FACE = 50  # fer's FER(min_face_size=50): the smallest face its Haar cascade looks for
NAIVE_DETECT = dict(detect_max_side=0, scale_factor=1.1, min_neighbors=5, min_face=24)
SCALE_UNIT = SMALL_VIDEOS  # 428 frames (480x270, 640x360) + the 9 labelled photos per copy
# Full sizes: 2b is 3,424 frames + 270 images; 2a is every frame of all 8 shared videos.
SIZES = {  # part -> knobs, full and quick
    "full": dict(same_copies=8, same_photo_copies=30, same_videos=4, defaults_copies=8,
                 naive_max_frames=20, scale=(1, 4, 16), scale_photos=9, small_files=10_000,
                 peer_videos=None, repeats=1),
    "quick": dict(same_copies=1, same_photo_copies=1, same_videos=1, defaults_copies=1,
                  naive_max_frames=2,
                  scale=(1, 2),
                  scale_photos=1, small_files=300, peer_videos=SMALL_VIDEOS[:1], repeats=1),
}


def ckpt() -> Path:
    p = C.WORK / "model.pt"
    if not p.exists():
        from fer_batch import model as M
        M.save_checkpoint(str(p), M.build_model(), classes=M.EMOTIONS,
                          model_args=dict(num_classes=7, in_channels=1, stem="imagenet"),
                          channels=["equalized"])
    return p


def flags(d: dict) -> list:
    out = []
    for k, v in d.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def annotate(name: str, archive, extra: list, env: dict | None = None) -> dict:
    """`fer-batch annotate` as a subprocess; returns wall/CPU/memory + the run manifest."""
    out = C.WORK / f"out_{name}"
    shutil.rmtree(out, ignore_errors=True)
    tmp = C.WORK / "rt"  # short: Ray's socket paths must stay under 107 bytes
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [C.PY, "-m", "fer_batch", "annotate", *([archive] if isinstance(archive, (str, Path))
                                                   else archive),
           "--model", ckpt(), "--output", out,
           "--follow-symlinks", *extra]  # the archives link to ../shared (C.build_archive)
    cluster = dict(RAY_ADDRESS=RAY["address"]) if RAY.get("address") else {}
    res = C.run_measured(cmd, env=dict(RAY_TMPDIR=str(tmp), **cluster, **(env or {})),
                         log=C.WORK / f"log_{name}.txt",
                         extra_roots=C.ray_cluster_pids(tmp) if cluster else ())
    mf = sorted((out / "_runs").glob("*.json")) if (out / "_runs").exists() else []
    man = json.loads(mf[-1].read_text()) if mf else {}
    res.update(kind="fer-batch", name=name, processing_s=man.get("processing_seconds"),
               run_s=man.get("seconds"), frames=man.get("frames"), faces=man.get("faces"),
               files_ok=man.get("files_ok"), files_error=man.get("files_error"),
               spilled=spilled(tmp))
    res["images"] = count_images(out) if man else None
    res["boxes"] = photo_boxes(out) if man else {}
    return res


def count_images(out: Path) -> int:
    from fer_batch import readers
    t = readers.read_files(str(out))
    return int(sum(1 for m in t.column("media_type").to_pylist() if m == "image"))


def photo_boxes(out: Path) -> dict:
    """Boxes found in the first copy of each photo: file name -> [(x, y, w, h)]."""
    from fer_batch import readers
    t = readers.read_faces(str(out), columns=["source", "media_type", "x", "y", "w", "h", "run_id"])
    if t is None:
        return {}
    d = t.to_pydict()
    boxes: dict[str, list] = {}
    for i, src in enumerate(d["source"]):
        if d["media_type"][i] != "image":
            continue
        name = os.path.basename(src)
        key = (name, src)
        boxes.setdefault(key, []).append((d["x"][i], d["y"][i], d["w"][i], d["h"][i]))
    first: dict[str, list] = {}
    for (name, src), b in sorted(boxes.items(), key=lambda kv: kv[0][1]):
        first.setdefault(name, b)
    return first


def spilled(tmp: Path) -> int:
    """Bytes in Ray's spill folders under tmp (0 = no object-store spilling)."""
    total = 0
    for d in tmp.rglob("ray_spilled_objects*"):
        for f in d.rglob("*"):
            if f.is_file():
                total += f.stat().st_size
    return total


def naive(name: str, archive, extra: list) -> dict:
    out = C.WORK / f"naive_{name}.json"
    archives = [archive] if isinstance(archive, (str, Path)) else archive
    res = C.run_measured([C.PY, "bench/naive.py", *archives, "--model", ckpt(), "--out", out,
                          *extra], pss=False, log=C.WORK / f"log_naive_{name}.txt")
    if res["rc"] == 0:
        res.update(json.loads(out.read_text()))
    res.update(kind="naive", name=name)
    return res


def fer_peer(name: str, archive) -> dict:
    out = C.WORK / f"fer_{name}.json"
    if not C.FER_PY.exists():
        return dict(kind="fer", name=name, skipped="bench/.venv-fer missing (see fer_peer.py)")
    archives = [archive] if isinstance(archive, (str, Path)) else archive
    res = C.run_measured([C.FER_PY, "bench/fer_peer.py", *archives, "--out", out], pss=False,
                         env=dict(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES=""),
                         log=C.WORK / f"log_fer_{name}.txt")
    res["process_wall_s"] = res["wall_s"]  # whole process, imports and model load included
    if res["rc"] == 0:
        res.update(json.loads(out.read_text()))  # wall_s: fer's own loop, setup excluded
    res.update(kind="fer", name=name)
    return res


def part_stages(z, quick, fresh=False):
    """bench/stages.py; the detection sweep (about 200 CPU s here) is reused from
    WORK/det.json when present unless --fresh-detection."""
    sweep = C.WORK / "det.json"
    reuse = not quick and not fresh and sweep.exists()
    done = C.WORK / "stages_full.json"  # a finished full pass (bench/stages.py --out ...)
    if reuse and done.exists() and os.environ.get("BENCH_REUSE_STAGES"):
        out = json.loads(done.read_text())
        out["detection"] = json.loads(sweep.read_text())["detection"]
        return dict(run=dict(reused=str(done)), **out)
    only = ["--only", "video_decode,image_decode,crop_canny,inference"] if reuse else []
    res = C.run_measured([C.PY, "bench/stages.py", "--out", C.WORK / "stages.json",
                          *(["--quick"] if quick else []), *only], pss=False,
                         log=C.WORK / "log_stages.txt")
    out = json.loads((C.WORK / "stages.json").read_text())
    if reuse:
        out["detection"] = json.loads(sweep.read_text())["detection"]
        out["detection"]["measured"] = time.strftime(
            "%Y-%m-%d %H:%M", time.gmtime(sweep.stat().st_mtime)) + " UTC (bench/stages.py " \
            "--only detection, reused)"
    return dict(run=res, **out)


def part_fixed(z, quick):
    """Per-run fixed overhead: annotate over one 48x48 image (Ray start, actors, model)."""
    one = C.WORK / "one_image"
    shutil.rmtree(one, ignore_errors=True)
    one.mkdir(parents=True)
    (one / "a.png").symlink_to(sorted(C.CKPLUS.rglob("*.png"))[0])
    return annotate("fixed", one, [])


def part_peer(z, quick):
    """fer (Haar, every frame) vs fer-batch over every frame of the shared videos: with the
    shipped detection settings, the same without flip averaging (one classifier pass per
    face, as fer), with fer's own settings (every frame, faces of 50 px and more), and with
    the shipped 2 fps sampling; recall on the photos."""
    vids = [C.VIDEOS / v for v in z["peer_videos"]] if z["peer_videos"] else None
    arch = C.build_archive("peer", 1, 1, videos=vids)
    runs = []
    for r in range(z["repeats"]):
        order = [lambda: fer_peer("peer", arch),
                 lambda: annotate("peer_all_frames", arch, ["--all-frames"]),
                 lambda: annotate("peer_all_frames_noflip", arch,
                                  ["--all-frames", "--no-flip-average"]),
                 lambda: annotate("peer_fer_settings", arch,
                                  ["--all-frames", "--min-face", str(FER_MIN_FACE)]),
                 lambda: annotate("peer_defaults", arch, [])]
        for fn in (order if r % 2 == 0 else order[::-1]):
            runs.append(fn())
    return dict(archive=str(arch), runs=runs)


def part_same(z, quick):
    """Naive loop vs pipeline, same detection settings (full-resolution Haar, every frame)."""
    vids = [C.VIDEOS / v for v in SMALL_VIDEOS[:z["same_videos"]]]
    arch = C.build_archive("same", z["same_copies"], z["same_photo_copies"], videos=vids,
                           photos=C.gt_photos())
    det = flags(NAIVE_DETECT)
    runs = []
    for r in range(z["repeats"]):
        order = [lambda: naive("same", arch, ["--every-n-frames", "1", *det]),
                 lambda: annotate("same", arch, ["--all-frames", *det])]
        for fn in (order if r % 2 == 0 else order[::-1]):
            runs.append(fn())
    # the ceiling prices inference at the layout the pipeline ran (results written before
    # channels_last lack this key: NCHW)
    return dict(archive=str(arch), runs=runs, infer_layout="channels_last")  # as infer.py


def make_720p() -> Path:
    """The 1080p street clip re-encoded at 1280x720 (same frames), once, into WORK."""
    import av
    dst = C.WORK / "street_720p.mp4"
    if dst.exists():
        return dst
    with av.open(str(C.VIDEOS / STREET)) as src, av.open(str(dst), "w") as out:
        s = src.streams.video[0]
        o = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4",
                           rate=s.average_rate)
        o.width, o.height, o.pix_fmt = 1280, 720, "yuv420p"
        for fr in src.decode(s):
            for p in o.encode(fr.reformat(1280, 720, "yuv420p")):
                out.mux(p)
        for p in o.encode():
            out.mux(p)
    return dst


def part_defaults(z, quick):
    """Shipped defaults vs the naive loop (full resolution, every frame) on 1080p + 720p."""
    hd = make_720p()
    arch = C.build_archive("defaults", z["defaults_copies"], 1, videos=[C.VIDEOS / STREET, hd],
                           photos=C.gt_photos())
    runs = []
    for r in range(z["repeats"]):
        order = [lambda: naive("defaults_full", [C.VIDEOS / STREET, hd],
                               ["--every-n-frames", "1", "--max-frames",
                                str(z["naive_max_frames"]), *flags(NAIVE_DETECT)]),
                 lambda: annotate("defaults", arch, [])]
        for fn in (order if r % 2 == 0 else order[::-1]):
            runs.append(fn())
    return dict(archive=str(arch), runs=runs)


def part_scale(z, quick):
    """1x/4x/16x the same unit archive with shipped defaults: peak memory and time per item."""
    vids = [C.VIDEOS / v for v in SCALE_UNIT]
    photos = C.gt_photos()[:z["scale_photos"]]
    runs = []
    base = None
    for k in z["scale"]:
        root = C.WORK / f"scale_{k}x"
        shutil.rmtree(root, ignore_errors=True)
        for c in range(k):
            for sub, files in (("videos", vids), ("photos", photos)):
                d = root / f"c{c:03d}" / sub
                d.mkdir(parents=True)
                for f in files:
                    (d / f.name).symlink_to(f)
        runs.append(dict(multiple=k, **annotate(f"scale_{k}x", root, [])))
        if base is None:  # the same unit through the naive loop, shipped defaults
            base = naive("scale_unit", root, [])
    return dict(runs=runs, naive_unit=base)


def part_small(z, quick):
    """10,000+ CK+48 files: shipped default (32 images per task) vs one task per file."""
    root = C.build_small_files("small", z["small_files"])
    n = sum(1 for _ in root.rglob("*.png"))  # whole copies of CK+48: at least small_files
    one = annotate("small_one_per_task", root, ["--images-per-task", "1"])
    return dict(n=n, run=annotate("small", root, []), one_per_task=one)


RAY: dict = {}  # address of the one Ray cluster all annotate runs join (--shared-ray)


PARTS = dict(stages=part_stages, fixed=part_fixed, peer=part_peer, same=part_same,
             defaults=part_defaults, scale=part_scale, small=part_small)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help=f"comma list of {','.join(PARTS)}")
    ap.add_argument("--md", default=str(C.REPO / "BENCHMARKS.md"))
    ap.add_argument("--shared-ray", action="store_true",
                    help="start Ray once (ray start --head) and let every run join it; its "
                    "start time is reported as the fixed overhead's Ray part")
    a = ap.parse_args(argv)
    mode = "quick" if a.quick else "full"
    z = SIZES[mode]
    C.WORK.mkdir(parents=True, exist_ok=True)
    path = C.WORK / f"results_{mode}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["command"] = "bench/run_all.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results.setdefault("machine_before", {})
    if a.shared_ray:
        tmp = C.WORK / "rt"
        results["ray_start_s"] = round(C.start_ray(tmp), 1)
        RAY["address"] = (tmp / "ray_current_cluster").read_text().split()[0] \
            if (tmp / "ray_current_cluster").exists() else "auto"
        C.log(f"ray started in {results['ray_start_s']} s")
    try:
        run_parts(a, z, results, path)
    finally:
        if a.shared_ray:
            C.stop_ray(C.WORK / "rt")
    results["mode"] = mode
    C.save_json(path, results)
    Path(a.md).write_text(report.render(results, mode))
    C.log(f"wrote {a.md} and {path}")


def run_parts(a, z, results, path):
    for name, fn in PARTS.items():
        if a.only and name not in a.only.split(","):
            continue
        C.log(f"part {name}")
        state = C.machine_state()
        t0 = time.perf_counter()
        results[name] = dict(machine=state, **fn(z, a.quick))
        results[name]["part_wall_s"] = round(time.perf_counter() - t0, 1)
        results[name]["shared_ray"] = bool(RAY.get("address"))
        C.save_json(path, results)


if __name__ == "__main__":
    main()
