"""Labeled folders: the expression vocabulary, listing, loading faces, subject ids.

No torch and no Ray here: train and evaluate both read labeled data through this module.

A labeled folder holds one subfolder per class (``DATA/happy/0001.jpg``). Folder names go
through one vocabulary (``canonical``), so FER2013's ``happy``, CK+'s ``happiness`` and
``Happy`` are the same class everywhere: in training, in evaluation and in the checkpoint,
which stores canonical names only.
"""

from __future__ import annotations

import csv
import io
import re

import numpy as np

from fer_batch import decode, detect, preprocess, sources, storage
from fer_batch.config import ANNOTATE_DEFAULTS, FACE_SIZE, TRAIN_DEFAULTS

LABELS_FILE = "labels.csv"  # optional per-image metadata at the root of DATA (path, subject)

# canonical name -> accepted folder names (compared lower-case, '-'/' ' read as '_')
VOCABULARY = {
    "anger": ("anger", "angry", "mad"),
    "contempt": ("contempt", "contemptuous"),
    "disgust": ("disgust", "disgusted"),
    "fear": ("fear", "fearful", "afraid", "scared"),
    "happiness": ("happiness", "happy", "joy", "happy_face"),
    "neutral": ("neutral", "calm", "none"),
    "sadness": ("sadness", "sad"),
    "surprise": ("surprise", "surprised"),
}
_SYNONYMS = {alias: name for name, aliases in VOCABULARY.items() for alias in aliases}


def canonical(name: str) -> str:
    """Canonical expression name of a class folder: 'Happy' -> 'happiness', 'angry' -> 'anger'.
    Names outside the vocabulary are kept as they are (lower-cased), so a custom label set
    still trains."""
    key = re.sub(r"[\s\-]+", "_", name.strip().lower())
    return _SYNONYMS.get(key, key)


def list_labeled(data: str, endpoint_url: str | None = None):
    """Images of one labeled folder (local or s3://).

    Returns (paths relative to data with '/' separators, canonical class per image,
    sorted canonical class names). Hidden files and non-images are ignored.
    """
    import pyarrow.fs as pafs
    fs, root = storage.resolve(data, endpoint_url)
    root = root.rstrip("/")
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"labeled data {data}: not a folder")
    paths = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = info.path[len(root) + 1:].replace("\\", "/")
        parts = rel.split("/")
        if (info.type == pafs.FileType.File and len(parts) >= 2
                and not any(p.startswith(".") for p in parts)
                and sources.media_type(rel) == "image"):
            paths.append(rel)
    paths.sort()
    labels = [canonical(p.split("/")[0]) for p in paths]
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"labeled data {data}: need images in at least 2 class subfolders, "
                         f"found {classes or 'none'}")
    return paths, labels, classes


def list_many(folders, endpoint_url: str | None = None):
    """The union of several labeled folders.

    Returns (list of (folder, relative path), canonical class per image, sorted union of
    the classes). FER2013 (7 classes with neutral) + CK+48 (7 with contempt) gives 8.
    """
    items, labels = [], []
    for folder in folders:
        paths, labs, _ = list_labeled(folder, endpoint_url)
        items += [(folder, p) for p in paths]
        labels += labs
    return items, labels, sorted(set(labels))


def load_faces(items, detect_faces: bool = False, endpoint_url: str | None = None,
               channels=preprocess.CHANNELS, size: int = FACE_SIZE,
               crop_margin: float = TRAIN_DEFAULTS.crop_margin, progress=None,
               detector: str = ANNOTATE_DEFAULTS.detector, align: str = TRAIN_DEFAULTS.align):
    """Decode and prepare labeled images: the same pixels ``annotate`` feeds the model.

    items: (folder, relative path) pairs. With detect_faces the largest face found by
    `detector` (centerface: annotate's default; haar: the paper's cascade; both with
    annotate's settings) is cut out by ``preprocess.crop_faces`` with crop_margin and align:
    the crop annotate makes of that face; the whole image when no face is found. Without it
    the image is taken as a ready-made face crop (CK+48, FER2013).

    Returns (faces np.ndarray shape = (n_ok, C, size, size) uint8, ok bool mask over items,
    skipped [{path, error}]). A file that cannot be read or decoded is skipped, not fatal.
    """
    # CenterFace boxes are mapped to the Haar framing (detect.haar_framing): one crop_margin
    find = detect.load_detector(detector) if detect_faces else None
    crops, ok, skipped = [], [], []
    for folder, rel in items:
        try:
            gray = decode.decode_image(storage.read_bytes(f"{folder.rstrip('/')}/{rel}",
                                                          endpoint_url))
            if find is not None:
                gray = preprocess.largest_face(gray, find, margin=crop_margin, size=size,
                                               align=align)
            crops.append(preprocess.prepare_faces(gray[None], channels, size)[0])
            ok.append(True)
        except (decode.DecodeError, OSError, ValueError) as e:
            skipped.append({"path": f"{folder.rstrip('/')}/{rel}", "error": str(e)})
            ok.append(False)
        if progress is not None:
            progress(1)
    faces = np.stack(crops) if crops else np.zeros((0, len(channels), size, size), np.uint8)
    return faces, np.array(ok, bool), skipped


def read_subjects(data: str, paths, column: str = "subject", pattern: str = r"^([A-Za-z]+\d*)[._]",
                  endpoint_url: str | None = None) -> np.ndarray:
    """Subject id per image: labels.csv (columns path, COLUMN; path relative to data) when it
    lists the file, else the first regex group matched on the file name. Raises ValueError
    for files with neither."""
    table = {}
    try:
        text = storage.read_bytes(f"{data.rstrip('/')}/{LABELS_FILE}", endpoint_url).decode()
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
