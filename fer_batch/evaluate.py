"""Metrics, plots and ``evaluate_folder``: score a checkpoint on any labeled folder.

Training and evaluation share these functions, so ``fer-batch evaluate`` on the
test images of a training run reproduces the numbers that run reported. The
metrics are plain dicts (JSON-ready); the plots use matplotlib's Agg backend,
so they work on headless workers.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: E402

HEADLINE = ("accuracy", "macro_precision", "macro_recall", "macro_f1")  # the paper's Table II
from fer_batch import storage  # noqa: E402
from fer_batch.config import ANNOTATE_DEFAULTS, TRAIN_DEFAULTS  # noqa: E402

PREDICT_BATCH = ANNOTATE_DEFAULTS.batch_size  # faces per forward pass when scoring


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes) -> dict:
    """Accuracy, macro and per-class precision/recall/F1 and the confusion matrix.

    Parameters
    ----------
    y_true, y_pred: np.ndarray, shape = (n,), int: indices into classes.
    classes: class names; every class gets a row/column, present in the data or not.

    Returns
    -------
    dict with accuracy, macro_precision, macro_recall, macro_f1 (unweighted mean over
    the classes present in y_true), per_class {name: {precision, recall, f1, support}},
    confusion_matrix (rows = true, columns = predicted, nested lists), classes and n.
    Values are fractions in [0, 1].
    """
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    labels = np.arange(len(classes))
    present = np.unique(y_true)  # a model class absent from the data would add a 0 recall
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                 zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_precision": float(p[present].mean()) if len(present) else 0.0,
        "macro_recall": float(r[present].mean()) if len(present) else 0.0,
        "macro_f1": float(f[present].mean()) if len(present) else 0.0,
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                          "support": int(s[i])} for i, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
        "n": int(len(y_true)),
    }


def summarize_folds(fold_metrics: list[dict]) -> dict:
    """Mean and standard deviation (ddof=0) of the headline metrics across folds."""
    out = {}
    for key in HEADLINE:
        v = np.array([m[key] for m in fold_metrics], np.float64)
        out[key] = {"mean": float(v.mean()), "std": float(v.std()), "folds": v.tolist()}
    return out


def format_metrics(m: dict) -> str:
    """One line: accuracy and macro precision/recall/F1 in percent."""
    return (f"accuracy {100 * m['accuracy']:.2f}%  precision {100 * m['macro_precision']:.2f}%  "
            f"recall {100 * m['macro_recall']:.2f}%  F1 {100 * m['macro_f1']:.2f}%  (n={m['n']})")


def format_confusion(cm, classes) -> str:
    """The confusion matrix as text (rows = true class, columns = predicted), for the
    console."""
    cm = np.asarray(cm)
    short = [c[:7] for c in classes]
    width = max(7, len(str(cm.max())) if cm.size else 1)
    lines = ["confusion matrix (rows: true, columns: predicted)",
             " " * 12 + " ".join(f"{c:>{width}}" for c in short)]
    for name, row in zip(classes, cm):
        lines.append(f"{name[:11]:<12}" + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def plot_confusion(cm, classes, path: str, title: str = "Confusion matrix") -> None:
    """Write the confusion matrix (rows = true class) as a PNG, counts and row percentages."""
    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.1 * k + 2.5, 1.1 * k + 1.5), dpi=110)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, f"{cm[i, j]}\n{100 * frac[i, j]:.0f}%", ha="center", va="center",
                        fontsize=8, color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), [f"{c} ({int(n)})" for c, n in zip(classes, rows[:, 0])])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (images)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(history: list[dict], path: str, title: str = "Training") -> None:
    """Loss and accuracy per epoch, train and test, side by side, as a PNG.

    history: one dict per epoch with epoch, train_loss, train_acc, test_loss, test_acc.
    """
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, key, label in ((a1, "loss", "cross-entropy loss"), (a2, "acc", "accuracy (%)")):
        scale = 100 if key == "acc" else 1
        for part, style in (("train", "o-"), ("test", "s--")):
            vals = [h.get(f"{part}_{key}") for h in history]
            if any(v is not None for v in vals):
                ax.plot(ep, [scale * v if v is not None else np.nan for v in vals], style,
                        label=part)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if history and history[-1].get("test_acc") is not None:
        a2.set_title(f"final test accuracy {100 * history[-1]['test_acc']:.1f}%")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reliability(bins: list[dict], ece: float, path: str, title: str = "") -> None:
    """Reliability diagram as a PNG: accuracy against mean score per score bin (bars), the
    diagonal of perfect calibration, and the share of faces per bin below.
    bins: ``calibrate.reliability``."""
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(5, 6), dpi=110, sharex=True,
                                 gridspec_kw=dict(height_ratios=(3, 1)))
    width = bins[0]["hi"] - bins[0]["lo"] if bins else 1
    full = [b for b in bins if b["n"]]
    a1.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=width, align="edge",
           edgecolor="black", color="#4c72b0", label="accuracy")
    a1.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    a1.plot([b["score"] for b in full], [b["accuracy"] for b in full], "o", color="#dd8452",
            ms=3, label="mean score")
    a1.set_ylabel("accuracy in the bin")
    a1.set_ylim(0, 1)
    a1.legend(loc="upper left")
    a1.set_title(f"{title} ECE {100 * ece:.1f}% ({len(bins)} bins)".strip())
    total = sum(b["n"] for b in bins) or 1
    a2.bar([b["lo"] for b in bins], [b["n"] / total for b in bins], width=width, align="edge",
           edgecolor="black", color="#999999")
    a2.set_xlabel("score (top probability)")
    a2.set_ylabel("share of faces")
    a2.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_metrics(output: str, metrics: dict, history: list[dict] | None = None,
                 title: str = "") -> None:
    """metrics.json, confusion_matrix.png, reliability.png (with calibration metrics) and
    (with a history) training_curves.png."""
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    plot_confusion(metrics["confusion_matrix"], metrics["classes"],
                   os.path.join(output, "confusion_matrix.png"),
                   f"{title} accuracy {100 * metrics['accuracy']:.1f}% (n={metrics['n']})")
    if metrics.get("reliability"):
        plot_reliability(metrics["reliability"], metrics["ece"],
                         os.path.join(output, "reliability.png"), title)
    if history:
        plot_curves(history, os.path.join(output, "training_curves.png"), title)


def write_predictions(path: str, paths, y_true, probs: np.ndarray, classes) -> None:
    """predictions.parquet: one row per scored image: path, true_label, label (the most
    probable class) and score (its probability, after the checkpoint's temperature)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    table = pa.table({
        "path": pa.array(list(paths), pa.string()),
        "true_label": pa.array([classes[i] for i in y_true], pa.string()),
        "label": pa.array([classes[i] for i in pred], pa.string()),
        "score": pa.array(probs.max(axis=1) if len(probs) else [], pa.float32()),
    })
    pq.write_table(table, path)


