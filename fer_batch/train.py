"""fit(cfg): labeled folders -> model.pt, metrics.json and plots, trained with Ray Train.

Data flow, in the order of this file:

1. ``fit``: ``check_training`` (bad options, missing data, unavailable weights: before Ray
   starts), then one training run per split (``_fit``).
2. ``prepare_data``: ``labeled.list_many`` (class = first subfolder, through the expression
   vocabulary; several folders train on the union of their classes) and ``labeled.load_faces``
   (decode + --detect-faces crop + prepare_faces: the pixels annotate feeds the model);
   unreadable images are skipped and listed. Splits (pure): --test-data (a held-out
   folder), a random stratified split (the paper), a subject-disjoint split or K folds by
   subject; --calibration-fraction holds images out for the temperature.
3. ``pretrained_state``: --pretrained none, imagenet, default (the shipped model) or a
   model.pt of ours (transfer learning: backbone kept, classifier rebuilt).
4. ``train_split``: ``run_trainer`` puts the arrays in the object store once;
   ``train_loop.train_loop_per_worker`` shards them with a DistributedSampler (no Ray Data:
   48x48 faces are a few MB, FER2013's 28,709 about 66 MB). Every epoch it reports metrics
   and a checkpoint; after a worker failure Ray restarts the workers
   (FailureConfig(max_failures=2)) and they resume from it; --resume-from continues a run
   whose driver died or stopped (one that already reached its last epoch trains nothing:
   ``reached_state``). Rank 0's progress reaches the driver's console through a Ray queue
   (``relay_progress``). Then the driver scores the test split with ``infer.predict`` (the
   annotate code path), fits the temperature and writes model.pt, metrics.json,
   split.json, confusion_matrix.png, training_curves.png.
5. ``write_folds`` for --folds: mean and spread over the folds.

Every option is a TrainConfig field (the CLI flags are generated from it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np

from fer_batch import labeled, storage
from fer_batch.config import CHANNEL_NAMES, FACE_SIZE, TRAIN_DEFAULTS, TrainConfig
from fer_batch.train_loop import (class_weights, epoch_line, latest_checkpoint,
                                  read_state, train_loop_per_worker)

MAX_FAILURES = 2  # worker failures Ray Train recovers from per run


# --- 1. the entry: check before Ray starts, then fit --------------------------------------

def fit(cfg: TrainConfig, checked: dict | None = None) -> dict:
    """Train on cfg.data and write the outputs to cfg.output, local or s3:// (see module
    docstring). checked: what check_training(cfg) returned, when the caller already ran it.

    Returns the metrics dict written to metrics.json: test metrics of the single split, or
    with --folds K the mean/std over folds (``cv``) plus each fold's metrics (``folds``).
    """
    t_start = time.perf_counter()
    checked = checked if checked is not None else check_training(cfg)
    with storage.local_output(cfg.output, cfg.endpoint_url) as out:
        return _fit(dataclasses.replace(cfg, output=out), checked, t_start)


def check_training(cfg: TrainConfig) -> dict:
    """Fail fast, before Ray starts: bad options, missing data, unavailable weights.

    Returns what it had to find out, for ``fit`` not to do it twice: dict(listed=
    labeled.list_many of DATA, test_listed= that of --test-data or None, init_state=
    pretrained_state for the listed classes)."""
    cfg.check()
    if cfg.resume_from:
        latest_checkpoint(cfg.resume_from, cfg.endpoint_url)  # raises, naming the folder
    listed = labeled.list_many(cfg.data, cfg.endpoint_url)
    test_listed = labeled.list_many((cfg.test_data,), cfg.endpoint_url) if cfg.test_data else None
    return dict(listed=listed, test_listed=test_listed,
                init_state=pretrained_state(cfg, listed[2], len(channel_names(cfg))))


def _fit(cfg: TrainConfig, checked: dict, t_start: float) -> dict:
    from fer_batch import evaluate
    channels = channel_names(cfg)
    data = prepare_data(cfg, channels, checked["listed"], checked["test_listed"])
    classes, init_state = data["classes"], checked["init_state"]
    print(f"{', '.join(cfg.data)}: {len(data['y'])} images in {len(classes)} classes "
          f"({', '.join(classes)}), {len(data['skipped'])} skipped; "
          f"{len(data['splits'])} training run(s)", flush=True)
    stamp = cfg.run_name or time.strftime("fer-train-%Y%m%d-%H%M%S")
    runs = [train_split(cfg, data, k, tr, te, channels=channels, init_state=init_state,
                        run_name=stamp + (f"-fold{k}" if cfg.folds else ""),
                        t_start=t_start)
            for k, (tr, te) in enumerate(data["splits"])]
    if not cfg.folds:
        print(evaluate.format_confusion(runs[0]["confusion_matrix"], classes), flush=True)
        return runs[0]
    return write_folds(cfg, runs, classes, data["skipped"], t_start)


# --- 2. data: labeled folders -> faces, splits --------------------------------------------

def channel_names(cfg) -> tuple:
    """--channels "equalized,canny" -> ("equalized", "canny"), checked against prepare_faces."""
    names = tuple(c.strip() for c in cfg.channels.split(",") if c.strip())
    bad = [c for c in names if c not in CHANNEL_NAMES]
    if not names or bad:
        raise ValueError(f"--channels {cfg.channels!r}: a comma list of "
                         f"{', '.join(CHANNEL_NAMES)}")
    return names


def prepare_data(cfg: TrainConfig, channels, listed, test_listed=None) -> dict:
    """The training folders (and --test-data) as arrays, with the splits to train.
    listed, test_listed: labeled.list_many of cfg.data and of (cfg.test_data,).

    Returns dict: faces (n, C, 48, 48) uint8, y (n,) int64, classes, names (one per image,
    for split.json), skipped, groups (subject ids or None), splits [(train_idx, test_idx)],
    n_images (listed, before unreadable ones were dropped).
    """
    items, labels, classes = listed
    faces, y, paths, skipped = _load(cfg, items, labels, classes, channels)
    groups = None
    if cfg.split == "subject" or cfg.folds:  # per folder: a subject never spans two folders
        groups = np.concatenate([
            np.array([f"{folder}:{g}" for g in labeled.read_subjects(
                folder, [p for f, p in paths if f == folder], cfg.subject_column,
                cfg.subject_pattern, cfg.endpoint_url)], dtype=object)
            for folder in cfg.data if any(f == folder for f, _ in paths)])
    if cfg.test_data:  # a held-out folder: train on all of DATA, test on it
        t_items, t_labels, t_classes = test_listed
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


def _load(cfg: TrainConfig, items, labels, classes, channels):
    """Faces of labeled items -> (faces, y int64, items kept, skipped), with a progress bar."""
    from fer_batch.console import progress_bar
    bar = progress_bar(len(items), "loading faces", "image")
    faces, ok, skipped = labeled.load_faces(items, cfg.detect_faces, cfg.endpoint_url,
                                            channels, FACE_SIZE, cfg.crop_margin, bar.update,
                                            align=cfg.align)
    bar.close()
    for s in skipped:
        print(f"skipping unreadable image {s['path']}: {s['error']}", flush=True)
    y = np.array([classes.index(lab) for lab, good in zip(labels, ok) if good], np.int64)
    return faces, y, [it for it, good in zip(items, ok) if good], skipped


def split_indices(labels: np.ndarray, groups: np.ndarray | None,
                  split: str = TRAIN_DEFAULTS.split,
                  test_fraction: float = TRAIN_DEFAULTS.test_fraction,
                  seed: int = TRAIN_DEFAULTS.seed):
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


def calibration_split(labels: np.ndarray, train_idx: np.ndarray, fraction: float,
                      seed: int = 0):
    """(train_idx, calibration_idx): `fraction` of the training images, stratified by class,
    held out to fit the score temperature (never a test image). fraction 0: all train."""
    if not fraction:
        return train_idx, train_idx[:0]
    from sklearn.model_selection import train_test_split
    tr, cal = train_test_split(train_idx, test_size=fraction, random_state=seed,
                               stratify=labels[train_idx])
    return np.sort(tr), np.sort(cal)


def fold_indices(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int = 0):
    """K subject-disjoint (train_idx, test_idx) pairs; every image is tested exactly once."""
    from sklearn.model_selection import StratifiedGroupKFold
    return [(np.sort(tr), np.sort(te)) for tr, te in StratifiedGroupKFold(
        folds, shuffle=True, random_state=seed).split(np.arange(len(labels)), labels, groups)]


# --- 3. initial weights (--pretrained) ----------------------------------------------------

def pretrained_state(cfg, classes, in_channels: int) -> dict | None:
    """Initial weights for --pretrained: none, imagenet, default (the shipped model), a
    model.pt of ours (backbone reused; the classifier too when its classes are `classes`,
    in order, so a FER2013 model goes on training as it is; else rebuilt for the new classes)
    or a torchvision resnet50 weights file. Raises RuntimeError with the fix when the weights
    cannot be had (offline, missing file, another input shape)."""
    if cfg.pretrained == "none":
        return None
    num_classes = len(classes)
    from fer_batch.config import DEFAULT_MODEL, DEFAULT_MODEL_NAME
    from fer_batch.model import (CheckpointError, build_model, load_imagenet_weights,
                                 read_checkpoint)
    import torch
    with torch.random.fork_rng(devices=[]):  # the new classifier's weights: from --seed only
        torch.manual_seed(cfg.seed)
        net = build_model(num_classes, in_channels, cfg.stem)
    source = DEFAULT_MODEL if cfg.pretrained == DEFAULT_MODEL_NAME else cfg.pretrained
    if source != "imagenet" and os.path.isfile(source) or storage.is_s3(source):
        try:
            ckpt = read_checkpoint(storage.read_bytes(source, cfg.endpoint_url), source)
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
            same_classes = list(ckpt["classes"]) == list(classes)
            backbone = {k: v.float() for k, v in ckpt["state_dict"].items()
                        if same_classes or not k.startswith("net.fc.")}
            net.load_state_dict(backbone, strict=False)
            return net.state_dict()
    load_imagenet_weights(net, source)
    return net.state_dict()


# --- 4. one training run: Ray Train, then the driver scores and writes --------------------

def train_split(cfg: TrainConfig, data: dict, k: int, tr, te, *, channels, init_state,
                run_name: str, t_start: float) -> dict:
    """Train on data[tr], score data[te] the way annotate scores, write model.pt,
    metrics.json, split.json and the plots into the split's folder. Returns its metrics."""
    from fer_batch import calibrate, evaluate, infer
    from fer_batch.model import build_model, save_checkpoint
    faces, y, classes, groups = data["faces"], data["y"], data["classes"], data["groups"]
    out = os.path.join(cfg.output, f"fold{k}") if cfg.folds else cfg.output
    os.makedirs(out, exist_ok=True)
    model_args = dict(num_classes=len(classes), in_channels=len(channels), stem=cfg.stem)
    tr, cal = calibration_split(y, tr, cfg.calibration_fraction, cfg.seed)
    t0 = time.perf_counter()
    state, history = run_trainer(cfg, faces[tr], y[tr], faces[te], y[te], model_args, run_name,
                                 init_state, class_weights(y[tr], len(classes),
                                                           cfg.class_weight))
    net = build_model(**model_args)
    net.load_state_dict(state)
    net = net.to(infer.pick_device()).eval()  # the GPU where the driver has one
    pred = infer.predict(net, faces[te], batch_size=evaluate.PREDICT_BATCH,
                         flip_average=False).argmax(1)  # the paper's metric, as the workers
    m = evaluate.compute_metrics(y[te], pred, classes)
    calibration = calibrate.calibration_entry(
        infer.predict_logits(net, faces[cal], flip_average=True), y[cal]) if len(cal) else None
    if calibration:
        print(f"temperature {calibration['temperature']:.3f} fitted on {len(cal)} held-out "
              f"training images (ECE {100 * calibration['ece_before']:.1f}% -> "
              f"{100 * calibration['ece_after']:.1f}%)", flush=True)
    m.update(split="subject-folds" if cfg.folds else cfg.split, fold=k if cfg.folds else None,
             folds=cfg.folds, n_train=len(tr), n_test=len(te), epochs=cfg.epochs,
             seed=cfg.seed, history=history, train_seconds=time.perf_counter() - t0,
             n_calibration=len(cal), calibration=calibration,
             skipped=data["skipped"], train_config=dataclasses.asdict(cfg))
    summary = dict(data=list(cfg.data), test_data=cfg.test_data, classes=classes,
                   n_images=data["n_images"], n_used=len(y),
                   per_class={c: int((y == i).sum()) for i, c in enumerate(classes)},
                   skipped=data["skipped"], fold=m["fold"],
                   subjects=len(set(groups)) if groups is not None else None)
    m["model_id"] = save_checkpoint(
        os.path.join(out, "model.pt"), net, classes=classes, model_args=model_args,
        channels=channels, face_size=FACE_SIZE, crop_margin=cfg.crop_margin, align=cfg.align,
        train_config=dataclasses.asdict(cfg), data=summary, calibration=calibration,
        metrics={key: m[key] for key in evaluate.HEADLINE + ("n_train", "n_test")})
    m["wall_seconds"] = time.perf_counter() - t_start
    evaluate.write_metrics(out, m, history, f"fold {k}" if cfg.folds else f"{cfg.split} split")
    split_files = dict(train=[data["names"][i] for i in tr], test=[data["names"][i] for i in te],
                       calibration=[data["names"][i] for i in cal])
    if groups is not None:
        split_files["test_subjects"] = sorted(set(groups[te]))
    with open(os.path.join(out, "split.json"), "w") as f:
        json.dump(split_files, f)
    print(f"{'fold %d: ' % k if cfg.folds else ''}test {evaluate.format_metrics(m)}",
          flush=True)
    return m


