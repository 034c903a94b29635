"""EMOTIONS, build_model(), save_checkpoint(), load_checkpoint(); no data I/O beyond the file.

Checkpoint format (docs/checkpoint.md): one file written by ``torch.save`` holding
only tensors and plain Python values, so ``torch.load(weights_only=True)`` reads it
and loading never executes code from the file:

    format        "fer-batch/1"
    arch          "resnet50"
    model_args    kwargs of build_model (num_classes, in_channels, stem)
    classes       class names in logit order
    input         {size, channels, mean, std}: prepare_faces output -> model input
    preprocessing {face_size, channels, equalize, interpolation}
    state_dict    the weights
    model_id      sha256 of the weights (hex, first 16 chars)
    train_config, data, metrics   what training wrote (may be empty)
    calibration   optional {temperature, n, ...}: scores are softmax(logits / temperature)
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import torch
import torch.nn as nn
import torchvision

from fer_batch.config import (ALIGNS, CHANNEL_NAMES, DEFAULT_MODEL, DEFAULT_MODEL_NAME,
                              FACE_SIZE, LEGACY_ALIGN, LEGACY_CROP_MARGIN, STEMS,
                              TRAIN_DEFAULTS)
EMOTIONS = ("anger", "contempt", "disgust", "fear", "happiness", "sadness", "surprise")  # CK+
FORMAT = "fer-batch/1"
ARCH = "resnet50"
INPUT_MEAN, INPUT_STD = 0.5, 0.25  # uint8/255 -> roughly zero-mean unit-variance for equalized crops


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, unsafe or of another architecture."""


class FaceNet(nn.Module):
    """ResNet-50 on (n, C, 48, 48) uint8 faces; scaling to float lives inside the model so
    training and inference feed it the same bytes."""

    def __init__(self, num_classes: int = len(EMOTIONS), in_channels: int = 1,
                 stem: str = TRAIN_DEFAULTS.stem):
        super().__init__()
        net = torchvision.models.resnet50(weights=None, num_classes=num_classes)
        if stem == "small":  # 48x48 input: keep resolution through the stem
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        else:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return self.net((x - INPUT_MEAN) / INPUT_STD)


def build_model(num_classes: int = len(EMOTIONS), in_channels: int = 1,
                stem: str = TRAIN_DEFAULTS.stem) -> FaceNet:
    """A ResNet-50 whose classifier has num_classes outputs and whose conv1 takes
    in_channels planes."""
    return FaceNet(num_classes=num_classes, in_channels=in_channels, stem=stem)


def load_imagenet_weights(model: FaceNet, source: str = "imagenet") -> None:
    """Copy torchvision's ImageNet ResNet-50 weights into model (all but the classifier).

    source: "imagenet" (torchvision downloads them, or finds them in TORCH_HOME) or a path
    to a local resnet50 state_dict. conv1's RGB filters are summed into each input plane,
    so a gray image produces the activations its RGB copy would have produced.
    """
    if source == "imagenet":
        weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as e:  # URLError, socket errors, SSL errors: all mean "offline"
            raise RuntimeError(
                f"cannot download ImageNet weights ({type(e).__name__}: {e}). Offline, "
                f"download {weights.url} on a machine with internet access and pass "
                "--pretrained /path/to/that.pth, or use --pretrained none") from None
    else:
        if not os.path.isfile(source):
            raise RuntimeError(f"--pretrained {source}: no such file (expected a torchvision "
                               "resnet50 state_dict .pth, or 'imagenet' or 'none')")
        state = torch.load(source, map_location="cpu", weights_only=True)
    w = state["conv1.weight"].sum(dim=1, keepdim=True)  # (64, 1, 7, 7)
    if model.net.conv1.weight.shape[2:] == w.shape[2:]:
        state["conv1.weight"] = w.repeat(1, model.net.conv1.in_channels, 1, 1) / \
            model.net.conv1.in_channels
    else:
        state.pop("conv1.weight")  # "small" stem: a new 3x3 conv, trained from scratch
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("fc.", "conv1.")) for k in missing):
        raise RuntimeError(f"{source}: not a torchvision resnet50 state_dict")


