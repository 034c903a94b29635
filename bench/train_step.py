"""Images/s of the real training loop on real FER2013 faces, by setting, each setting in a
fresh process: ``train_loop.train_epoch`` (augmentation, the lr schedule, the optimizer
step) and ``train_loop.score_epoch``, the functions a Ray Train worker runs.

    .venv/bin/python bench/train_step.py                       # the table for BENCHMARKS.md
    .venv/bin/python bench/train_step.py --images 512 --steps 2   # a quick look

The levers of issue 22: batch size (the learning rate scaled with it, so the same recipe),
one process with 2 torch threads against two DDP processes (gloo) with one each,
augmentation inside the loop (``augment_faces``, per image with OpenCV) against none, and
the cost of scoring the test split (which the campaign pays once an epoch). Ray Train's own
overhead is in the campaign's epoch times (MODEL.md), not here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FER_TRAIN = os.path.join(ROOT, "..", "shared", "fer2013", "train")
FER_VAL_IMAGES = 3589  # FER2013 PublicTest: what scoring costs once an epoch
FER_TRAIN_IMAGES = 28709
# name -> (batch, processes, threads each, augment, precision)
SETTINGS = {
    "batch 64, 1 process x 2 threads, augment (the shipped model's run)": (64, 1, 2, True, "auto"),
    "batch 256, 1 process x 2 threads, augment": (256, 1, 2, True, "auto"),
    "batch 256, 1 process x 2 threads, no augment": (256, 1, 2, False, "auto"),
    "batch 256, 2 processes x 1 thread (DDP, gloo), augment": (256, 2, 1, True, "auto"),
    "batch 512, 1 process x 2 threads, augment": (512, 1, 2, True, "auto"),
    "batch 256, 1 process x 2 threads, augment, bf16 autocast forced": (256, 1, 2, True, "bf16"),
}


def load(n: int, data: str) -> tuple[np.ndarray, np.ndarray]:
    """n real FER2013 training faces (every class), as the trainer holds them."""
    from fer_batch import labeled
    items, labels, classes = labeled.list_many([data])
    pick = np.random.default_rng(0).choice(len(items), n, replace=False)
    faces, ok, _ = labeled.load_faces([items[i] for i in pick])
    y = np.array([classes.index(labels[i]) for i in pick], np.int64)[ok]
    return faces, y


def worker(rank: int, world: int, args, batch: int, threads: int, augment: bool,
           precision: str, out: dict) -> None:
    import torch
    import torch.distributed as dist

    from fer_batch.config import TrainConfig
    from fer_batch.model import build_model
    from fer_batch.train_loop import build_optimizer, train_epoch, use_bf16
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                                rank=rank, world_size=world)
    faces, y = load(args.images, args.data)
    x, y = torch.from_numpy(faces), torch.from_numpy(y)
    cfg = TrainConfig(batch_size=batch, lr=1e-3 * batch / 64, augment=augment,
                      optimizer="adamw", weight_decay=0.05, label_smoothing=0.1,
                      schedule="cosine", precision=precision)
    torch.manual_seed(0)
    net = build_model(7, 1).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(net, cfg)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    bf16 = use_bf16(precision, "cpu")
    steps = args.steps + 1  # one warm-up step
    order_all = np.random.default_rng(1).permutation(len(y))[:steps * batch * world]
    order = order_all[rank::world]
    per = batch  # images per process per step

    def run(idx):
        return train_epoch(model, optimizer, x, y, idx, cfg=cfg, epoch=0, total=10 * steps,
                           device=torch.device("cpu"), bf16=bf16, weight=None,
                           rng=np.random.default_rng([0, rank]), on_step=lambda s, n: None)

    run(order[:per])  # warm-up: oneDNN primitives, allocator
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    run(order[per:])
    if world > 1:
        dist.barrier()
    dt = time.perf_counter() - t0
    if rank == 0:
        out.update(images_per_s=(steps - 1) * per * world / dt, bf16=bf16,
                   s_per_step=dt / (steps - 1))


def score(args) -> dict:
    import torch

    from fer_batch.model import build_model
    from fer_batch.train_loop import score_epoch
    torch.set_num_threads(2)
    faces, y = load(min(args.images, 1024), args.data)
    net = build_model(7, 1).to(memory_format=torch.channels_last)
    x, yt = torch.from_numpy(faces), torch.from_numpy(y)
    score_epoch(net, x[:256], yt[:256], rank=0, world=1, device=torch.device("cpu"))
    t0 = time.perf_counter()
    score_epoch(net, x, yt, rank=0, world=1, device=torch.device("cpu"))
    return dict(images_per_s=len(y) / (time.perf_counter() - t0))


def child(args) -> None:
    if args.setting == "score":
        print(json.dumps(score(args)))
        return
    batch, world, threads, augment, precision = SETTINGS[args.setting]
    if world == 1:
        out = {}
        worker(0, 1, args, batch, threads, augment, precision, out)
    else:
        import torch.multiprocessing as mp
        manager = mp.Manager()
        out = manager.dict()
        mp.spawn(worker, (world, args, batch, threads, augment, precision, out), nprocs=world)
        out = dict(out)
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2048, help="FER2013 faces loaded")
    p.add_argument("--steps", type=int, default=4, help="timed steps per setting")
    p.add_argument("--data", default=FER_TRAIN, help="FER2013's train folder")
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.setting:
        child(args)
        return
    env = dict(os.environ, PYTHONPATH=ROOT)
    base = [sys.executable, __file__, "--images", str(args.images), "--steps",
            str(args.steps), "--data", args.data]
    res = subprocess.run(base + ["--setting", "score"], env=env, capture_output=True,
                         text=True, timeout=900)
    score_ips = json.loads(res.stdout.strip().splitlines()[-1])["images_per_s"]
    score_s = FER_VAL_IMAGES / score_ips
    print(f"scoring (score_epoch, fp32, 2 threads): {score_ips:.0f} images/s = "
          f"{score_s:.0f} s per FER2013 val pass\n")
    print("| setting | s per step | train images/s | FER2013 epoch, s (train + score) |")
    print("|---|---|---|---|")
    for name in SETTINGS:
        res = subprocess.run(base + ["--setting", name], env=env, capture_output=True,
                             text=True, timeout=1800)
        if res.returncode:
            print(f"| {name} | failed: {res.stderr.strip().splitlines()[-1][:120]} | | |")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        epoch = FER_TRAIN_IMAGES / r["images_per_s"] + score_s
        print(f"| {name}{'' if r['bf16'] else ' (fp32)'} | {r['s_per_step']:.2f} | "
              f"{r['images_per_s']:.0f} | {epoch:.0f} |", flush=True)


if __name__ == "__main__":
    main()