def run_trainer(cfg: TrainConfig, x_train, y_train, x_test, y_test, model_args: dict,
                name: str, init_state: dict | None = None, class_weight=None):
    """Train with Ray Train. Returns (state_dict of the final model, per-epoch history).
    A run resumed at or past its last epoch trains nothing: its checkpoint is the answer,
    without starting Ray Train (~25 s)."""
    store = checkpoint_store(cfg)
    state = reached_state(cfg) or trained_state(cfg, x_train, y_train, x_test, y_test,
                                                model_args, name, init_state, class_weight,
                                                store)
    if cfg.last_epoch < cfg.epochs:  # --stop-after: the checkpoints stay for --resume-from
        print(f"stopped after epoch {state['epoch']} of {cfg.epochs}; continue with "
              f"--resume-from {os.path.join(store, name)} (same --epochs and --schedule)",
              flush=True)
    elif not storage.is_s3(store):  # the run ended: model.pt replaces the ~300 MB state
        shutil.rmtree(os.path.join(store, name), ignore_errors=True)
        if os.path.isdir(store) and not os.listdir(store):
            os.rmdir(store)
    return state["model"], state["history"]


def reached_state(cfg: TrainConfig) -> dict | None:
    """The state.pt of a --resume-from (local or s3://) that already reached the run's last
    epoch, else None: there is training to do. Read memory-mapped where local (only what is
    used is read), in one GET on S3."""
    if not cfg.resume_from:
        return None
    state = read_state(latest_checkpoint(cfg.resume_from, cfg.endpoint_url), mmap=True,
                       endpoint_url=cfg.endpoint_url)
    if state["epoch"] < cfg.last_epoch:
        return None
    print(f"--resume-from {cfg.resume_from} already reached epoch {state['epoch']}: nothing "
          "to train", flush=True)
    return state


