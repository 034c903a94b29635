"""What runs on each Ray Train worker: the training loop and its pure pieces.

``train_loop_per_worker(config)`` builds the model (seeded: the same weights on every
worker, and the same run twice on one machine), restores --resume-from or Ray Train's own
checkpoint after a failure, then per epoch: ``train_epoch`` (augmentation, bf16 autocast,
the lr schedule, class weights) and ``score_epoch`` (the test split, sharded over the
workers), and reports the epoch row and (rank 0) a checkpoint. The driver side (data,
splits, Ray Train set-up, outputs) is train.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time

import numpy as np

from fer_batch.config import TRAIN_DEFAULTS, TrainConfig

PROGRESS_STEPS = 10  # rank 0 reports its step to the driver's progress bar this often
# --augment: random translation (pixels), rotation (degrees), scale, brightness/contrast
SHIFT_PX, ROTATE_DEG, SCALE_RANGE = 4, 10, (0.9, 1.1)
BRIGHTNESS, CONTRAST = 20, (0.8, 1.2)  # additive (grey levels) and multiplicative jitter
RESTART_CYCLES = (1 / 7, 2 / 7, 4 / 7)  # --schedule restarts: each cycle twice the last


def lr_at(step: int, total: int, base_lr: float, schedule: str = TRAIN_DEFAULTS.schedule
          ) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`.

    constant: base_lr (the paper). cosine: 5% linear warm-up, cosine to 0.
    onecycle: 30% cosine warm-up from base_lr/25, cosine down to base_lr/1e4 (OneCycleLR).
    restarts: cosine with warm restarts (SGDR): cycles of RESTART_CYCLES (1/7, 2/7, 4/7) of
    the run, each its own cosine (5% warm-up, then to 0), so a long run ends annealed at the
    end of each cycle and can stop there (--stop-after) with a finished model.
    """
    t = step / max(1, total)
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return base_lr * _cosine(t)
    if schedule == "restarts":
        for start, share in _cycles():
            if t < start + share or share == RESTART_CYCLES[-1]:
                return base_lr * _cosine(min(1.0, (t - start) / share))
    if schedule == "onecycle":
        lo, hi, end = base_lr / 25, base_lr, base_lr / 1e4
        if t < 0.3:
            return hi + (lo - hi) * 0.5 * (1 + math.cos(math.pi * t / 0.3))
        return end + (hi - end) * 0.5 * (1 + math.cos(math.pi * (t - 0.3) / 0.7))
    raise ValueError(f"unknown schedule {schedule!r}")


def _cosine(t: float) -> float:
    """Fraction of the peak rate at t in [0, 1]: 5% linear warm-up, then cosine to 0."""
    if t < 0.05:
        return t / 0.05
    return 0.5 * (1 + math.cos(math.pi * (t - 0.05) / 0.95))


def _cycles() -> list[tuple[float, float]]:
    """(start, share) of each --schedule restarts cycle, as fractions of the run."""
    starts = [sum(RESTART_CYCLES[:i]) for i in range(len(RESTART_CYCLES))]
    return list(zip(starts, RESTART_CYCLES))


def restart_ends(epochs: int) -> list[int]:
    """The epochs after which --schedule restarts is annealed (the ends of its cycles)."""
    return [round((start + share) * epochs) for start, share in _cycles()]


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


def augment_tensor(x, generator):
    """augment_faces for a batch that lives on the device (a GPU run keeps the data there):
    the same kinds of random transforms, drawn from `generator` (a torch.Generator on x's
    device): horizontal flip, shift (+-SHIFT_PX), scale (SCALE_RANGE), rotation
    (+-ROTATE_DEG) as one affine_grid + grid_sample with the border replicated, then
    brightness/contrast on the first (equalized) plane. x: (n, C, h, w) uint8 -> same."""
    import torch
    import torch.nn.functional as F
    n, _, h, w = x.shape

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=generator, device=x.device)

    angle = uniform(-ROTATE_DEG, ROTATE_DEG, n) * (math.pi / 180)
    scale = uniform(*SCALE_RANGE, n)
    flip = torch.where(torch.rand(n, generator=generator, device=x.device) < 0.5, -1.0, 1.0)
    theta = torch.empty(n, 2, 3, device=x.device)  # output -> input, normalized coordinates
    theta[:, 0, 0] = flip * torch.cos(angle) / scale
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = flip * torch.sin(angle) / scale
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, 0, 2] = uniform(-SHIFT_PX, SHIFT_PX, n) * (2 / w)
    theta[:, 1, 2] = uniform(-SHIFT_PX, SHIFT_PX, n) * (2 / h)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    gain = uniform(*CONTRAST, n, 1, 1)
    bias = uniform(-BRIGHTNESS, BRIGHTNESS, n, 1, 1)
    out[:, 0] = out[:, 0] * gain + bias + 128 * (1 - gain)  # a canny plane stays as warped
    return out.round_().clamp_(0, 255).to(torch.uint8)


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


def build_optimizer(net, cfg: TrainConfig):
    """Adam (the paper) or AdamW over the model's parameters, one fused kernel."""
    import torch
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt_cls(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                   fused=True)  # one kernel: 7x faster than the per-tensor loop on a CPU


