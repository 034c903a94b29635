"""GPU benchmark: one prepared script for a lent GPU machine (runs on CPU with --tiny).

1. Inference: ResNet-50 48x48 faces/s for batch sizes 256..8192, fp32 / fp16 / bf16,
   NCHW vs channels_last, eager vs torch.compile. Synthetic uint8 faces, the model's own
   uint8 -> float scaling included; timed with CUDA events after warm-up.
2. Detection in the GPU pool (--detect-on pool): CenterFace (fer_batch/detect_torch.py)
   frames/s on 1080p frames downscaled to the default 576 side (576x352), batches 1..256,
   fp32 (the pool's precision), timed after warm-up.
3. End to end: `fer-batch annotate --device cuda` over an archive of links (CPU actors
   feeding the GPU actors), once with detection in the croppers (--detect-on cpu) and once
   in the GPU pool (--detect-on pool), with GPU utilization sampled by nvidia-smi every
   200 ms; CPU time per decoded frame gives the CPU:GPU ratio the job needs.

    .venv/bin/python bench/gpu.py --out bench/_work/gpu.json            # on the GPU box
    .venv/bin/python bench/gpu.py --tiny --out bench/_work/gpu_tiny.json  # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common as C  # noqa: E402
from fer_batch.model import build_model, save_checkpoint, EMOTIONS  # noqa: E402

BATCHES = (256, 512, 1024, 2048, 4096, 8192)  # faces per forward pass
DTYPES = ("fp32", "fp16", "bf16")
TINY_BATCHES = (4, 8)  # CPU smoke test of the same code paths
WARMUP_S, MEASURE_S = 2.0, 4.0  # per configuration on the GPU, seconds


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_config(model, device, batch: int, dtype: str, channels_last: bool,
                measure_s: float, warmup_s: float) -> dict:
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, 1, 48, 48),
                                                           dtype=np.uint8)).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)

    def step():
        if amp is not None:
            with torch.autocast(device.type, dtype=amp):
                return model(x)
        return model(x)

    t_end = time.perf_counter() + warmup_s
    step()
    while time.perf_counter() < t_end:
        step()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        step()
        n += 1
        if n >= 3 and time.perf_counter() - t0 >= measure_s:
            break
    sync(device)
    dt = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0
    return dict(batch=batch, dtype=dtype, channels_last=channels_last,
                faces_per_s=round(n * batch / dt, 1), ms_per_batch=round(1000 * dt / n, 2),
                max_mem_mib=round(mem))


def inference(device, tiny: bool, compile_modes=(False, True)) -> list[dict]:
    rows = []
    batches = TINY_BATCHES if tiny else BATCHES
    dtypes = ("fp32", "bf16") if tiny else DTYPES
    measure, warm = (0.2, 0.1) if tiny else (MEASURE_S, WARMUP_S)
    for compiled in compile_modes:
        for cl in (False, True):
            model = build_model().eval().to(device)
            if cl:
                model = model.to(memory_format=torch.channels_last)
            if compiled:
                model = torch.compile(model, mode="max-autotune-no-cudagraphs"
                                      if device.type == "cuda" else "default", dynamic=False)
            for dtype in dtypes:
                if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                    continue
                for bs in batches:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    try:
                        r = time_config(model, device, bs, dtype, cl, measure, warm)
                    except torch.OutOfMemoryError:
                        r = dict(batch=bs, dtype=dtype, channels_last=cl, faces_per_s=None,
                                 error="out of memory")
                        torch.cuda.empty_cache()
                    r.update(compiled=compiled, seconds_incl_compile=round(
                        time.perf_counter() - t0, 1))
                    rows.append(r)
                    C.log(f"gpu: {r}")
            del model
    return rows


DETECT_BATCHES = (1, 16, 64, 256)  # frames per CenterFace call in the pool
DETECT_SHAPE = (352, 576)  # a 1080p frame at the default --centerface-max-side 576, padded


def detection(device, tiny: bool) -> list[dict]:
    """CenterFace frames/s in the pool's code path (CenterFaceBatch) on device."""
    from fer_batch.config import ANNOTATE_DEFAULTS
    from fer_batch.detect_torch import CenterFaceBatch
    det = CenterFaceBatch(threshold=ANNOTATE_DEFAULTS.centerface_threshold,
                          device=device.type)
    rng = np.random.default_rng(0)
    rows = []
    for batch in (1, 4) if tiny else DETECT_BATCHES:
        smalls = [rng.integers(0, 256, DETECT_SHAPE, dtype=np.uint8) for _ in range(batch)]
        t_end = time.perf_counter() + (0.1 if tiny else WARMUP_S)
        det(smalls)
        while time.perf_counter() < t_end:
            det(smalls)
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < (0.2 if tiny else MEASURE_S):
            det(smalls)  # includes the copies to and from the GPU, as in the pool
            n += 1
        dt = time.perf_counter() - t0
        rows.append(dict(batch=batch, frames_per_s=round(n * batch / dt, 1),
                         ms_per_call=round(1000 * dt / n, 2)))
        C.log(f"gpu detection: {rows[-1]}")
    return rows


