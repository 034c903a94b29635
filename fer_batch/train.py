"""fit(cfg): labeled folder -> model.pt, metrics.json and plots, trained with Ray Train.

Data flow, top to bottom:

1. ``list_labeled``: class = first subfolder under DATA (sorted names = logit order).
2. ``load_faces``: decode_image (+ largest_face with --detect-faces) + prepare_faces,
   the same pixels ``annotate`` feeds the model. Unreadable images are skipped and listed.
3. ``read_subjects`` / ``split_indices`` / ``fold_indices``: random stratified split (the
   paper), subject-disjoint split, or K folds by subject. Pure numpy + sklearn.
4. ``run_trainer``: the arrays go to the object store once; ``train_loop_per_worker``
   shards them with a DistributedSampler (no Ray Data: a labeled folder of 48x48 faces is a
   few MB). Every epoch it reports metrics and a checkpoint; after a worker failure Ray
   restarts the workers (FailureConfig(max_failures=2)) and they resume from it.
5. The driver scores the test split with ``infer.predict`` (the annotate code path) and
   writes model.pt, metrics.json, split.json, confusion_matrix.png, training_curves.png.

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

from fer_batch import decode, preprocess, sources
from fer_batch.config import TrainConfig

FACE_SIZE = preprocess.FACE_SIZE  # model input side, pixels
LABELS_FILE = "labels.csv"  # optional per-image metadata at the root of DATA (path, subject)
MAX_FAILURES = 2  # worker failures Ray Train recovers from per run
SHIFT_PX, ROTATE_DEG = 4, 10  # --augment: random translation (pixels) and rotation (degrees)


def channel_names(cfg) -> tuple:
    """--channels "equalized,canny" -> ("equalized", "canny"), checked against prepare_faces."""
    names = tuple(c.strip() for c in cfg.channels.split(",") if c.strip())
    bad = [c for c in names if c not in preprocess.CHANNEL_NAMES]
    if not names or bad:
        raise ValueError(f"--channels {cfg.channels!r}: a comma list of "
                         f"{', '.join(preprocess.CHANNEL_NAMES)}")
    return names


# --- 1-2. data ------------------------------------------------------------------------------

def list_labeled(data: str, endpoint_url: str | None = None):
    """Images of a labeled folder. Returns (paths relative to data with '/' separators,
    class name per image, sorted class names). Hidden files and non-images are ignored."""
    import pyarrow.fs as pafs
    fs, root = sources.resolve(data, endpoint_url)
    root = root.rstrip("/")
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"training data {data}: not a folder")
    paths = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = info.path[len(root) + 1:].replace("\\", "/")
        parts = rel.split("/")
        if (info.type == pafs.FileType.File and len(parts) >= 2
                and not any(p.startswith(".") for p in parts)
                and sources.media_type(rel) == "image"):
            paths.append(rel)
    paths.sort()
    labels = [p.split("/")[0] for p in paths]
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"training data {data}: need images in at least 2 class subfolders, "
                         f"found {classes or 'none'}")
    return paths, labels, classes


def load_faces(data: str, paths, detect_faces: bool = False, endpoint_url: str | None = None,
               channels=preprocess.CHANNELS, size: int = FACE_SIZE):
    """Decode and prepare images.

    Returns (faces np.ndarray shape = (n_ok, C, size, size) uint8, ok bool mask over paths,
    skipped [{path, error}]). A file that cannot be read or decoded is skipped, not fatal.
    """
    cascade = preprocess.load_cascade() if detect_faces else None
    base = data.rstrip("/")
    crops, ok, skipped = [], [], []
    for rel in paths:
        try:
            gray = decode.decode_image(sources.read_bytes(f"{base}/{rel}", endpoint_url))
            if cascade is not None:
                gray = preprocess.largest_face(gray, cascade)
            crops.append(preprocess.prepare_faces(gray[None], channels, size)[0])
            ok.append(True)
        except (decode.DecodeError, OSError, ValueError) as e:
            print(f"skipping unreadable image {rel}: {e}", flush=True)
            skipped.append({"path": rel, "error": str(e)})
            ok.append(False)
    faces = np.stack(crops) if crops else np.zeros((0, len(channels), size, size), np.uint8)
    return faces, np.array(ok, bool), skipped


def read_subjects(data: str, paths, column: str = "subject", pattern: str = r"^([A-Za-z]+\d*)[._]",
                  endpoint_url: str | None = None) -> np.ndarray:
    """Subject id per image: labels.csv (columns path, COLUMN; path relative to data) when it
    lists the file, else the first regex group matched on the file name. Raises ValueError
    for files with neither."""
    import csv
    import io
    table = {}
    try:
        text = sources.read_bytes(f"{data.rstrip('/')}/{LABELS_FILE}", endpoint_url).decode()
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("path") and row.get(column):
                table[row["path"].replace("\\", "/").removeprefix("./")] = row[column]
    except (FileNotFoundError, OSError):
        pass
    rx, out, missing = re.compile(pattern), [], []
    for rel in paths:
        m = rx.search(rel.rsplit("/", 1)[-1])
        subject = table.get(rel) or (m.group(1) if m else None)
        out.append(subject)
        if subject is None:
            missing.append(rel)
    if missing:
        raise ValueError(f"no subject for {len(missing)} images (e.g. {missing[0]}): add them to "
                         f"{LABELS_FILE} (columns path,{column}) or set --subject-pattern")
    return np.array(out, dtype=object)


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
    """Random horizontal flip, shift (+-SHIFT_PX) and rotation (+-ROTATE_DEG), border replicated.
    faces: shape = (n, C, h, w), uint8 -> same."""
    import cv2
    out = np.empty_like(faces)
    h, w = faces.shape[2:]
    for i, face in enumerate(faces):
        m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-ROTATE_DEG, ROTATE_DEG), 1.0)
        m[:, 2] += rng.uniform(-SHIFT_PX, SHIFT_PX, 2)
        flip = rng.random() < 0.5
        for c in range(faces.shape[1]):
            img = face[c][:, ::-1] if flip else face[c]
            out[i, c] = cv2.warpAffine(np.ascontiguousarray(img), m, (w, h),
                                       borderMode=cv2.BORDER_REPLICATE)
    return out


# --- 4. Ray Train ---------------------------------------------------------------------------

def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: DDP ResNet-50 on its shard; reports metrics and (rank 0) a
    checkpoint every epoch; resumes from ray.train.get_checkpoint() after a failure.

    config: dataclasses.asdict(TrainConfig) + data_ref (ObjectRef of
    {x_train, y_train, x_test, y_test}), init_ref (ObjectRef of a state_dict or None),
    model_args, threads.
    """
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data import DistributedSampler

    from fer_batch.model import build_model

    cfg = TrainConfig(**{f.name: config[f.name] for f in dataclasses.fields(TrainConfig)})
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    data = {k: np.array(v) for k, v in ray.get(config["data_ref"]).items()}  # writable copies
    torch.manual_seed(cfg.seed)  # same init everywhere (DDP also broadcasts rank 0's weights)
    net = build_model(**config["model_args"])
    if config.get("init_ref") is not None:
        net.load_state_dict(ray.get(config["init_ref"]))
    # NHWC convolutions: 1.7x faster training steps on a CPU (RESULTS.md), also good on GPUs
    net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=True)  # one kernel: 7x faster than the loop on a CPU
    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()  # set when Ray restarts workers after a failure
    if checkpoint is None and cfg.resume_from:  # a run whose driver died (same data, seed)
        checkpoint = ray.train.Checkpoint.from_directory(cfg.resume_from)
    if checkpoint:  # continue where the last report left off
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["epoch"], state["history"]
        if rank == 0:
            print(f"resuming from epoch {start}", flush=True)
    model = ray.train.torch.prepare_model(net)
    x_tr, y_tr = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    x_te, y_te = torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"])
    sampler = DistributedSampler(range(len(y_tr)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed)
    steps = math.ceil(len(sampler) / cfg.batch_size)
    total = steps * cfg.epochs

    def reduce(*values):  # sums over workers
        t = torch.tensor(values, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        order = np.array(list(sampler))
        rng = np.random.default_rng([cfg.seed, rank, epoch])
        model.train()
        loss_sum = correct = 0.0
        for s in range(steps):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            xb = x_tr[idx]
            if cfg.augment:
                xb = torch.from_numpy(augment_faces(xb.numpy(), rng))
            xb, yb = xb.to(device), y_tr[idx].to(device)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(epoch * steps + s, total, cfg.lr, cfg.schedule)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
        tr_loss, tr_correct, tr_n = reduce(loss_sum, correct, len(order))
        net.eval()  # the unwrapped module: no DDP collectives, shards may differ in size
        te_loss = te_correct = 0.0
        with torch.inference_mode():
            for i in range(rank * 256, len(y_te), world * 256):
                logits = net(x_te[i:i + 256].to(device))
                yb = y_te[i:i + 256].to(device)
                te_loss += F.cross_entropy(logits, yb, reduction="sum").item()
                te_correct += (logits.argmax(1) == yb).sum().item()
        te_loss, te_correct = reduce(te_loss, te_correct)
        te_n = len(y_te)
        row = dict(epoch=epoch + 1, train_loss=tr_loss / tr_n, train_acc=tr_correct / tr_n,
                   test_loss=te_loss / max(1, te_n) if te_n else None,
                   test_acc=te_correct / te_n if te_n else None,
                   lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - t0)
        history.append(row)
        if rank == 0:
            test = (f"test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}%"
                    if te_n else "no test split")
            print(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc "
                  f"{100 * row['train_acc']:.2f}%  {test}  lr {row['lr']:.2e}  "
                  f"{row['seconds']:.1f} s", flush=True)
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch + 1, "history": history}, os.path.join(d, "state.pt"))
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(row)


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
                name: str, init_state: dict | None = None):
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
                  init_ref=ray.put(init_state) if init_state is not None else None)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config, scaling_config=scaling_config,
        run_config=RunConfig(storage_path=storage, name=name,
                             failure_config=FailureConfig(max_failures=MAX_FAILURES),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    if not sources.is_s3(storage):  # the run succeeded: model.pt replaces the ~300 MB state
        shutil.rmtree(os.path.join(storage, name), ignore_errors=True)
        if os.path.isdir(storage) and not os.listdir(storage):
            os.rmdir(storage)
    return state["model"], state["history"]


# --- 5. fit ---------------------------------------------------------------------------------

def pretrained_state(cfg, num_classes: int, in_channels: int) -> dict | None:
    """Initial weights for --pretrained imagenet|PATH (None for none). Raises RuntimeError
    with the fix when the weights cannot be had (offline, missing file)."""
    if cfg.pretrained == "none":
        return None
    from fer_batch.model import build_model, load_imagenet_weights
    net = build_model(num_classes, in_channels, cfg.stem)
    load_imagenet_weights(net, cfg.pretrained)
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
    lr_at(0, 1, cfg.lr, cfg.schedule)
    list_labeled(cfg.data, cfg.endpoint_url)
    pretrained_state(cfg, 2, len(channel_names(cfg)))


def fit(cfg: TrainConfig) -> dict:
    """Train on cfg.data and write the outputs to cfg.output (see module docstring).

    Returns the metrics dict written to metrics.json: test metrics of the single split, or
    with --folds K the mean/std over folds (``cv``) plus each fold's metrics (``folds``).
    """
    from fer_batch import evaluate, infer
    from fer_batch.model import build_model, save_checkpoint
    t_start = time.perf_counter()
    check_config(cfg)
    channels = channel_names(cfg)
    paths, labels, classes = list_labeled(cfg.data, cfg.endpoint_url)
    faces, ok, skipped = load_faces(cfg.data, paths, cfg.detect_faces, cfg.endpoint_url, channels)
    paths = [p for p, good in zip(paths, ok) if good]
    y = np.array([classes.index(lab) for lab, good in zip(labels, ok) if good], np.int64)
    need_groups = cfg.split == "subject" or cfg.folds
    groups = (read_subjects(cfg.data, paths, cfg.subject_column, cfg.subject_pattern,
                            cfg.endpoint_url) if need_groups else None)
    splits = (fold_indices(y, groups, cfg.folds, cfg.seed) if cfg.folds
              else [split_indices(y, groups, cfg.split, cfg.test_fraction, cfg.seed)])
    model_args = dict(num_classes=len(classes), in_channels=len(channels), stem=cfg.stem)
    init_state = pretrained_state(cfg, len(classes), len(channels))
    data_summary = dict(data=cfg.data, classes=classes, n_images=len(labels), n_used=len(y),
                        per_class={c: int((y == i).sum()) for i, c in enumerate(classes)},
                        skipped=skipped, subjects=len(set(groups)) if need_groups else None)
    print(f"{cfg.data}: {len(y)} images in {len(classes)} classes, {len(skipped)} skipped; "
          f"{len(splits)} training run(s)", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = []
    for k, (tr, te) in enumerate(splits):
        out = os.path.join(cfg.output, f"fold{k}") if cfg.folds else cfg.output
        os.makedirs(out, exist_ok=True)
        t0 = time.perf_counter()
        state, history = run_trainer(cfg, faces[tr], y[tr], faces[te], y[te], model_args,
                                     f"fer-train-{stamp}" + (f"-fold{k}" if cfg.folds else ""),
                                     init_state)
        net = build_model(**model_args)
        net.load_state_dict(state)
        pred = infer.predict(net.eval(), faces[te], batch_size=evaluate.PREDICT_BATCH).argmax(1)
        m = evaluate.compute_metrics(y[te], pred, classes)
        m.update(split="subject-folds" if cfg.folds else cfg.split, fold=k if cfg.folds else None,
                 folds=cfg.folds, n_train=len(tr), n_test=len(te), epochs=cfg.epochs,
                 seed=cfg.seed, history=history, train_seconds=time.perf_counter() - t0,
                 skipped=skipped, train_config=dataclasses.asdict(cfg))
        split_files = dict(train=[paths[i] for i in tr], test=[paths[i] for i in te])
        if need_groups:
            split_files["test_subjects"] = sorted(set(groups[te]))
        m["model_id"] = save_checkpoint(
            os.path.join(out, "model.pt"), net, classes=classes, model_args=model_args,
            channels=channels, face_size=FACE_SIZE, train_config=dataclasses.asdict(cfg),
            data=dict(data_summary, fold=m["fold"]),
            metrics={key: m[key] for key in evaluate.HEADLINE + ("n_train", "n_test")})
        m["wall_seconds"] = time.perf_counter() - t_start
        evaluate.write_report(out, m, history, f"fold {k}" if cfg.folds else f"{cfg.split} split")
        with open(os.path.join(out, "split.json"), "w") as f:
            json.dump(split_files, f)
        print(f"{'fold %d: ' % k if cfg.folds else ''}test {evaluate.format_metrics(m)}",
              flush=True)
        runs.append(m)
    if not cfg.folds:
        return runs[0]
    summary = dict(cv=evaluate.summarize_folds(runs), folds=runs, classes=classes,
                   split="subject-folds", n_folds=cfg.folds, epochs=cfg.epochs, seed=cfg.seed,
                   skipped=skipped, train_config=dataclasses.asdict(cfg),
                   wall_seconds=time.perf_counter() - t_start)
    for key in evaluate.HEADLINE:  # headline = mean over folds, so callers read one shape
        summary[key] = summary["cv"][key]["mean"]
    # every image is tested once across the folds: the summed matrix covers the whole folder
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