STATE_FILE = "state.pt"  # a checkpoint folder's training state (docs/training.md)


def read_state(folder: str, device="cpu", mmap: bool = False,
               endpoint_url: str | None = None) -> dict:
    """A checkpoint folder's state.pt (local or s3://): weights, optimizer, epoch, history,
    RNG. Loaded with weights_only (reading a checkpoint runs no code from it); mmap (local
    files) reads only what is used; on S3 the file is read in one GET."""
    import io

    import torch

    from fer_batch import storage
    if storage.is_s3(folder):
        data = storage.read_bytes(f"{folder}/{STATE_FILE}", endpoint_url)
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    return torch.load(os.path.join(folder, STATE_FILE), map_location=device,
                      weights_only=True, mmap=mmap)


def latest_checkpoint(path: str, endpoint_url: str | None = None) -> str:
    """The checkpoint folder (state.pt) that --resume-from PATH names, local (`~` expanded)
    or s3://: PATH itself, or the newest checkpoint_* folder in PATH (a run's folder under
    --storage-path). Raises ValueError naming the folder when there is none."""
    import pyarrow.fs as pafs

    from fer_batch import storage
    s3 = storage.is_s3(path)
    path = path.rstrip("/") if s3 else os.path.expanduser(path)
    fs, root = storage.resolve(path, endpoint_url)

    def has_state(folder: str) -> bool:
        return fs.get_file_info(f"{folder}/{STATE_FILE}").type == pafs.FileType.File

    if has_state(root):
        return path
    is_folder = fs.get_file_info(root).type == pafs.FileType.Directory
    below = fs.get_file_info(pafs.FileSelector(root)) if is_folder else []
    found = sorted(i.base_name for i in below if i.type == pafs.FileType.Directory
                   and i.base_name.startswith("checkpoint_") and has_state(i.path))
    if not found:
        raise ValueError(f"--resume-from {path}: no state.pt there nor in a checkpoint_* "
                         "folder in it; pass a run folder under --storage-path or one of its "
                         "checkpoint_* folders")
    return f"{path}/{found[-1]}" if s3 else os.path.join(path, found[-1])