def match_classes(data_classes, model_classes) -> dict:
    """Which data classes the model can score, by name.

    Returns {"shared": [names in model order], "data_only": [...], "model_only": [...]}.
    """
    data_set, model_set = set(data_classes), set(model_classes)
    return {"shared": [c for c in model_classes if c in data_set],
            "data_only": sorted(data_set - model_set),
            "model_only": [c for c in model_classes if c not in data_set]}


def evaluate_folder(data: str, model_path: str, output: str | None = None,
                    endpoint_url: str | None = None, detect_faces: bool = False,
                    crop_margin: float | None = None,
                    flip_average: bool = ANNOTATE_DEFAULTS.flip_average,
                    detector: str = ANNOTATE_DEFAULTS.detector,
                    align: str | None = None) -> dict:
    """Score a checkpoint on a labeled folder (one subfolder per class).

    Classes are matched by name. Images of classes the model lacks (e.g. JAFFE's
    neutral for a CK+ model) are reported and left out; model classes absent from
    the data are reported (they can still be predicted, and count as errors).
    Unreadable images are reported and skipped.

    Parameters
    ----------
    data: labeled folder, local or s3://.
    model_path: model.pt written by ``fer-batch train``.
    output: folder for metrics.json, confusion_matrix.png, reliability.png and
        predictions.parquet (path, true_label, label, score per image; None = write nothing).
    detect_faces: crop the largest face first (for full photos such as JAFFE), the way
        annotate crops it (labeled.load_faces), with `detector` (default: annotate's),
        `crop_margin` and `align` ("eyes" or "none"; None: the checkpoint's, as annotate).
    flip_average: average with the mirror image, as annotate does by default (training's
        own test metrics do not: the paper's protocol).

    Returns
    -------
    The metrics dict (see ``compute_metrics``) with classes = the model's classes,
    plus data, model, model_id, excluded_classes, missing_classes, skipped, and the
    calibration of the scores (``calibrate.summarize``: ece, nll, accuracy_at_coverage,
    reliability; temperature: the checkpoint's, applied).
    """
    from fer_batch import calibrate, infer
    from fer_batch.model import align_of, crop_margin_of, load_checkpoint

    model, meta = load_checkpoint(model_path, endpoint_url)
    model = model.to(infer.pick_device())  # the GPU where there is one
    temperature = infer.temperature_of(meta)
    margin = float(crop_margin_of(meta)) if crop_margin is None else crop_margin
    align = align_of(meta) if align is None else align
    got = labeled_faces(data, meta, endpoint_url, detect_faces, margin, detector, align)
    classes, y_true = got["classes"], got["y_true"]
    probs = infer.predict(model, got["faces"], batch_size=PREDICT_BATCH, progress=True,
                          flip_average=flip_average, temperature=temperature)
    y_pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    metrics = compute_metrics(y_true, y_pred, classes)
    metrics.update(calibrate.summarize(probs, y_true) if len(probs) else {},
                   temperature=temperature)
    metrics.update(data=data, model=model_path, model_id=meta.get("model_id"),
                   excluded_classes=got["excluded"], missing_classes=got["missing"],
                   skipped=got["skipped"], detect_faces=detect_faces, crop_margin=margin,
                   align=align if detect_faces else None,
                   flip_average=flip_average, detector=detector if detect_faces else None)
    print_summary(data, metrics, classes)
    if output:
        with storage.local_output(output, endpoint_url) as out:
            write_metrics(out, metrics, title=os.path.basename(os.path.normpath(data)))
            write_predictions(os.path.join(out, "predictions.parquet"), got["paths"], y_true,
                              probs, classes)
    return metrics