def weights_id(state_dict: dict) -> str:
    """Content hash of the weights: same weights -> same model_id, whatever the metadata."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(path_or_file, model: FaceNet, *, classes, model_args: dict, channels,
                    face_size: int = FACE_SIZE, crop_margin: float = LEGACY_CROP_MARGIN,
                    align: str = LEGACY_ALIGN, train_config: dict | None = None,
                    data: dict | None = None, metrics: dict | None = None,
                    calibration: dict | None = None) -> str:
    """Write the checkpoint (see module docstring). Returns its model_id."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    ckpt = {
        "format": FORMAT,
        "arch": ARCH,
        "model_args": dict(model_args),
        "classes": list(classes),
        "input": {"size": face_size, "channels": list(channels),
                  "mean": INPUT_MEAN, "std": INPUT_STD, "dtype": "uint8"},
        "preprocessing": {"face_size": face_size, "channels": list(channels),
                          "equalize": "cv2.equalizeHist per crop", "interpolation": "area",
                          "crop_margin": float(crop_margin), "align": align},
        "state_dict": state,
        "model_id": weights_id(state),
        "train_config": _plain(train_config or {}),
        "data": _plain(data or {}),
        "metrics": _plain(metrics or {}),
    }
    if calibration:
        ckpt["calibration"] = _plain(calibration)
    if isinstance(path_or_file, (str, os.PathLike)):
        tmp = f"{path_or_file}.tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, path_or_file)
    else:
        torch.save(ckpt, path_or_file)
    return ckpt["model_id"]


def export_half(src: str, dst: str, **updates) -> str:
    """Copy a checkpoint with its floating-point weights stored as fp16 (half the size: the
    shipped default model); `updates` replace top-level entries (e.g. metrics). Loading
    widens them back to fp32. Returns the new model_id."""
    with open(src, "rb") as f:
        ckpt = read_checkpoint(f.read(), src)
    state = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    ckpt.update(updates, state_dict=state, model_id=weights_id(state))
    tmp = f"{dst}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, dst)
    return ckpt["model_id"]


def _plain(obj):
    """JSON-like copy (dict/list/str/int/float/bool/None) so weights_only loading accepts it."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def read_checkpoint(data: bytes, name: str = "checkpoint") -> dict:
    """Parse and validate checkpoint bytes without executing anything in them. Raises
    CheckpointError (with the file name) for damage, another format, or metadata that
    check_checkpoint refuses."""
    if not data:
        raise CheckpointError(f"{name}: empty file")
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code-carrying pickles, others for damage
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{name}: refused or unreadable checkpoint ({first}). fer-batch "
                              "loads with weights_only=True and never runs code from a file; "
                              "write checkpoints with `fer-batch train`.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{name}: not a fer-batch checkpoint (format "
                              f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt)})")
    if ckpt.get("arch") != ARCH:
        raise CheckpointError(f"{name}: architecture {ckpt.get('arch')!r}, expected {ARCH!r}")
    check_checkpoint(ckpt, name)
    return ckpt


INPUT_SIZES = (16, 512)  # face side in pixels a checkpoint may ask for; 48 = CK+48 crops
MAX_CROP_MARGIN = 2.0  # fraction of the Haar box side; beyond this the crop is mostly background


def crop_margin_of(meta: dict) -> float:
    """The crop margin a checkpoint's faces were cut with (older checkpoints: none)."""
    return meta["preprocessing"].get("crop_margin", LEGACY_CROP_MARGIN)


def align_of(meta: dict) -> str:
    """How a checkpoint's faces are levelled before the crop (--align; older: none)."""
    return meta["preprocessing"].get("align", LEGACY_ALIGN)


def _bad(name: str, what: str) -> CheckpointError:
    return CheckpointError(f"{name}: damaged or hand-edited checkpoint: {what}. Write "
                           "checkpoints with `fer-batch train` (or model.save_checkpoint).")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and bool(np.isfinite(v)))


