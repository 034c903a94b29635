"""AnnotateConfig and TrainConfig: frozen dataclasses, the one source of defaults.

The command line is built from these fields (``cli.get_parser``): the field
``sample_fps`` is the flag ``--sample-fps`` and its ``help`` metadata is the
``--help`` text. ``dataclasses.asdict(cfg)`` is written next to every output
and into every checkpoint, so a run can always be explained and repeated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import math
import os

FACE_SIZE = 48  # CK+48 crops, pixels; the model's input side
DEFAULT_MODEL_NAME = "default"  # --model / --pretrained value naming the shipped model
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "default.pt")
SHARED_CKPLUS = "../shared/data/ckplus48"  # default labeled folder (CK+48)
DETECTORS = ("centerface", "haar")  # --detector choices (fer_batch/detect.py)
CHANNEL_NAMES = ("equalized", "canny")  # the input planes preprocess.prepare_faces can make
# the expression vocabulary's canonical names (labeled.VOCABULARY): one output column each
EXPRESSIONS = ("anger", "contempt", "disgust", "fear", "happiness", "neutral", "sadness",
               "surprise")
ALIGNS = ("none", "eyes")  # --align: faces cut as found, or levelled by their eyes first
STEMS = ("imagenet", "small")  # the model's conv1 variants (--stem, model.FaceNet)
LEGACY_CROP_MARGIN = 0.0  # what a checkpoint written before crop_margin existed was cut with
LEGACY_ALIGN = "none"  # and how one written before align existed


def opt(default, help: str, group: str = "general", **kw):
    """A dataclass field with its --help text and option group attached."""
    return field(default=default, metadata=dict(help=help, group=group, **kw))


class ConfigError(ValueError):
    """Options outside their allowed range, or contradicting each other: its one line names
    the flag and the fix."""


def allowed_range(lo=None, gt=None, hi=None, lt=None) -> str:
    """Words for a range: '0 to 1', 'greater than 1', '0 or more', 'at most 5',
    'greater than 0 and less than 1'."""
    if lo is not None and hi is not None:
        return f"{lo} to {hi}"
    low = f"greater than {gt}" if gt is not None else f"{lo} or more" if lo is not None else ""
    high = f"at most {hi}" if hi is not None else f"less than {lt}" if lt is not None else ""
    return " and ".join(w for w in (low, high) if w) or "any number"


def range_problem(value, lo=None, gt=None, hi=None, lt=None) -> str | None:
    """None when value is a finite number within the bounds (lo <= value, gt < value,
    value <= hi, value < lt); else what is wrong, naming the allowed range."""
    allowed = allowed_range(lo, gt, hi, lt)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        return f"must be a finite number, {allowed}"
    if (lo is not None and value < lo) or (gt is not None and value <= gt) or \
            (hi is not None and value > hi) or (lt is not None and value >= lt):
        return f"is out of range; allowed: {allowed}"
    return None


BOUNDS = ("min", "gt", "max", "lt")  # opt(...) metadata a value is checked against


def check_bounds(cfg) -> None:
    """Every option of cfg (a config dataclass) lies within what its field's metadata allows:
    its bounds (opt(..., min=, gt=, max=, lt=)) and its choices. Else ConfigError naming the
    flag and what it allows."""
    for f in fields(cfg):
        md, value, flag = f.metadata, getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if "choices" in md and value not in md["choices"]:
            raise ConfigError(f"{flag} {value!r}: choose from {', '.join(md['choices'])}")
        if not set(BOUNDS) & set(md):
            continue
        problem = range_problem(value, *(md.get(b) for b in BOUNDS))
        if problem:
            raise ConfigError(f"{flag} {value!r} {problem}")


@dataclass(frozen=True)
class AnnotateConfig:
    # --- inputs and outputs
    sources: tuple = opt((), "Files, folders (searched recursively), manifests (.txt/.csv "
                         "of paths, one per line) or s3://bucket/prefix URIs.",
                         "input", positional=True, metavar="SOURCE")
    model: str = opt(DEFAULT_MODEL_NAME, "Checkpoint written by `fer-batch train` (model.pt, "
                     "local or s3://); 'default' is the model shipped with fer-batch (trained on "
                     "FER2013: 7 expressions with neutral; MODEL.md).", "input")
    output: str = opt("fer-out", "Output folder (local or s3://): faces/, files/ and _runs/ "
                      "are written under it.", "input")
    incremental: bool = opt(False, "Skip files already annotated by a committed earlier run "
                            "into the same output (same uri, size and mtime/ETag).", "input")
    relabel: bool = opt(False, "With --incremental: also redo the done files that an earlier "
                        "run labelled with another model (by default they are kept, and the "
                        "run says how many there are).", "input")
    break_lock: bool = opt(False, "Take over OUT/_lock left by a run that died on another "
                           "machine (a dead run on this machine is detected by itself).", "input")
    follow_symlinks: bool = opt(False, "Follow symlinks that lead out of a SOURCE folder "
                                "(off: each such link is a skipped row, so a link to / or to "
                                "another user's files does not widen what a run reads). "
                                "Links within the folder are always followed.", "input")
    limit: int = opt(0, "Process only the first N listed files (0 = all); for smoke tests.",
                     "input", min=0)
    endpoint_url: Optional[str] = opt(None, "S3 endpoint for S3-compatible stores (MinIO, Ceph). "
                                      "Default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS.",
                                      "input")

    # --- video sampling
    sample_fps: float = opt(2.0, "Frames per second sampled from each video, by timestamp "
                            "(the first frame at or after each multiple of 1/F). The decoder "
                            "skips frames this drops where the codec allows (B-frames nothing "
                            "refers to; frames up to the next keyframe), so a lower rate also "
                            "decodes less.", "video", gt=0)
    every_n_frames: int = opt(0, "Take every N-th decoded frame instead of --sample-fps "
                              "(1 = every frame).", "video", min=0)
    all_frames: bool = opt(False, "Take every frame (same as --every-n-frames 1).", "video")
    segment_seconds: float = opt(300.0, "Split videos longer than 1.5x this many seconds "
                                 "into segments of this length (the last takes the rest), "
                                 "processed in parallel; each decodes from the keyframe before "
                                 "its start, and frame indexes, timestamps and the one files "
                                 "row per video are those of an unsplit run. 0 = one task per "
                                 "video. 300 s at 2 fps is 600 sampled frames per task.",
                                 "video", min=0)
    decode_threads: int = opt(1, "FFmpeg threads per video decoder. 1: each cropper actor "
                              "keeps to its one CPU and Ray spreads files, and the segments "
                              "of long videos, over the cores (FFmpeg's frame threads cost "
                              "4-11%% more CPU per frame; BENCHMARKS.md 1 and 7). More helps "
                              "only a few videos on an idle machine.", "video", min=1)

    # --- face detection (fer_batch/detect.py; the detectors compared in BENCHMARKS.md)
    detector: str = opt("centerface", "Face detector: centerface (a CNN on ONNX Runtime; its "
                        "weights ship in the package) or "
                        "haar (the paper's Haar cascade, OpenCV). centerface finds 43 of the 43 "
                        "labelled faces of the shared photos at ~27 ms per 1080p frame, haar 36 "
                        "at ~660 ms, neither any face on the no-face clips (BENCHMARKS.md).",
                        "detection", choices=DETECTORS)
    detect_on: str = opt("auto", "Where faces are detected: cpu (in each cropper actor: ONNX "
                         "Runtime for centerface, OpenCV for haar); pool (centerface only: "
                         "the croppers send frames downscaled to --centerface-max-side to a "
                         "pool of detector actors that run CenterFace batched on the GPUs, "
                         "beside the classifier, on the CPU where there is none; needs "
                         "onnx2torch); auto (pool when the job runs on GPUs with centerface, "
                         "else cpu).", "detection", choices=("auto", "cpu", "pool"))
    centerface_max_side: int = opt(576, "centerface: detect on a copy downscaled so its longer "
                                   "side is at most this many pixels (0 = full resolution). 576: "
                                   "as many faces in 1080p frames as 640, at less CPU "
                                   "(BENCHMARKS.md).", "detection", min=0)
    centerface_threshold: float = opt(0.5, "centerface: smallest face score (0-1); higher = "
                                      "fewer false positives (0.4-0.6 found the same labelled "
                                      "faces and no false ones, BENCHMARKS.md).", "detection",
                                      gt=0, max=1)
    detect_max_side: int = opt(1280, "haar: detect on a copy downscaled so its longer side is "
                               "at most this many pixels; boxes are mapped back to original "
                               "pixels. 0 = full resolution. 1280 keeps >=95%% of full-resolution "
                               "detections on the photo set (see BENCHMARKS.md).", "detection",
                               min=0)
    scale_factor: float = opt(1.1, "Haar cascade scaleFactor (image pyramid step).", "detection",
                              gt=1)
    min_neighbors: int = opt(5, "Haar cascade minNeighbors (higher = fewer false positives).",
                             "detection", min=0)
    min_face: int = opt(24, "Smallest face side to detect, in original pixels. centerface "
                        "also detects on a copy no larger than such a face needs (24 px at "
                        "the network's input, the smallest it finds reliably): when only "
                        "faces of 50+ px matter, --min-face 50 cuts the work on a 360p frame "
                        "to a third (BENCHMARKS.md section 9).", "detection", min=0)
    verify: bool = opt(True, "Confirm each detection with a second cascade (frontalface_alt2) "
                       "on the box and its margin: removes most false positives at no cost "
                       "in recall on the annotated photos.", "detection")
    max_pixels: int = opt(120_000_000, "Refuse images and video frames with more pixels than "
                          "this (decompression bombs) before decoding them.", "detection",
                          min=1)
    max_image_bytes: int = opt(512 * 2**20, "Refuse image files larger than this many bytes "
                               "before reading them (an image is read whole into memory).",
                               "detection", min=1)

    # --- inference
    batch_size: int = opt(256, "Faces per inference batch.", "inference", min=1)
    device: str = opt("auto", "auto (GPU when the cluster has one at start), cpu or cuda "
                      "(use cuda on autoscaling clusters whose GPU nodes start at zero).",
                      "inference", choices=("auto", "cpu", "cuda"))
    flip_average: bool = opt(True, "Average each face's probabilities with those of its "
                             "mirror image (test-time augmentation: +0.8 points on FER2013 "
                             "val with the shipped model, MODEL.md); twice the inference "
                             "work, a few per cent of a CPU run.", "inference")
    min_score: float = opt(0.4, "Below this top probability (the calibrated score) the label "
                           "is 'uncertain'; the probabilities are kept. 0.4: on FER2013 val "
                           "the shipped model marks 11%% of the faces uncertain (they are "
                           "right 26%% of the time), and the rest are right 69%% of the time "
                           "(64%% over all faces; MODEL.md). 0 = always the most probable "
                           "class.", "inference", min=0, max=1)

    # --- face tracks (videos; see docs/report.md)
    track_iou_threshold: float = opt(0.3, "Smallest IoU between a track's predicted box and a "
                                     "face to link them.", "tracks", min=0, max=1)
    track_max_gap_s: float = opt(2.0, "A track ends after this many seconds without a face.",
                                 "tracks", min=0)
    track_smooth_s: float = opt(1.0, "Width of the centred moving average over per-frame "
                                "probabilities before a track is cut into label segments.",
                                "tracks", min=0)

    # --- cluster
    address: Optional[str] = opt(None, "Ray cluster to join (e.g. ray://head:10001 or auto). "
                                 "Default: the cluster of a `ray job submit` job, else an "
                                 "in-process local Ray.", "cluster")
    preprocess_actors: int = opt(0, "CPU actors for decode+detect+crop (0 = one per CPU, "
                                 "autoscaling on a cluster).", "cluster", min=0)
    infer_actors: int = opt(0, "Inference actors (0 = one per GPU, or 1 on CPU).", "cluster",
                           min=0)
    images_per_task: int = opt(32, "Images processed in one Ray task (up to 64 MiB of them); "
                               "1 = one task per file. Videos always get a task each.",
                               "cluster", min=1)
    max_file_retries: int = opt(2, "Times a file that crashes its worker is retried before it "
                                "is recorded as an error.", "cluster", min=0)
    stall_timeout_s: float = opt(300.0, "A file that makes no progress (no frame decoded, no "
                                 "image finished) for this many seconds is hung: its worker is "
                                 "restarted and the file retried, then recorded as an error "
                                 "(--max-file-retries). Put as a rate: a file must decode at "
                                 "least 1 frame per this many seconds. 0 = no limit.",
                                 "cluster", min=0)

    def check(self) -> None:
        """The options alone, before Ray starts, the same for the CLI and a library caller
        (pipeline.run): every bound (check_bounds), and --detect-on pool runs CenterFace.
        Raises ConfigError. (cli.check_annotate adds the model, S3 and the sources.)"""
        check_bounds(self)
        if self.detect_on == "pool" and self.detector != "centerface":
            raise ConfigError("--detect-on pool runs CenterFace: use --detector centerface, "
                              "or --detect-on cpu")


@dataclass(frozen=True)
class TrainConfig:
    # --- data
    data: tuple = opt((SHARED_CKPLUS,), "Labeled folders, one subfolder per class (local or "
                      "s3://). Class folder names go through one vocabulary (angry = anger, "
                      "happy = happiness, ...); several folders train on the union of their "
                      "classes.", "data", positional=True, metavar="DATA")
    test_data: Optional[str] = opt(None, "Held-out labeled folder used as the test set (e.g. "
                                   "FER2013's val) instead of a split of DATA.", "data")
    output: str = opt("fer-model", "Output folder: model.pt, metrics.json, plots.", "data")
    detect_faces: bool = opt(False, "Find faces in training images with annotate's default "
                             "detector and train on the largest, cut as annotate cuts it (off: "
                             "images are already face crops, like CK+48).", "data")
    crop_margin: float = opt(0.1, "Margin added around each Haar box, as a fraction of its "
                             "side, before the 48x48 crop. Stored in the checkpoint: annotate "
                             "crops faces the same way (and --detect-faces here). 0.1 = how "
                             "FER2013 and CK+48 crops are framed around a Haar box "
                             "(experiments/framing.py: 0.098 and 0.093).", "data", min=0,
                             max=1)
    align: str = opt("none", "eyes: turn each face upright by the line through its eyes "
                     "(CenterFace's landmarks; faces rolled over 2 degrees) before the crop; "
                     "none: cut the box as found. Stored in the checkpoint beside "
                     "--crop-margin: annotate and evaluate --detect-faces cut faces the same "
                     "way. On JAFFE and the faceapi photos eyes measured no better than none "
                     "(RESULTS.md), so none is the default.", "data", choices=ALIGNS)
    endpoint_url: Optional[str] = opt(None, "S3 endpoint for S3-compatible stores.", "data")

    # --- split
    split: str = opt("random", "random (the paper: stratified) or subject (no subject in both "
                     "train and test).", "split", choices=("random", "subject"))
    test_fraction: float = opt(0.2, "Share of images (random) or subjects (subject) held out.",
                               "split", gt=0, lt=1)
    folds: int = opt(0, "K-fold cross-validation by subject (0 = one split).", "split",
                     min=0)
    seed: int = opt(0, "Seed for the split, initialisation and shuffling.", "split")
    subject_column: str = opt("subject", "labels.csv column with the subject id.", "split")
    subject_pattern: str = opt(r"^([A-Za-z]+\d*)[._]", "Regex whose first group is the subject "
                               "id in a file name, when labels.csv has none.", "split")

    # --- model and optimisation (defaults = the paper)
    pretrained: str = opt("none", "none; imagenet (torchvision weights, downloaded when "
                          "online); PATH to a model.pt written by `fer-batch train` (transfer "
                          "learning: backbone reused, classifier rebuilt for the new classes); "
                          "default (the model shipped in the repository); or PATH to a "
                          "torchvision resnet50 weights file.", "model")
    stem: str = opt("imagenet", "imagenet: torchvision's 7x7/2 conv + max-pool; small: 3x3/1 "
                    "conv, no max-pool (keeps 48x48 detail).", "model", choices=STEMS)
    lr: float = opt(1e-4, "Adam learning rate (paper: 1e-4).", "model", gt=0)
    batch_size: int = opt(8, "Images per step per worker (paper: 8).", "model", min=1)
    epochs: int = opt(8, "Training epochs (paper: 8).", "model", min=1)
    augment: bool = opt(False, "Random flips, shifts, scale, small rotations and "
                        "brightness/contrast on training images.", "model")
    optimizer: str = opt("adam", "adam (paper; --weight-decay is an L2 penalty) or adamw "
                         "(decoupled weight decay).", "model", choices=("adam", "adamw"))
    class_weight: str = opt("none", "Loss weight per class: none, sqrt (1/sqrt(frequency)) or "
                            "balanced (1/frequency), normalised to mean 1; helps rare classes "
                            "such as FER2013's disgust.", "model",
                            choices=("none", "sqrt", "balanced"))
    precision: str = opt("auto", "auto (bf16 autocast on GPUs and on CPUs with bf16 support, "
                         "else fp32), bf16 or fp32.", "model", choices=("auto", "bf16", "fp32"))
    schedule: str = opt("constant", "Learning-rate schedule: constant (paper), cosine (5%% "
                        "warm-up, then decay to 0), onecycle (warm-up to --lr, then decay) or "
                        "restarts (cosine with warm restarts: cycles of 1/7, 2/7 and 4/7 of "
                        "--epochs, each annealed to 0, so a long campaign can stop with a "
                        "finished model at the end of each cycle: --stop-after).", "model",
                        choices=("constant", "cosine", "onecycle", "restarts"))
    label_smoothing: float = opt(0.0, "Cross-entropy label smoothing (paper: 0).", "model")
    weight_decay: float = opt(0.0, "Adam L2 penalty (paper: 0).", "model")
    calibration_fraction: float = opt(0.0, "Share of the training images held out "
                                      "(stratified, --seed) and never trained on, to fit the "
                                      "temperature that makes the scores mean what they say "
                                      "(stored in the checkpoint; annotate and evaluate apply "
                                      "it). 0 = no temperature (1).", "split", min=0, max=0.5)
    channels: str = opt("equalized", "Model input planes, comma-separated: equalized (the "
                        "equalized gray crop) and canny (its Canny edges, the paper's edge "
                        "step as a second channel). Stored in the checkpoint; annotation "
                        "makes the same planes.", "model")

    # --- cluster
    num_workers: int = opt(0, "Ray Train workers (0 = one per GPU, else 2 CPU workers that "
                           "share the CPUs: each uses CPUs // workers torch threads).", "cluster")
    use_gpu: str = opt("auto", "auto, yes or no.", "cluster", choices=("auto", "yes", "no"))
    address: Optional[str] = opt(None, "Ray cluster to join (default: job's cluster or local).",
                                 "cluster")
    storage_path: Optional[str] = opt(None, "Where Ray Train keeps per-epoch checkpoints "
                                      "(default: OUTPUT/_ray_train; use shared storage or s3:// "
                                      "on a multi-node cluster).", "cluster")
    resume_from: Optional[str] = opt(None, "Resume a run from its Ray Train checkpoints: a "
                                     "run folder under --storage-path, local or s3:// "
                                     "(its newest checkpoint_*), or one checkpoint_* folder "
                                     "(state.pt: weights, optimizer, epoch, RNG). With the "
                                     "same --epochs and --schedule the run continues the same "
                                     "schedule exactly.", "cluster")
    run_name: Optional[str] = opt(None, "Name of the run's checkpoint folder under "
                                  "--storage-path (default fer-train-DATE-TIME); a campaign "
                                  "names it once and resumes it by that name.", "cluster")
    start_epoch: int = opt(0, "Begin the schedule after this epoch, from the weights of "
                           "--pretrained and a new optimizer: a campaign goes on on a machine "
                           "that lacks its checkpoints (MODEL.md names the epoch the shipped "
                           "model reached). Not with --resume-from.", "cluster", min=0)
    stop_after: int = opt(0, "Stop after this epoch (0 = at --epochs): that epoch's model is "
                          "scored and written as model.pt, and the per-epoch checkpoints stay "
                          "under --storage-path for a later --resume-from, which goes on with "
                          "the same schedule.", "cluster", min=0)

    @property
    def last_epoch(self) -> int:
        """The epoch this run stops after: --stop-after, else --epochs (the schedule's end)."""
        return min(self.epochs, self.stop_after) if self.stop_after else self.epochs

    def check(self) -> None:
        """The options alone, before anything is read: every bound (check_bounds) and the
        rules between options. Raises ConfigError. (train.check_training adds the data,
        the checkpoints and the weights.)"""
        check_bounds(self)
        if not self.data:
            raise ConfigError("name at least one labeled folder (DATA)")
        if self.folds == 1:
            raise ConfigError("--folds must be 0 (one split) or at least 2")
        if self.folds and self.test_data:
            raise ConfigError("--folds and --test-data exclude each other")
        if self.start_epoch and (self.resume_from or self.pretrained == "none"
                                 or self.start_epoch >= self.last_epoch):
            raise ConfigError("--start-epoch goes on from --pretrained weights (not with "
                              "--resume-from) and must be before --stop-after and --epochs")


# The defaults as values, for stage constructors and functions called outside the CLI (tests,
# notebooks): `FaceCropper()` behaves like `fer-batch annotate` without flags.
ANNOTATE_DEFAULTS = AnnotateConfig()
TRAIN_DEFAULTS = TrainConfig()


@dataclass(frozen=True)
class DetectorSettings:
    """--detector and its settings (AnnotateConfig's detection options) as one value, for
    detect.load_detector and FaceCropper: ``DetectorSettings.of(cfg)`` reads them off a
    config, ``DetectorSettings()`` is the CLI's defaults."""
    detector: str = ANNOTATE_DEFAULTS.detector
    centerface_max_side: int = ANNOTATE_DEFAULTS.centerface_max_side
    centerface_threshold: float = ANNOTATE_DEFAULTS.centerface_threshold
    detect_max_side: int = ANNOTATE_DEFAULTS.detect_max_side
    scale_factor: float = ANNOTATE_DEFAULTS.scale_factor
    min_neighbors: int = ANNOTATE_DEFAULTS.min_neighbors
    min_face: int = ANNOTATE_DEFAULTS.min_face
    verify: bool = ANNOTATE_DEFAULTS.verify

    @classmethod
    def of(cls, cfg, **changes) -> "DetectorSettings":
        """The detection options of cfg (an AnnotateConfig), with changes applied."""
        return replace(cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)}), **changes)