def labeled_faces(data: str, meta: dict, endpoint_url: str | None, detect_faces: bool,
                  margin: float, detector: str, align: str = TRAIN_DEFAULTS.align) -> dict:
    """The faces of a labeled folder as the checkpoint (meta) reads them, for the classes it
    shares with the model: dict(classes (the model's, canonical), faces (n, C, s, s) uint8,
    y_true, paths, excluded {data class: images left out}, missing (model classes without
    images), skipped (unreadable images)). Prints what it leaves out."""
    from fer_batch import labeled
    from fer_batch.console import progress_bar
    classes = [labeled.canonical(c) for c in meta["classes"]]
    paths, labels, data_classes = labeled.list_labeled(data, endpoint_url)
    match = match_classes(data_classes, classes)
    keep = [i for i, lab in enumerate(labels) if lab in match["shared"]]
    excluded = {c: sum(1 for lab in labels if lab == c) for c in match["data_only"]}
    for c, n in excluded.items():
        print(f"evaluate: class {c!r} ({n} images) is not a model class; left out")
    for c in match["model_only"]:
        print(f"evaluate: model class {c!r} has no images in {data}")
    bar = progress_bar(len(keep), "loading faces", "image")
    faces, ok, skipped = labeled.load_faces(
        [(data, paths[i]) for i in keep], detect_faces, endpoint_url,
        tuple(meta["input"]["channels"]), int(meta["input"]["size"]), margin, bar.update,
        detector, align)
    bar.close()
    keep = [i for i, good in zip(keep, ok) if good]
    return dict(classes=classes, faces=faces, paths=[paths[i] for i in keep],
                y_true=np.array([classes.index(labels[i]) for i in keep], np.int64),
                excluded=excluded, missing=match["model_only"], skipped=skipped)


def print_summary(data: str, metrics: dict, classes) -> None:
    """The console summary of an evaluation: metrics, calibration, confusion matrix."""
    print(f"evaluate {data}: {format_metrics(metrics)}")
    if "accuracy_at_coverage" in metrics:
        cover = metrics["accuracy_at_coverage"]
        print(f"calibration (temperature {metrics['temperature']:.3g}): ECE "
              f"{100 * metrics['ece']:.2f}%; accuracy of the most confident " + ", ".join(
                  f"{100 * float(c):.0f}% {100 * v['accuracy']:.1f}%" for c, v in cover.items()))
    print(format_confusion(metrics["confusion_matrix"], classes))