def trained_state(cfg: TrainConfig, x_train, y_train, x_test, y_test, model_args: dict,
                  name: str, init_state, class_weight, store: str) -> dict:
    """Run the Ray Train TorchTrainer; returns its last checkpoint's state.pt."""
    import threading

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue
    scaling_config, threads = scaling(cfg)
    config = dict(dataclasses.asdict(cfg), model_args=model_args, threads=threads,
                  data_ref=ray.put(dict(x_train=x_train, y_train=y_train, x_test=x_test,
                                        y_test=y_test)),
                  init_ref=ray.put(init_state) if init_state is not None else None,
                  class_weight=None if class_weight is None else class_weight.tolist())
    config["progress"] = Queue(actor_options={"num_cpus": 0})
    done = threading.Event()
    shower = threading.Thread(target=relay_progress, args=(config["progress"], cfg.epochs, done),
                              daemon=True)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config, scaling_config=scaling_config,
        run_config=RunConfig(storage_path=store, name=name,
                             failure_config=FailureConfig(max_failures=MAX_FAILURES),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)))
    shower.start()
    try:
        result = trainer.fit()
    finally:
        done.set()
        shower.join(timeout=5)
    with result.checkpoint.as_directory() as d:
        return read_state(d)


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


def cpu_threads(workers: int, cluster_cpus: float, node_cpus: float) -> int:
    """Torch threads (and CPUs reserved) per CPU worker: the cluster's CPUs shared among the
    workers, at most one node's worth, at least 1. 2 workers on an 8-core laptop get 4 each."""
    return max(1, min(int(cluster_cpus) // max(1, workers), int(node_cpus)))


def checkpoint_store(cfg: TrainConfig) -> str:
    """Where Ray Train keeps the per-epoch checkpoints: --storage-path, else OUTPUT/_ray_train."""
    if cfg.storage_path:
        return cfg.storage_path if storage.is_s3(cfg.storage_path) else os.path.abspath(
            os.path.expanduser(cfg.storage_path))
    return os.path.join(os.path.abspath(cfg.output), "_ray_train")


def relay_progress(queue, epochs: int, done) -> None:
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


# --- 5. --folds: the summary over folds ---------------------------------------------------

def write_folds(cfg: TrainConfig, runs: list, classes, skipped, t_start: float) -> dict:
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

