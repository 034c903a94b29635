"""fit(cfg): labeled folders -> model.pt, metrics.json and plots, trained with Ray Train.

Data flow, top to bottom:

1. ``prepare_data``: ``labeled.list_many`` (class = first subfolder, through the expression
   vocabulary; several folders train on the union of their classes) and ``labeled.load_faces``
   (decode + --detect-faces crop + prepare_faces: the pixels annotate feeds the model);
   unreadable images are skipped and listed. Splits: --test-data (a held-out folder), a
   random stratified split (the paper), a subject-disjoint split or K folds by subject.
2. ``pretrained_state``: --pretrained none, imagenet, default (the shipped model) or a
   model.pt of ours (transfer learning: backbone kept, classifier rebuilt).
3. ``run_trainer``: the arrays go to the object store once; ``train_loop_per_worker``
   shards them with a DistributedSampler (no Ray Data: 48x48 faces are a few MB, FER2013's
   28,709 about 66 MB). Every epoch it reports metrics and a checkpoint; after a worker
   failure Ray restarts the workers (FailureConfig(max_failures=2)) and they resume from it;
   --resume-from continues a run whose driver died. Rank 0's progress reaches the driver's
   console through a Ray queue (``show_progress``).
4. ``train_split``: the driver scores the test split with ``infer.predict`` (the annotate
   code path) and writes model.pt, metrics.json, split.json, confusion_matrix.png,
   training_curves.png; ``summarize_folds`` for --folds.

Every option is a TrainConfig field (the CLI flags are generated from it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import time

import numpy as np

from fer_batch import labeled, preprocess, sources
from fer_batch.config import TrainConfig

FACE_SIZE = preprocess.FACE_SIZE  # model input side, pixels
MAX_FAILURES = 2  # worker failures Ray Train recovers from per run
PROGRESS_STEPS = 10  # rank 0 reports its step to the driver's progress bar this often
# --augment: random translation (pixels), rotation (degrees), scale, brightness/contrast
SHIFT_PX, ROTATE_DEG, SCALE_RANGE = 4, 10, (0.9, 1.1)
BRIGHTNESS, CONTRAST = 20, (0.8, 1.2)  # additive (grey levels) and multiplicative jitter


def channel_names(cfg) -> tuple:
    """--channels "equalized,canny" -> ("equalized", "canny"), checked against prepare_faces."""
    names = tuple(c.strip() for c in cfg.channels.split(",") if c.strip())
    bad = [c for c in names if c not in preprocess.CHANNEL_NAMES]
    if not names or bad:
        raise ValueError(f"--channels {cfg.channels!r}: a comma list of "
                         f"{', '.join(preprocess.CHANNEL_NAMES)}")
    return names


# --- 3. splits (pure) -----------------------------------------------------------------------

def split_indices(labels: np.ndarray, groups: np.ndarray | None, split: str = "random",
                  test_fraction: float = 0.2, seed: int = 0):
    """(train_idx, test_idx), sorted int arrays.

    random: stratified by class, test_fraction of the images (the paper's 80/20).
    subject: no group (subject) on both sides; StratifiedGroupKFold with
    k = round(1 / test_fraction) folds, first fold held out (so 0.2 -> 1/5 of the subjects,
    with class proportions kept as far as subjects allow).
    """
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split
    idx = np.arange(len(labels))
    if split == "random":
        tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                  stratify=labels)
        return np.sort(tr), np.sort(te)
    if split != "subject":
        raise ValueError(f"unknown split {split!r} (random or subject)")
    k = max(2, round(1 / test_fraction))
    tr, te = next(StratifiedGroupKFold(k, shuffle=True, random_state=seed)
                  .split(idx, labels, groups))
    return np.sort(tr), np.sort(te)


def fold_indices(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int = 0):
    """K subject-disjoint (train_idx, test_idx) pairs; every image is tested exactly once."""
    from sklearn.model_selection import StratifiedGroupKFold
    return [(np.sort(tr), np.sort(te)) for tr, te in StratifiedGroupKFold(
        folds, shuffle=True, random_state=seed).split(np.arange(len(labels)), labels, groups)]


def lr_at(step: int, total: int, base_lr: float, schedule: str = "constant") -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`.

    constant: base_lr (the paper). cosine: 5% linear warm-up, cosine to 0.
    onecycle: 30% cosine warm-up from base_lr/25, cosine down to base_lr/1e4 (OneCycleLR).
    """
    t = step / max(1, total)
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        if t < 0.05:
            return base_lr * t / 0.05
        return base_lr * 0.5 * (1 + math.cos(math.pi * (t - 0.05) / 0.95))
    if schedule == "onecycle":
        lo, hi, end = base_lr / 25, base_lr, base_lr / 1e4
        if t < 0.3:
            return hi + (lo - hi) * 0.5 * (1 + math.cos(math.pi * t / 0.3))
        return end + (hi - end) * 0.5 * (1 + math.cos(math.pi * (t - 0.3) / 0.7))
    raise ValueError(f"unknown schedule {schedule!r}")


def augment_faces(faces: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flip, shift (+-SHIFT_PX), scale (SCALE_RANGE), rotation
    (+-ROTATE_DEG), border replicated, then brightness/contrast jitter on every plane but
    edge planes. faces: shape = (n, C, h, w), uint8 -> same."""
    import cv2
    out = np.empty_like(faces)
    h, w = faces.shape[2:]
    for i, face in enumerate(faces):
        m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-ROTATE_DEG, ROTATE_DEG),
                                    rng.uniform(*SCALE_RANGE))
        m[:, 2] += rng.uniform(-SHIFT_PX, SHIFT_PX, 2)
        flip = rng.random() < 0.5
        gain, bias = rng.uniform(*CONTRAST), rng.uniform(-BRIGHTNESS, BRIGHTNESS)
        for c in range(faces.shape[1]):
            img = face[c][:, ::-1] if flip else face[c]
            warped = cv2.warpAffine(np.ascontiguousarray(img), m, (w, h),
                                    borderMode=cv2.BORDER_REPLICATE)
            if c == 0:  # the equalized gray plane; a canny plane stays binary
                warped = cv2.convertScaleAbs(warped, alpha=gain, beta=bias + 128 * (1 - gain))
            out[i, c] = warped
    return out


def class_weights(y: np.ndarray, num_classes: int, mode: str) -> np.ndarray | None:
    """Per-class loss weights (mean 1 over the classes present) for --class-weight."""
    if mode == "none":
        return None
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    power = {"sqrt": 0.5, "balanced": 1.0}[mode]
    w = np.where(counts > 0, 1.0 / np.maximum(counts, 1) ** power, 0.0)
    return (w / w[counts > 0].mean()).astype(np.float32)


def use_bf16(precision: str, device_type: str) -> bool:
    """--precision auto: bf16 autocast on CUDA, and on CPUs whose oneDNN has bf16 kernels
    (AVX512-BF16 / AMX: 1.5x faster ResNet-50 steps here, BENCHMARKS.md)."""
    import torch
    if precision != "auto":
        return precision == "bf16"
    if device_type == "cuda":
        return True
    return bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# --- 4. Ray Train ---------------------------------------------------------------------------

def build_optimizer(net, cfg: TrainConfig):
    """Adam (the paper) or AdamW over the model's parameters, one fused kernel."""
    import torch
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt_cls(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                   fused=True)  # one kernel: 7x faster than the per-tensor loop on a CPU


def restore(net, optimizer, resume_from: str | None) -> tuple[int, list]:
    """Load the last reported epoch into net and optimizer: Ray Train's checkpoint after a
    worker failure, else --resume-from (a run whose driver died). Returns (epochs done,
    history); (0, []) for a fresh run."""
    import ray.train
    import torch
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume_from:
        checkpoint = ray.train.Checkpoint.from_directory(resume_from)
    if not checkpoint:
        return 0, []
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["epoch"], state["history"]


def train_epoch(model, optimizer, x, y, order, *, cfg: TrainConfig, epoch: int, total: int,
                device, bf16: bool, weight, rng, on_step) -> tuple[float, float]:
    """One pass over this worker's shard `order` (indices into x, y) in batches of
    cfg.batch_size, with the scheduled learning rate; on_step(step, steps) after each.
    Returns (summed loss, correct)."""
    import torch
    import torch.nn.functional as F
    steps = math.ceil(len(order) / cfg.batch_size)
    model.train()
    loss_sum = correct = 0.0
    for s in range(steps):
        idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        xb = x[idx]
        if cfg.augment:
            xb = torch.from_numpy(augment_faces(xb.numpy(), rng))
        xb, yb = xb.to(device), y[idx].to(device)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(epoch * steps + s, total, cfg.lr, cfg.schedule)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb, weight=weight,
                               label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(idx)
        correct += (logits.argmax(1) == yb).sum().item()
        on_step(s + 1, steps)
    return loss_sum, correct


def score_epoch(net, x, y, *, rank: int, world: int, device) -> tuple[float, float]:
    """Summed loss and correct count of this worker's share of the test set, in full
    precision as annotate and evaluate score (the same accuracy). net: the unwrapped
    module, so no DDP collectives run and shards may differ in size."""
    import torch
    import torch.nn.functional as F

    from fer_batch import evaluate
    net.eval()
    loss_sum = correct = 0.0
    step = evaluate.PREDICT_BATCH
    with torch.inference_mode():
        for i in range(rank * step, len(y), world * step):
            logits = net(x[i:i + step].to(device)).float()
            yb = y[i:i + step].to(device)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += (logits.argmax(1) == yb).sum().item()
    return loss_sum, correct


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: DDP ResNet-50 on its shard; reports metrics and (rank 0) a
    checkpoint every epoch; resumes from ray.train.get_checkpoint() after a failure.

    config: dataclasses.asdict(TrainConfig) + data_ref (ObjectRef of
    {x_train, y_train, x_test, y_test}), init_ref (ObjectRef of a state_dict or None),
    model_args, threads, class_weight, progress (a ray.util.queue.Queue or None).
    """
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    from fer_batch.model import build_model

    cfg = TrainConfig(**{f.name: config[f.name] for f in dataclasses.fields(TrainConfig)})
    if torch.get_num_threads() != config["threads"]:
        # Ray Train runs this function in a thread of its own, where set_num_threads starts a
        # second OpenMP team that fights the first: 10-20x slower steps here. Ray already
        # sets OMP_NUM_THREADS to the worker's CPUs, so normally this does not run.
        torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    progress = config.get("progress")

    def say(kind: str, payload) -> None:  # rank 0's progress for the driver's console
        if rank != 0:
            return
        if progress is not None:
            progress.put_nowait((kind, payload))
        elif kind != "step":
            print(payload if kind == "note" else epoch_line(payload, cfg.epochs), flush=True)

    def reduce(*values):  # sums over workers
        t = torch.tensor(values, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    data = {k: torch.from_numpy(np.array(v))  # writable copies
            for k, v in ray.get(config["data_ref"]).items()}
    torch.manual_seed(cfg.seed)  # same init everywhere (DDP also broadcasts rank 0's weights)
    net = build_model(**config["model_args"])
    if config.get("init_ref") is not None:
        net.load_state_dict(ray.get(config["init_ref"]))
    # NHWC convolutions: 1.7x faster training steps on a CPU (RESULTS.md), also good on GPUs
    net = net.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(net, cfg)
    start, history = restore(net, optimizer, cfg.resume_from)
    if start:
        say("note", f"resuming after epoch {start}")
    weight = config.get("class_weight")
    weight = torch.tensor(weight, device=device) if weight is not None else None
    bf16 = use_bf16(cfg.precision, device.type)
    say("note", f"{world} worker(s), {torch.get_num_threads()} torch thread(s) each, "
                f"{'bf16 autocast' if bf16 else 'fp32'} on {device}")
    model = ray.train.torch.prepare_model(net)
    sampler = DistributedSampler(range(len(data["y_train"])), num_replicas=world, rank=rank,
                                 shuffle=True, seed=cfg.seed)
    total = math.ceil(len(sampler) / cfg.batch_size) * cfg.epochs
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        order = np.array(list(sampler))

        def on_step(step: int, steps: int) -> None:
            if step % PROGRESS_STEPS == 0:
                say("step", dict(epoch=epoch + 1, step=step, steps=steps))

        tr_loss, tr_correct = train_epoch(
            model, optimizer, data["x_train"], data["y_train"], order, cfg=cfg, epoch=epoch,
            total=total, device=device, bf16=bf16, weight=weight,
            rng=np.random.default_rng([cfg.seed, rank, epoch]), on_step=on_step)
        tr_loss, tr_correct, tr_n = reduce(tr_loss, tr_correct, len(order))
        te_loss, te_correct = reduce(*score_epoch(net, data["x_test"], data["y_test"],
                                                 rank=rank, world=world, device=device))
        te_n = len(data["y_test"])
        row = dict(epoch=epoch + 1, train_loss=tr_loss / tr_n, train_acc=tr_correct / tr_n,
                   test_loss=te_loss / te_n if te_n else None,
                   test_acc=te_correct / te_n if te_n else None,
                   lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - t0)
        history.append(row)
        say("epoch", row)
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch + 1, "history": history}, os.path.join(d, "state.pt"))
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(row)


def epoch_line(row: dict, epochs: int) -> str:
    """The one console line of a finished epoch."""
    test = (f"test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}%"
            if row.get("test_acc") is not None else "no test split")
    return (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} acc "
            f"{100 * row['train_acc']:.2f}%  {test}  lr {row['lr']:.2e}  {row['seconds']:.1f} s")


def show_progress(queue, epochs: int, done) -> None:
    """Driver thread: rank 0's messages from `queue` as one progress bar per epoch and one
    line per finished epoch, until `done` (a threading.Event) is set and the queue is empty."""
    from queue import Empty

    from fer_batch.console import progress_bar
    bar = None
    while True:
        try:
            kind, payload = queue.get(timeout=0.5)
        except Empty:
            if done.is_set():
                break
            continue
        if kind == "step":
            if bar is None:
                bar = progress_bar(payload["steps"], f"epoch {payload['epoch']}/{epochs}",
                                   "step")
            bar.update(payload["step"] - bar.n)
            continue
        if bar is not None:
            bar.close()
            bar = None
        print(payload if kind == "note" else epoch_line(payload, epochs), flush=True)
    if bar is not None:
        bar.close()


def cpu_threads(workers: int, cluster_cpus: float, node_cpus: float) -> int:
    """Torch threads (and CPUs reserved) per CPU worker: the cluster's CPUs shared among the
    workers, at most one node's worth, at least 1. 2 workers on an 8-core laptop get 4 each."""
    return max(1, min(int(cluster_cpus) // max(1, workers), int(node_cpus)))


def scaling(cfg: TrainConfig):
    """(ScalingConfig, torch threads per worker): --num-workers 0 = one worker per GPU, or
    2 CPU workers that share the CPUs between them."""
    import ray
    from ray.train import ScalingConfig
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = cfg.use_gpu == "yes" or (cfg.use_gpu == "auto" and gpus > 0)
    if use_gpu and gpus == 0 and cfg.use_gpu == "yes":
        raise RuntimeError("--use-gpu yes but the Ray cluster has no GPUs")
    n = cfg.num_workers or (gpus if use_gpu else 2)
    threads = 1
    if not use_gpu:
        nodes = [x["Resources"].get("CPU", 0) for x in ray.nodes() if x.get("Alive")]
        threads = cpu_threads(n, resources.get("CPU", 1), max(nodes, default=1))
    return ScalingConfig(num_workers=n, use_gpu=use_gpu,
                         resources_per_worker={"CPU": threads}), threads


def run_trainer(cfg: TrainConfig, x_train, y_train, x_test, y_test, model_args: dict,
                name: str, init_state: dict | None = None, class_weight=None):
    """Train with Ray Train. Returns (state_dict of the final model, per-epoch history)."""
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer
    storage = cfg.storage_path or os.path.join(os.path.abspath(cfg.output), "_ray_train")
    scaling_config, threads = scaling(cfg)
    config = dict(dataclasses.asdict(cfg), model_args=model_args, threads=threads,
                  data_ref=ray.put(dict(x_train=x_train, y_train=y_train, x_test=x_test,
                                        y_test=y_test)),
                  init_ref=ray.put(init_state) if init_state is not None else None,
                  class_weight=None if class_weight is None else class_weight.tolist())
    import threading

    from ray.util.queue import Queue
    config["progress"] = Queue(actor_options={"num_cpus": 0})
    done = threading.Event()
    shower = threading.Thread(target=show_progress, args=(config["progress"], cfg.epochs, done),
                              daemon=True)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config, scaling_config=scaling_config,
        run_config=RunConfig(storage_path=storage, name=name,
                             failure_config=FailureConfig(max_failures=MAX_FAILURES),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)))
    shower.start()
    try:
        result = trainer.fit()
    finally:
        done.set()
        shower.join(timeout=5)
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    if not sources.is_s3(storage):  # the run succeeded: model.pt replaces the ~300 MB state
        shutil.rmtree(os.path.join(storage, name), ignore_errors=True)
        if os.path.isdir(storage) and not os.listdir(storage):
            os.rmdir(storage)
    return state["model"], state["history"]


# --- 5. fit ---------------------------------------------------------------------------------

def pretrained_state(cfg, num_classes: int, in_channels: int) -> dict | None:
    """Initial weights for --pretrained: none, imagenet, default (the shipped model), a
    model.pt of ours (backbone reused, classifier rebuilt for num_classes) or a torchvision
    resnet50 weights file. Raises RuntimeError with the fix when the weights cannot be had
    (offline, missing file, another input shape)."""
    if cfg.pretrained == "none":
        return None
    from fer_batch.config import DEFAULT_MODEL, DEFAULT_MODEL_NAME
    from fer_batch.model import (CheckpointError, build_model, load_imagenet_weights,
                                 read_checkpoint)
    net = build_model(num_classes, in_channels, cfg.stem)
    source = DEFAULT_MODEL if cfg.pretrained == DEFAULT_MODEL_NAME else cfg.pretrained
    if source != "imagenet" and os.path.isfile(source) or sources.is_s3(source):
        try:
            ckpt = read_checkpoint(sources.read_bytes(source, cfg.endpoint_url), source)
        except CheckpointError as e:
            if "not a fer-batch checkpoint" not in str(e) and "unreadable" not in str(e):
                raise RuntimeError(f"--pretrained {e}") from None  # ours, but damaged
            ckpt = None  # not ours: a torchvision state_dict, tried below
        if ckpt is not None:
            args = ckpt["model_args"]
            if (args.get("in_channels"), args.get("stem")) != (in_channels, cfg.stem):
                raise RuntimeError(
                    f"--pretrained {source}: a model with {args.get('in_channels')} input "
                    f"plane(s) and the {args.get('stem')!r} stem; train with the same "
                    f"--channels ({','.join(ckpt['input']['channels'])}) and --stem")
            backbone = {k: v.float() for k, v in ckpt["state_dict"].items()
                        if not k.startswith("net.fc.")}
            net.load_state_dict(backbone, strict=False)
            return net.state_dict()
    load_imagenet_weights(net, source)
    return net.state_dict()


def check_config(cfg: TrainConfig) -> None:
    """Fail fast, before Ray starts: bad options, missing data, unavailable weights."""
    if cfg.split not in ("random", "subject"):
        raise ValueError(f"--split {cfg.split!r}: random or subject")
    if cfg.folds == 1 or cfg.folds < 0:
        raise ValueError("--folds must be 0 (one split) or at least 2")
    if not 0 < cfg.test_fraction < 1:
        raise ValueError("--test-fraction must be between 0 and 1")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ValueError("--epochs, --batch-size and --lr must be positive")
    if not cfg.data:
        raise ValueError("name at least one labeled folder (DATA)")
    if cfg.folds and cfg.test_data:
        raise ValueError("--folds and --test-data exclude each other")
    if not 0 <= cfg.crop_margin <= 1:
        raise ValueError("--crop-margin must be between 0 and 1 (a fraction of the face side)")
    lr_at(0, 1, cfg.lr, cfg.schedule)
    if cfg.resume_from and not sources.is_s3(cfg.resume_from) and not os.path.isfile(
            os.path.join(cfg.resume_from, "state.pt")):
        raise ValueError(f"--resume-from {cfg.resume_from}: no state.pt there; pass a "
                         "checkpoint_* folder from OUTPUT/_ray_train/<run>/")
    for folder in cfg.data + ((cfg.test_data,) if cfg.test_data else ()):
        labeled.list_labeled(folder, cfg.endpoint_url)
    pretrained_state(cfg, 2, len(channel_names(cfg)))


def _load(cfg: TrainConfig, items, labels, classes, channels):
    """Faces of labeled items -> (faces, y int64, items kept, skipped), with a progress bar."""
    from fer_batch.console import progress_bar
    bar = progress_bar(len(items), "loading faces", "image")
    faces, ok, skipped = labeled.load_faces(items, cfg.detect_faces, cfg.endpoint_url,
                                            channels, FACE_SIZE, cfg.crop_margin, bar.update)
    bar.close()
    for s in skipped:
        print(f"skipping unreadable image {s['path']}: {s['error']}", flush=True)
    y = np.array([classes.index(lab) for lab, good in zip(labels, ok) if good], np.int64)
    return faces, y, [it for it, good in zip(items, ok) if good], skipped


def prepare_data(cfg: TrainConfig, channels) -> dict:
    """The training folders (and --test-data) as arrays, with the splits to train.

    Returns dict: faces (n, C, 48, 48) uint8, y (n,) int64, classes, names (one per image,
    for split.json), skipped, groups (subject ids or None), splits [(train_idx, test_idx)],
    n_images (listed, before unreadable ones were dropped).
    """
    items, labels, classes = labeled.list_many(cfg.data, cfg.endpoint_url)
    faces, y, paths, skipped = _load(cfg, items, labels, classes, channels)
    groups = None
    if cfg.split == "subject" or cfg.folds:  # per folder: a subject never spans two folders
        groups = np.concatenate([
            np.array([f"{folder}:{g}" for g in labeled.read_subjects(
                folder, [p for f, p in paths if f == folder], cfg.subject_column,
                cfg.subject_pattern, cfg.endpoint_url)], dtype=object)
            for folder in cfg.data if any(f == folder for f, _ in paths)])
    if cfg.test_data:  # a held-out folder: train on all of DATA, test on it
        t_items, t_labels, t_classes = labeled.list_many((cfg.test_data,), cfg.endpoint_url)
        for c in sorted(set(t_classes) - set(classes)):
            print(f"{cfg.test_data}: class {c!r} is not among the training classes; left out",
                  flush=True)
        keep = [i for i, lab in enumerate(t_labels) if lab in classes]
        t_faces, t_y, t_paths, t_skipped = _load(
            cfg, [t_items[i] for i in keep], [t_labels[i] for i in keep], classes, channels)
        n = len(y)
        faces, y = np.concatenate([faces, t_faces]), np.concatenate([y, t_y])
        paths, skipped = paths + t_paths, skipped + t_skipped
        splits = [(np.arange(n), np.arange(n, len(y)))]
    elif cfg.folds:
        splits = fold_indices(y, groups, cfg.folds, cfg.seed)
    else:
        splits = [split_indices(y, groups, cfg.split, cfg.test_fraction, cfg.seed)]
    names = [p if len(cfg.data) == 1 and f == cfg.data[0] else f"{f}/{p}" for f, p in paths]
    return dict(faces=faces, y=y, classes=classes, names=names, skipped=skipped,
                groups=groups, splits=splits, n_images=len(labels))


def train_split(cfg: TrainConfig, data: dict, k: int, tr, te, *, channels, init_state,
                run_name: str, t_start: float) -> dict:
    """Train on data[tr], score data[te] the way annotate scores, write model.pt,
    metrics.json, split.json and the plots into the split's folder. Returns its metrics."""
    from fer_batch import evaluate, infer
    from fer_batch.model import build_model, save_checkpoint
    faces, y, classes, groups = data["faces"], data["y"], data["classes"], data["groups"]
    out = os.path.join(cfg.output, f"fold{k}") if cfg.folds else cfg.output
    os.makedirs(out, exist_ok=True)
    model_args = dict(num_classes=len(classes), in_channels=len(channels), stem=cfg.stem)
    t0 = time.perf_counter()
    state, history = run_trainer(cfg, faces[tr], y[tr], faces[te], y[te], model_args, run_name,
                                 init_state, class_weights(y[tr], len(classes),
                                                           cfg.class_weight))
    net = build_model(**model_args)
    net.load_state_dict(state)
    pred = infer.predict(net.eval(), faces[te], batch_size=evaluate.PREDICT_BATCH).argmax(1)
    m = evaluate.compute_metrics(y[te], pred, classes)
    m.update(split="subject-folds" if cfg.folds else cfg.split, fold=k if cfg.folds else None,
             folds=cfg.folds, n_train=len(tr), n_test=len(te), epochs=cfg.epochs,
             seed=cfg.seed, history=history, train_seconds=time.perf_counter() - t0,
             skipped=data["skipped"], train_config=dataclasses.asdict(cfg))
    summary = dict(data=list(cfg.data), test_data=cfg.test_data, classes=classes,
                   n_images=data["n_images"], n_used=len(y),
                   per_class={c: int((y == i).sum()) for i, c in enumerate(classes)},
                   skipped=data["skipped"], fold=m["fold"],
                   subjects=len(set(groups)) if groups is not None else None)
    m["model_id"] = save_checkpoint(
        os.path.join(out, "model.pt"), net, classes=classes, model_args=model_args,
        channels=channels, face_size=FACE_SIZE, crop_margin=cfg.crop_margin,
        train_config=dataclasses.asdict(cfg), data=summary,
        metrics={key: m[key] for key in evaluate.HEADLINE + ("n_train", "n_test")})
    m["wall_seconds"] = time.perf_counter() - t_start
    evaluate.write_report(out, m, history, f"fold {k}" if cfg.folds else f"{cfg.split} split")
    split_files = dict(train=[data["names"][i] for i in tr], test=[data["names"][i] for i in te])
    if groups is not None:
        split_files["test_subjects"] = sorted(set(groups[te]))
    with open(os.path.join(out, "split.json"), "w") as f:
        json.dump(split_files, f)
    print(f"{'fold %d: ' % k if cfg.folds else ''}test {evaluate.format_metrics(m)}",
          flush=True)
    return m


def summarize_folds(cfg: TrainConfig, runs: list, classes, skipped, t_start: float) -> dict:
    """--folds K: mean and std over the folds, the summed confusion matrix (every image is
    tested once), fold 0's model as OUTPUT/model.pt, OUTPUT/metrics.json."""
    from fer_batch import evaluate
    summary = dict(cv=evaluate.summarize_folds(runs), folds=runs, classes=classes,
                   split="subject-folds", n_folds=cfg.folds, epochs=cfg.epochs, seed=cfg.seed,
                   skipped=skipped, train_config=dataclasses.asdict(cfg),
                   wall_seconds=time.perf_counter() - t_start)
    for key in evaluate.HEADLINE:  # headline = mean over folds, so callers read one shape
        summary[key] = summary["cv"][key]["mean"]
    summary["confusion_matrix"] = np.sum([r["confusion_matrix"] for r in runs], axis=0).tolist()
    evaluate.plot_confusion(summary["confusion_matrix"], classes,
                            os.path.join(cfg.output, "confusion_matrix.png"),
                            f"{cfg.folds}-fold by subject, all test folds")
    shutil.copyfile(os.path.join(cfg.output, "fold0", "model.pt"),
                    os.path.join(cfg.output, "model.pt"))
    with open(os.path.join(cfg.output, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("cross-validation: " + "  ".join(
        f"{key} {100 * v['mean']:.2f}±{100 * v['std']:.2f}%" for key, v in summary["cv"].items()),
        flush=True)
    return summary


def fit(cfg: TrainConfig) -> dict:
    """Train on cfg.data and write the outputs to cfg.output (see module docstring).

    Returns the metrics dict written to metrics.json: test metrics of the single split, or
    with --folds K the mean/std over folds (``cv``) plus each fold's metrics (``folds``).
    """
    from fer_batch import evaluate
    t_start = time.perf_counter()
    check_config(cfg)
    channels = channel_names(cfg)
    data = prepare_data(cfg, channels)
    classes = data["classes"]
    init_state = pretrained_state(cfg, len(classes), len(channels))
    print(f"{', '.join(cfg.data)}: {len(data['y'])} images in {len(classes)} classes "
          f"({', '.join(classes)}), {len(data['skipped'])} skipped; "
          f"{len(data['splits'])} training run(s)", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = [train_split(cfg, data, k, tr, te, channels=channels, init_state=init_state,
                        run_name=f"fer-train-{stamp}" + (f"-fold{k}" if cfg.folds else ""),
                        t_start=t_start)
            for k, (tr, te) in enumerate(data["splits"])]
    if not cfg.folds:
        print(evaluate.format_confusion(runs[0]["confusion_matrix"], classes), flush=True)
        return runs[0]
    return summarize_folds(cfg, runs, classes, data["skipped"], t_start)
