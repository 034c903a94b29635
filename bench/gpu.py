"""The prepared command for a lent GPU (issue 25): everything it measures, saved after each
part, in about 8 minutes. It needs only torch-level code (the GPU machine has no Ray and no
PyAV): fer_batch.model / infer / train_loop / detect_torch, numpy, onnxruntime.

    # here, once: FER2013 as one compact archive in an ignored folder that travels
    .venv/bin/python bench/gpu.py --pack              # -> .gpu/fer2013.npz (size printed)
    # on the device (`run`, carry [".gpu"]; default.pt left out of the tree, see below):
    python3 bench/gpu.py --out $OUT
    # back here: the trained model from its parts
    .venv/bin/python bench/gpu.py --join FILES_AT     # -> FILES_AT/model.pt
    # the same code on this CPU with tiny sizes, < 3 minutes (the test suite runs it)
    .venv/bin/python bench/gpu.py --smoke --out /tmp/gpu-smoke

Parts, each written to OUT as soon as it ends (a killed run keeps what it finished):

1. env.json: versions, the GPU's name.
2. infer.json: the classifier's faces/s through the real ``infer.predict_logits`` path
   (bf16 autocast + channels_last on CUDA) by batch size, against plain fp32 NCHW, and one
   ``torch.compile`` point.
3. detect.json: the detector pool's network (``detect_torch.CenterFaceBatch``) in frames/s
   at 576x352, fp32 against bf16 channels_last, and its boxes against ONNX Runtime's on
   the first faces of the archive. Needs onnx2torch (carry its wheel: device README).
4. agree.json: GPU against CPU on the same faces with the same weights: labels and
   probabilities.
5. train.json + model.part*: FER2013 at GPU speed without Ray, through the project's own
   ``train_loop.train_epoch`` / ``score_epoch`` / ``build_optimizer``: the data on the GPU
   once (augmented there, ``augment_tensor``), batch 256, bf16, channels_last, AdamW and
   the cosine schedule of the campaign (MODEL.md), the number of epochs set from the first
   steps' speed to end inside --train-seconds, scored on FER2013 val every epoch, the model
   written once at the end as fp16, in parts of at most 15 MiB.

The tree that travels is at most 64 MiB: leave ``fer_batch/models/default.pt`` (45 MiB) out
for that call (``git update-index --skip-worktree`` is not enough: move it aside, e.g.
``mv fer_batch/models/default.pt /tmp/`` before `run` and back after), and carry ``.gpu``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FER = os.path.join(ROOT, "..", "shared", "fer2013")
ARCHIVE = os.path.join(ROOT, ".gpu", "fer2013.npz")
PART_BYTES = 15 * 2**20  # files back from the device: at most 16 MiB each
FULL = dict(infer_batches=(256, 1024, 4096), measure_s=1.5, detect_batches=(1, 16, 64),
            train_seconds=240.0, batch=256, compare=512, boxes=16, compile=True,
            probe_steps=20)
SMOKE = dict(infer_batches=(8, 16), measure_s=0.2, detect_batches=(1,),
             train_seconds=4.0, batch=32, compare=16, boxes=2, compile=False,
             probe_steps=2)
RECIPE = dict(lr=1e-3, optimizer="adamw", weight_decay=0.05, label_smoothing=0.1,
              augment=True, schedule="cosine")  # the campaign's (MODEL.md), batch aside


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save(out: str, name: str, obj: dict) -> None:
    with open(os.path.join(out, name), "w") as f:
        json.dump(obj, f, indent=2, default=str)
    log(f"wrote {name}")


# --- the archive ---------------------------------------------------------------------------

def pack(path: str = ARCHIVE, fer: str = FER) -> None:
    """FER2013 train + val as uint8 arrays in one compressed .npz (faces as annotate's
    loader gives them: labeled.load_faces, equalized)."""
    from fer_batch import labeled
    arrays = {}
    for part in ("train", "val"):
        items, labels, classes = labeled.list_many([os.path.join(fer, part)])
        faces, ok, _ = labeled.load_faces(items)
        arrays[f"x_{part}"] = faces
        arrays[f"y_{part}"] = np.array([classes.index(lab) for lab, good in zip(labels, ok)
                                        if good], np.int64)
        arrays["classes"] = np.array(classes)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB "
          f"({len(arrays['y_train'])} train + {len(arrays['y_val'])} val faces)")


def load_archive(path: str, smoke: bool) -> dict:
    if os.path.isfile(path):
        with np.load(path) as z:
            d = {k: z[k] for k in z.files}
    elif smoke:  # no archive here: random faces of the right shape
        rng = np.random.default_rng(0)
        d = dict(x_train=rng.integers(0, 256, (256, 1, 48, 48), dtype=np.uint8),
                 y_train=rng.integers(0, 7, 256), x_val=rng.integers(0, 256, (64, 1, 48, 48),
                                                                     dtype=np.uint8),
                 y_val=rng.integers(0, 7, 64), classes=np.array(
                     ["anger", "disgust", "fear", "happiness", "neutral", "sadness",
                      "surprise"]))
    else:
        raise SystemExit(f"{path}: no archive; make it here with `bench/gpu.py --pack` and "
                         "carry .gpu")
    if smoke:
        d.update(x_train=d["x_train"][:256], y_train=d["y_train"][:256],
                 x_val=d["x_val"][:64], y_val=d["y_val"][:64])
    return d


# --- 1. env --------------------------------------------------------------------------------

def env(device) -> dict:
    import torch
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0],
                cpus=os.cpu_count(), device=str(device),
                date=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
    from importlib import metadata
    for mod, dist in (("numpy", "numpy"), ("onnxruntime", "onnxruntime"), ("onnx", "onnx"),
                      ("onnx2torch", "onnx2torch"), ("cv2", "opencv-python-headless"),
                      ("ray", "ray"), ("av", "av")):
        try:
            __import__(mod)
            info[mod] = metadata.version(dist)
        except Exception as e:  # absent on the GPU machine: ray, av (and onnx2torch)
            info[mod] = f"absent ({type(e).__name__})"
    return info


# --- 2. the classifier ---------------------------------------------------------------------

def timed(fn, measure_s: float, sync) -> tuple[float, int]:
    """Seconds per call of fn after one warm-up call, over at least measure_s and 3 calls."""
    fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < measure_s:
        fn()
        n += 1
    sync()
    return (time.perf_counter() - t0) / n, n


def inference(device, p: dict) -> dict:
    import torch

    from fer_batch import infer
    from fer_batch.model import build_model
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    rows = []
    real = build_model().eval().to(device).to(memory_format=torch.channels_last)
    plain = build_model().eval().to(device)
    for batch in p["infer_batches"]:
        faces = rng.integers(0, 256, (batch, 1, 48, 48), dtype=np.uint8)
        s, _ = timed(lambda: infer.predict_logits(real, faces, device, batch,
                                                  flip_average=False), p["measure_s"], sync)
        rows.append(dict(path="infer.predict_logits (bf16 autocast + channels_last on CUDA)",
                         batch=batch, faces_per_s=round(batch / s, 1)))
        x = torch.from_numpy(faces).to(device)
        with torch.inference_mode():
            s, _ = timed(lambda: plain(x), p["measure_s"], sync)
        rows.append(dict(path="fp32 NCHW, on-device input", batch=batch,
                         faces_per_s=round(batch / s, 1)))
        log(f"infer: {rows[-2]} | {rows[-1]}")
    batch = p["infer_batches"][-1]
    if not p["compile"]:
        return dict(rows=rows, compile="left out (--smoke: inductor takes minutes on a CPU)")
    try:  # one compiled point: the real path's model, compiled once for this shape
        compiled = torch.compile(real, dynamic=False)
        faces = rng.integers(0, 256, (batch, 1, 48, 48), dtype=np.uint8)
        t0 = time.perf_counter()
        infer.predict_logits(compiled, faces, device, batch, flip_average=False)
        compile_s = time.perf_counter() - t0
        s, _ = timed(lambda: infer.predict_logits(compiled, faces, device, batch,
                                                  flip_average=False), p["measure_s"], sync)
        rows.append(dict(path="torch.compile of the real path", batch=batch,
                         faces_per_s=round(batch / s, 1), compile_s=round(compile_s, 1)))
    except Exception as e:  # a compiler missing on the machine is a finding, not a crash
        rows.append(dict(path="torch.compile of the real path", batch=batch,
                         error=f"{type(e).__name__}: {str(e)[:200]}"))
    log(f"infer: {rows[-1]}")
    return dict(rows=rows)


# --- 3. the detector pool's network --------------------------------------------------------

def detection(device, p: dict, data: dict) -> dict:
    import torch

    from fer_batch import detect
    from fer_batch.config import ANNOTATE_DEFAULTS
    from fer_batch.detect_torch import CenterFaceBatch, torch_detector_installed
    if not torch_detector_installed():
        return dict(skipped="onnx2torch is not installed: carry its wheel (device README)")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    threshold = ANNOTATE_DEFAULTS.centerface_threshold
    pool = CenterFaceBatch(threshold=threshold, device=device.type)
    rng = np.random.default_rng(0)
    rows = []
    for batch in p["detect_batches"]:
        smalls = [rng.integers(0, 256, (352, 576), dtype=np.uint8) for _ in range(batch)]
        s, _ = timed(lambda: pool(smalls), p["measure_s"], sync)
        rows.append(dict(precision="fp32 NCHW (the pool)", batch=batch,
                         frames_per_s=round(batch / s, 1)))
        if device.type != "cuda":  # bf16 is a GPU question (18x slower on this CPU)
            continue
        x = torch.from_numpy(np.stack(smalls)).to(device).float()[:, None].expand(-1, 3, -1, -1)
        x = x.contiguous(memory_format=torch.channels_last)
        net = pool.net.to(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16):
            s, _ = timed(lambda: [t.float().cpu() for t in net(x)[:3]], p["measure_s"], sync)
        rows.append(dict(precision="bf16 autocast, channels_last", batch=batch,
                         frames_per_s=round(batch / s, 1)))
        log(f"detect: {rows[-1]}")
    # boxes against ONNX Runtime's, as the croppers finish them, on real faces: each val
    # face grown 4x into a 576x352 frame (the pool's network on the device, ORT on the CPU)
    session = detect.load_centerface(threads=1)
    d = ANNOTATE_DEFAULTS
    boxes = []
    for face in data["x_val"][:p["boxes"], 0]:
        frame = np.zeros((352, 576), np.uint8)
        frame[80:272, 192:384] = np.kron(face, np.ones((4, 4), np.uint8))
        small, scale = detect.centerface_small(frame, d.centerface_max_side, d.min_face)
        (cand, scores), = pool([small])
        mine = detect.centerface_boxes(cand, scores, scale, frame.shape, threshold=threshold,
                                       min_face=d.min_face)
        ref = detect.detect_centerface(frame, session, max_side=d.centerface_max_side,
                                       threshold=threshold, min_face=d.min_face)
        diff = (float(np.abs(np.asarray(mine, float) - np.asarray(ref, float)).max())
                if len(mine) == len(ref) and len(ref) else None)
        boxes.append(dict(device_boxes=len(mine), onnxruntime_boxes=len(ref),
                          max_px_diff=diff))
    return dict(rows=rows, boxes=boxes,
                boxes_agree=all(b["device_boxes"] == b["onnxruntime_boxes"] and
                                (b["max_px_diff"] or 0) <= 2 for b in boxes))


# --- 4. GPU against CPU --------------------------------------------------------------------

def agreement(device, p: dict, data: dict) -> dict:
    import torch

    from fer_batch import infer
    from fer_batch.model import build_model
    torch.manual_seed(0)
    cpu = build_model().eval()
    dev = build_model().eval()
    dev.load_state_dict(cpu.state_dict())
    dev = dev.to(device).to(memory_format=torch.channels_last)
    faces = data["x_val"][:p["compare"]]
    a = infer.predict(cpu, faces, torch.device("cpu"))
    b = infer.predict(dev, faces, device)
    return dict(n=len(faces), same_label=float((a.argmax(1) == b.argmax(1)).mean()),
                max_abs_prob_diff=float(np.abs(a - b).max()),
                note="random weights (default.pt does not travel); distinct val faces")


# --- 5. training ---------------------------------------------------------------------------

def train(device, p: dict, data: dict, out: str) -> dict:
    import torch

    from fer_batch.config import TrainConfig
    from fer_batch.model import build_model, save_checkpoint, export_half
    from fer_batch.train_loop import build_optimizer, score_epoch, train_epoch, use_bf16
    x_tr, y_tr = (torch.from_numpy(data[k]).to(device) for k in ("x_train", "y_train"))
    x_va, y_va = (torch.from_numpy(data[k]).to(device) for k in ("x_val", "y_val"))
    classes = [str(c) for c in data["classes"]]
    bf16 = use_bf16("auto", device.type)
    torch.manual_seed(0)
    net = build_model(len(classes)).to(device, memory_format=torch.channels_last)
    cfg = TrainConfig(batch_size=p["batch"], **RECIPE)
    steps = math.ceil(len(y_tr) / cfg.batch_size)
    probe = TrainConfig(**dict(dataclasses.asdict(cfg), lr=0.0))  # speed only: weights kept
    opt = build_optimizer(net, probe)
    n_probe = min(steps, p["probe_steps"])  # steps timed to plan the epochs
    t0 = time.perf_counter()
    train_epoch(net, opt, x_tr, y_tr, np.arange(n_probe * cfg.batch_size) % len(y_tr),
                cfg=probe, epoch=0, total=1, device=device, bf16=bf16, weight=None,
                rng=np.random.default_rng(0), on_step=lambda s, n: None)
    epoch_s = (time.perf_counter() - t0) / n_probe * steps * 1.1  # + scoring
    epochs = max(1, int(p["train_seconds"] / epoch_s))
    log(f"train: {epoch_s:.1f} s an epoch -> {epochs} epochs in {p['train_seconds']:.0f} s")
    cfg = dataclasses.replace(cfg, epochs=epochs)
    opt = build_optimizer(net, cfg)
    history, t_start = [], time.perf_counter()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = np.random.default_rng([0, epoch]).permutation(len(y_tr))
        loss, correct = train_epoch(net, opt, x_tr, y_tr, order, cfg=cfg, epoch=epoch,
                                    total=steps * epochs, device=device, bf16=bf16,
                                    weight=None, rng=np.random.default_rng([0, epoch]),
                                    on_step=lambda s, n: None)
        te_loss, te_correct = score_epoch(net, x_va, y_va, rank=0, world=1, device=device)
        history.append(dict(epoch=epoch + 1, train_loss=loss / len(y_tr),
                            train_acc=correct / len(y_tr), test_loss=te_loss / len(y_va),
                            test_acc=te_correct / len(y_va), lr=opt.param_groups[0]["lr"],
                            seconds=time.perf_counter() - t0))
        log(f"train: {history[-1]}")
        if time.perf_counter() - t_start > 1.5 * p["train_seconds"]:
            break  # slower than the probe said: end with what is done
    full = os.path.join(out, "model-fp32.pt.tmp")
    save_checkpoint(full, net.cpu(), classes=classes, channels=["equalized"],
                    model_args=dict(num_classes=len(classes), in_channels=1, stem="imagenet"),
                    crop_margin=TrainConfig().crop_margin, train_config=dataclasses.asdict(cfg),
                    metrics=dict(accuracy=history[-1]["test_acc"]),
                    data=dict(note="FER2013 train, bench/gpu.py on a lent GPU"))
    half = os.path.join(out, "model-fp16.pt.tmp")
    model_id = export_half(full, half)
    os.remove(full)
    parts = split_file(half, out)
    os.remove(half)
    return dict(epochs=len(history), planned_epochs=epochs, batch=cfg.batch_size, bf16=bf16,
                images=len(y_tr), history=history, model_id=model_id, parts=parts,
                train_seconds=round(time.perf_counter() - t_start, 1))


def split_file(path: str, out: str) -> list[str]:
    """path -> out/model.part000, part001, ... of at most PART_BYTES each."""
    names = []
    with open(path, "rb") as f:
        while chunk := f.read(PART_BYTES):
            names.append(f"model.part{len(names):03d}")
            with open(os.path.join(out, names[-1]), "wb") as g:
                g.write(chunk)
    return names


def join(folder: str) -> str:
    """folder/model.part* -> folder/model.pt (checked by the real checkpoint reader)."""
    from fer_batch.model import read_checkpoint
    data = b"".join(open(p, "rb").read() for p in sorted(glob.glob(f"{folder}/model.part*")))
    ckpt = read_checkpoint(data, f"{folder}/model.part*")
    path = os.path.join(folder, "model.pt")
    with open(path, "wb") as f:
        f.write(data)
    print(f"{path}: model_id {ckpt['model_id']}, {len(data) / 2**20:.1f} MiB")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "bench", "_work",
                                                                        "gpu")))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, < 3 minutes")
    ap.add_argument("--pack", action="store_true", help="write .gpu/fer2013.npz here")
    ap.add_argument("--join", metavar="FOLDER", help="rejoin FOLDER/model.part* here")
    ap.add_argument("--archive", default=ARCHIVE)
    ap.add_argument("--train-seconds", type=float, default=None)
    a = ap.parse_args(argv)
    if a.pack:
        pack(a.archive)
        return 0
    if a.join:
        join(a.join)
        return 0
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    if device.type == "cpu" and not a.smoke:
        print("bench/gpu.py: no CUDA GPU here; --smoke runs the same code on the CPU",
              file=sys.stderr)
        return 2
    p = dict(SMOKE if a.smoke else FULL)
    if a.train_seconds is not None:
        p["train_seconds"] = a.train_seconds
    if a.smoke:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    os.makedirs(a.out, exist_ok=True)
    save(a.out, "env.json", env(device))
    data = load_archive(a.archive, a.smoke)
    for name, part in (("infer.json", lambda: inference(device, p)),
                       ("detect.json", lambda: detection(device, p, data)),
                       ("agree.json", lambda: agreement(device, p, data)),
                       ("train.json", lambda: train(device, p, data, a.out))):
        t0 = time.perf_counter()
        try:
            result = part()
        except Exception as e:  # one part failing keeps the others
            import traceback
            result = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        result["seconds"] = round(time.perf_counter() - t0, 1)
        save(a.out, name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