def gpu_sampler():
    """nvidia-smi in the background: utilization.gpu %, memory.used MiB every 200 ms."""
    try:
        return subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,"
             "nounits", "-lms", "200"], stdout=subprocess.PIPE, text=True)
    except OSError:
        return None


def end_to_end(device, tiny: bool, copies: int, detect_on: str = "cpu") -> dict:
    if not C.VIDEOS.exists():
        return dict(skipped=f"no shared data at {C.DATA}")
    ckpt = C.WORK / "model.pt"
    if not ckpt.exists():
        save_checkpoint(str(ckpt), build_model(), classes=EMOTIONS,
                        model_args=dict(num_classes=7, in_channels=1, stem="imagenet"),
                        channels=["equalized"])
    vids = [C.VIDEOS / "intel_head-pose-face-detection-male.mp4"] if tiny else None
    archive = C.build_archive("gpu_archive", 1 if tiny else copies, 1 if tiny else copies,
                              videos=vids)
    out_dir = C.WORK / f"out_gpu_{detect_on}"
    import shutil
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [C.PY, "-m", "fer_batch", "annotate", archive, "--model", ckpt, "--output", out_dir,
           "--device", "cuda" if device.type == "cuda" else "cpu", "--batch-size",
           "64" if tiny else "1024", "--detect-on", detect_on,
           "--follow-symlinks"]  # the archive links to ../shared (C.build_archive)
    if tiny:
        cmd += ["--limit", "3"]
    smi = gpu_sampler() if device.type == "cuda" else None
    res = C.run_measured(cmd, pss=False, log=C.WORK / f"gpu_e2e_{detect_on}.log")
    util = []
    if smi:
        smi.terminate()
        for ln in smi.communicate()[0].splitlines():
            try:
                u, m = (float(v) for v in ln.split(","))
                util.append((u, m))
            except ValueError:
                pass
    mf = sorted((out_dir / "_runs").glob("*.json")) if (out_dir / "_runs").exists() else []
    man = json.loads(mf[-1].read_text()) if mf else {}
    u = np.array([x[0] for x in util]) if util else np.zeros(0)
    frames = man.get("frames")  # decoded frames (images count one)
    return dict(detect_on=detect_on, detected_on=man.get("detected_on"),
                rc=res["rc"], wall_s=res["wall_s"], cpu_s=res["cpu_s"],
                cpu_ms_per_decoded_frame=round(1000 * res["cpu_s"] / frames, 2) if frames
                else None,
                processing_s=man.get("processing_seconds"), frames=man.get("frames"),
                faces=man.get("faces"), files_ok=man.get("files_ok"),
                faces_per_s=round(man["faces"] / man["processing_seconds"], 1)
                if man.get("processing_seconds") else None,
                gpu_util_mean=round(float(u.mean()), 1) if len(u) else None,
                gpu_util_p90=round(float(np.percentile(u, 90)), 1) if len(u) else None,
                gpu_busy_share=round(float((u > 0).mean()), 3) if len(u) else None,
                gpu_mem_peak_mib=max(x[1] for x in util) if util else None,
                cpus=os.cpu_count(), tail=res["tail"][-600:] if res["rc"] else "")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(C.WORK / "gpu.json"))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test, seconds")
    ap.add_argument("--copies", type=int, default=8, help="archive replication for part 2")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--no-compile", action="store_true",
                    help="leave out torch.compile (minutes of CPU for the CPU check)")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not a.tiny:
        C.log("gpu: no CUDA device; use --tiny for a CPU check")
        return 2
    info = dict(device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                torch=torch.__version__, cuda=torch.version.cuda, tiny=a.tiny,
                date=time.strftime("%Y-%m-%dT%H:%M:%S"))
    out = dict(info=info, inference=inference(device, a.tiny,
                                              (False,) if a.no_compile else (False, True)))
    out["detection"] = detection(device, a.tiny)
    if not a.skip_e2e:
        out["end_to_end"] = [end_to_end(device, a.tiny, a.copies, where)
                             for where in ("cpu", "pool")]
    C.save_json(Path(a.out), out)
    C.log(f"gpu: wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