def restore(net, optimizer, resume_from: str | None, device,
            endpoint_url: str | None = None) -> tuple[int, list]:
    """Load the last reported epoch into net and optimizer (already on `device`), and the
    RNG state: Ray Train's checkpoint after a worker failure, else --resume-from (a run
    whose driver died or stopped at --stop-after; local or s3://). Returns (epochs done,
    history); (0, []) for a fresh run."""
    import ray.train
    import torch
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a worker failed: Ray Train restarts from its own checkpoint
        with checkpoint.as_directory() as d:
            state = read_state(d, device)
    elif resume_from:
        state = read_state(latest_checkpoint(resume_from, endpoint_url), device,
                           endpoint_url=endpoint_url)
    else:
        return 0, []
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])  # its tensors land on the params' device
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"].cpu())
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
    # sums stay on the device: no host sync per step (a GPU step would wait for each .item())
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    cuda = device.type == "cuda"
    on_device = x.device.type == device.type != "cpu"  # data already on the GPU
    generator = None
    if cfg.augment and on_device:  # augment there too, from a seed of this epoch's rng
        generator = torch.Generator(device=device)
        generator.manual_seed(int(rng.integers(2**62)))
    for s in range(steps):
        idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        xb, yb = x[idx], y[idx]
        if cfg.augment:
            xb = (augment_tensor(xb, generator) if on_device
                  else torch.from_numpy(augment_faces(xb.numpy(), rng)))
        if cuda and not on_device:  # pinned pages copy while the last step still runs
            xb, yb = xb.pin_memory(), yb.pin_memory()
        xb, yb = xb.to(device, non_blocking=cuda), yb.to(device, non_blocking=cuda)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(epoch * steps + s, total, cfg.lr, cfg.schedule)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb, weight=weight,
                               label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double() * len(idx)
        correct += (logits.detach().argmax(1) == yb).sum()
        on_step(s + 1, steps)
    return float(loss_sum), float(correct)


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
    from torch.utils.data import DistributedSampler

    cfg = TrainConfig(**{f.name: config[f.name] for f in dataclasses.fields(TrainConfig)})
    cpu_settings(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    say = console(rank, config.get("progress"), cfg.epochs)
    data = {k: torch.from_numpy(np.array(v))  # writable copies
            for k, v in ray.get(config["data_ref"]).items()}
    net, optimizer, start, history = start_model(cfg, config, device, say)
    weight = config.get("class_weight")
    weight = torch.tensor(weight, device=device) if weight is not None else None
    bf16 = use_bf16(cfg.precision, device.type)
    say("note", f"{world} worker(s), {torch.get_num_threads()} torch thread(s) each, "
                f"{'bf16 autocast' if bf16 else 'fp32'} on {device}")
    model = ray.train.torch.prepare_model(net)
    sampler = DistributedSampler(range(len(data["y_train"])), num_replicas=world, rank=rank,
                                 shuffle=True, seed=cfg.seed)
    total = math.ceil(len(sampler) / cfg.batch_size) * cfg.epochs  # the whole schedule
    for epoch in range(start, cfg.last_epoch):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        order = np.array(list(sampler))

        def on_step(step: int, steps: int) -> None:
            if step % PROGRESS_STEPS == 0:
                say("step", dict(epoch=epoch + 1, step=step, steps=steps))

        sums = train_epoch(
            model, optimizer, data["x_train"], data["y_train"], order, cfg=cfg, epoch=epoch,
            total=total, device=device, bf16=bf16, weight=weight,
            rng=np.random.default_rng([cfg.seed, rank, epoch]), on_step=on_step)
        scored = score_epoch(net, data["x_test"], data["y_test"], rank=rank, world=world,
                             device=device)
        row = epoch_row(epoch, reduce_sums(device, world, *sums, len(order), *scored),
                        len(data["y_test"]), optimizer.param_groups[0]["lr"],
                        time.perf_counter() - t0)
        history.append(row)
        say("epoch", row)
        report(net, optimizer, epoch + 1, history, rank)
    if start >= cfg.last_epoch and history:  # resumed at or past --stop-after: no epoch to
        report(net, optimizer, start, history, rank)  # run; hand the restored one back


def cpu_settings(threads: int) -> None:
    """Torch threads and denormal handling of a worker."""
    import torch
    if torch.get_num_threads() != threads:
        # Ray Train runs the worker function in a thread of its own, where set_num_threads
        # starts a second OpenMP team that fights the first: 10-20x slower steps here. Ray
        # already sets OMP_NUM_THREADS to the worker's CPUs, so normally this does not run.
        torch.set_num_threads(threads)
    # denormal floats (tiny gradients and Adam moments) run many times slower on x86 CPUs;
    # flushing them to zero changes no result that matters (BENCHMARKS.md section 12)
    torch.set_flush_denormal(True)


def console(rank: int, progress, epochs: int):
    """say(kind, payload): rank 0's progress for the driver's console, through the Ray queue
    `progress` (kinds "step", "epoch", "note"), else printed; other ranks say nothing."""
    def say(kind: str, payload) -> None:
        if rank != 0:
            return
        if progress is not None:
            progress.put_nowait((kind, payload))
        elif kind != "step":
            print(payload if kind == "note" else epoch_line(payload, epochs), flush=True)
    return say


def start_model(cfg: TrainConfig, config: dict, device, say):
    """(net on device, its optimizer, epochs done, history): the seeded model with
    --pretrained's weights, then the state restore() finds (a failure's checkpoint or
    --resume-from), else --start-epoch's place in the schedule."""
    import ray
    import torch

    from fer_batch.model import build_model
    torch.manual_seed(cfg.seed)  # same init everywhere (DDP also broadcasts rank 0's weights)
    net = build_model(**config["model_args"])
    if config.get("init_ref") is not None:
        net.load_state_dict(ray.get(config["init_ref"]))
    # NHWC convolutions: 1.7x faster training steps on a CPU (RESULTS.md), also good on GPUs.
    # On the device before the optimizer exists, so its restored state lands there too.
    net = net.to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(net, cfg)
    start, history = restore(net, optimizer, cfg.resume_from, device, cfg.endpoint_url)
    if start:
        say("note", f"resuming after epoch {start}")
    elif cfg.start_epoch:  # --start-epoch: init_ref's weights, a new optimizer
        start = cfg.start_epoch
        say("note", f"going on from --pretrained after epoch {start} of the schedule")
    return net, optimizer, start, history


def reduce_sums(device, world: int, *values) -> list[float]:
    """The values summed over the workers, on the device (NCCL reduces GPU tensors only)."""
    import torch
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def epoch_row(epoch: int, sums: list, n_test: int, lr: float, seconds: float) -> dict:
    """The history row of an epoch (0-based `epoch`) from the summed train loss, correct and
    count, then test loss and correct."""
    tr_loss, tr_correct, tr_n, te_loss, te_correct = sums
    return dict(epoch=epoch + 1, train_loss=tr_loss / tr_n, train_acc=tr_correct / tr_n,
                test_loss=te_loss / n_test if n_test else None,
                test_acc=te_correct / n_test if n_test else None, lr=lr, seconds=seconds)


def report(net, optimizer, epoch: int, history: list, rank: int) -> None:
    """ray.train.report of the epoch's row; rank 0 attaches the checkpoint (state.pt)."""
    import ray.train
    import torch
    if rank != 0:
        ray.train.report(history[-1])
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "epoch": epoch, "history": history, "torch_rng": torch.get_rng_state()},
                   os.path.join(d, STATE_FILE))
        ray.train.report(history[-1], checkpoint=ray.train.Checkpoint.from_directory(d))


def epoch_line(row: dict, epochs: int) -> str:
    """The one console line of a finished epoch."""
    test = (f"test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}%"
            if row.get("test_acc") is not None else "no test split")
    return (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} acc "
            f"{100 * row['train_acc']:.2f}%  {test}  lr {row['lr']:.2e}  {row['seconds']:.1f} s")