def check_checkpoint(ckpt: dict, name: str = "checkpoint") -> None:
    """Refuse metadata that would fail later with a KeyError/TypeError or, worse, run with a
    wrong meaning: missing keys, wrong types, `classes` as a string, duplicate class names, an
    input size outside INPUT_SIZES, unknown channel or stem names, inconsistent counts. The
    weights themselves are checked against model_id in model_from_checkpoint."""
    for key, kind in (("model_args", dict), ("classes", list), ("input", dict),
                      ("preprocessing", dict), ("state_dict", dict), ("model_id", str)):
        if key not in ckpt:
            raise _bad(name, f"no {key!r} entry")
        if not isinstance(ckpt[key], kind):
            raise _bad(name, f"{key!r} is a {type(ckpt[key]).__name__}, expected a "
                             f"{kind.__name__}")
    for key in ("train_config", "data", "metrics"):
        if not isinstance(ckpt.get(key, {}), dict):
            raise _bad(name, f"{key!r} is a {type(ckpt[key]).__name__}, expected a dict")
    classes = ckpt["classes"]
    if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise _bad(name, f"'classes' must be a non-empty list of non-empty names, got "
                         f"{classes!r:.200}")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise _bad(name, f"duplicate class names {dupes}")
    args = ckpt["model_args"]
    if set(args) != {"num_classes", "in_channels", "stem"}:
        raise _bad(name, f"'model_args' keys {sorted(args)}, expected num_classes, "
                         "in_channels, stem")
    if not _is_int(args["num_classes"]) or args["num_classes"] != len(classes):
        raise _bad(name, f"{len(classes)} class names for model_args num_classes "
                         f"{args['num_classes']!r}")
    if args["stem"] not in STEMS:
        raise _bad(name, f"unknown stem {args['stem']!r}; known: {', '.join(STEMS)}")
    spec = ckpt["input"]
    size, channels = spec.get("size"), spec.get("channels")
    if not _is_int(size) or not INPUT_SIZES[0] <= size <= INPUT_SIZES[1]:
        raise _bad(name, f"input size {size!r} is not a whole number of pixels in "
                         f"{INPUT_SIZES[0]}..{INPUT_SIZES[1]}")
    if (not isinstance(channels, list) or not channels
            or any(c not in CHANNEL_NAMES for c in channels) or len(set(channels)) < len(channels)):
        raise _bad(name, f"input channels {channels!r:.200}; expected distinct names from "
                         f"{', '.join(CHANNEL_NAMES)}")
    if not _is_int(args["in_channels"]) or args["in_channels"] != len(channels):
        raise _bad(name, f"model_args in_channels {args['in_channels']!r} for "
                         f"{len(channels)} input channel(s) {channels}")
    if align_of(ckpt) not in ALIGNS:
        raise _bad(name, f"preprocessing align {align_of(ckpt)!r:.50}; known: "
                         f"{', '.join(ALIGNS)}")
    margin = crop_margin_of(ckpt)
    if not _is_number(margin) or not 0 <= margin <= MAX_CROP_MARGIN:
        raise _bad(name, f"preprocessing crop_margin {margin!r} outside 0..{MAX_CROP_MARGIN}")
    calibration = ckpt.get("calibration", {})
    if not isinstance(calibration, dict) or not (
            _is_number(calibration.get("temperature", 1.0))
            and 0.01 <= calibration.get("temperature", 1.0) <= 100):
        raise _bad(name, f"calibration {calibration!r:.100}: expected a dict whose "
                         "temperature is a number in 0.01..100")
    state = ckpt["state_dict"]
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                            for k, v in state.items()):
        raise _bad(name, "'state_dict' must map parameter names to tensors")


def model_from_checkpoint(ckpt: dict, name: str = "checkpoint") -> FaceNet:
    """FaceNet in eval mode from a checkpoint that read_checkpoint accepted. Raises
    CheckpointError when the weights do not fit the architecture or are not the weights its
    model_id names (every output row carries that id)."""
    check_checkpoint(ckpt, name)  # also for dicts that did not come from read_checkpoint
    model = build_model(**ckpt["model_args"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{name}: weights do not fit {ARCH} with "
                              f"{ckpt['model_args']}: {str(e)[:300]}") from None
    actual = weights_id(ckpt["state_dict"])  # of the stored tensors: fp16 files hash as fp16
    if actual != ckpt["model_id"]:
        raise _bad(name, f"model_id {ckpt['model_id']!r:.40} does not match its weights "
                         f"({actual}): weights changed after saving")
    return model.eval()


def load_checkpoint(path: str, endpoint_url: str | None = None) -> tuple[FaceNet, dict]:
    """Load model.pt (local or s3://). Returns (model in eval mode, checkpoint dict without
    the weights). Raises CheckpointError with the file name and the fix."""
    from fer_batch import storage  # local import: model stays usable without pyarrow
    if path == DEFAULT_MODEL_NAME:
        if not os.path.isfile(DEFAULT_MODEL):
            raise CheckpointError(f"the default model {DEFAULT_MODEL} is missing from this "
                                  "installation: reinstall fer-batch from a full checkout, or "
                                  "pass --model PATH/model.pt")
        path = DEFAULT_MODEL
    try:
        data = storage.read_bytes(path, endpoint_url)
    except (FileNotFoundError, OSError) as e:
        raise CheckpointError(f"cannot read model {path}: {e}. Train one with "
                              "`fer-batch train DATA --output DIR` (writes DIR/model.pt).") from None
    ckpt = read_checkpoint(data, path)
    model = model_from_checkpoint(ckpt, path)
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, meta
