"""Faces levelled by their eyes before the crop (--align eyes) against faces cut as found
(issue 22, item 4): accuracy of one model on the labelled full photos, and how rolled the
faces of the shared photos and videos are. RESULTS.md's alignment block is its output.

    .venv/bin/python experiments/align.py [--model PATH] [--out runs/align]

Both ways run the same CenterFace detection (annotate's settings) and the model's own crop
margin; the only difference is preprocess.crop_faces' rolls (detect.eye_roll of
CenterFace's eye landmarks). Scores: the model's calibrated probabilities with flip
averaging, as annotate. JAFFE (213 posed studio photos, 7 classes) and the 7 faceapi
expression photos are labelled; the videos (sampled at 2 fps) and the other photos are
not, so for them only the rolls are counted, and a contact sheet of the most rolled faces,
cut both ways, is written for a look (align_sheet.png).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import cv2
import numpy as np

from fer_batch import decode, detect, infer, labeled, preprocess, storage
from fer_batch.config import DEFAULT_MODEL, DetectorSettings
from fer_batch.model import crop_margin_of, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")
SHEET_FACES = 24  # most rolled video faces on the contact sheet


def largest(boxes: np.ndarray, rolls: np.ndarray):
    i = int(np.argmax(boxes[:, 2] * boxes[:, 3]))
    return boxes[i:i + 1], rolls[i:i + 1]


def faces_of(gray: np.ndarray, session, settings: DetectorSettings):
    """(boxes, rolls) of CenterFace with annotate's settings."""
    return detect.detect_centerface(gray, session, max_side=settings.centerface_max_side,
                                    threshold=settings.centerface_threshold,
                                    min_face=settings.min_face, rolls=True)


def score_photos(items, model, meta, session, settings, margin):
    """[(gray photo, class index)] -> dict(plain=correct list, aligned=..., rolls=[...])."""
    temperature, channels = infer.temperature_of(meta), tuple(meta["input"]["channels"])
    size = int(meta["input"]["size"])
    crops = {"plain": [], "aligned": []}
    ys, rolls = [], []
    for gray, y in items:
        boxes, roll = faces_of(gray, session, settings)
        if not len(boxes):
            boxes, roll = np.array([[0, 0, gray.shape[1], gray.shape[0]]]), np.zeros(1)
        boxes, roll = largest(boxes, roll)
        crops["plain"].append(preprocess.crop_faces(gray, boxes, size, margin)[0])
        crops["aligned"].append(preprocess.crop_faces(gray, boxes, size, margin, roll)[0])
        ys.append(y)
        rolls.append(float(roll[0]))
    out = dict(rolls=rolls, y=ys)
    for name, c in crops.items():
        probs = infer.predict(model, preprocess.prepare_faces(np.stack(c), channels, size),
                              temperature=temperature)
        out[name] = (probs.argmax(1) == np.array(ys)).tolist()
        out[name + "_labels"] = probs.argmax(1).tolist()
    return out


def video_faces(session, settings, margin, size):
    """Rolls of every face CenterFace finds in the shared videos at 2 fps, and the crops of
    the SHEET_FACES most rolled, cut both ways."""
    rolled = []
    for path in sorted(glob.glob(f"{DATA}/videos/*.*")):
        if path.endswith(".csv") or path.endswith(".md"):
            continue
        with open(path, "rb") as f:
            for _, _, gray in decode.iter_frames(f, sample_fps=2.0,
                                                 stats=decode.VideoStats()):
                boxes, rolls = faces_of(gray, session, settings)
                for b, r in zip(boxes, rolls):
                    rolled.append((abs(float(r)), float(r), gray, b))
    rolls = [r for _, r, _, _ in rolled]
    top = sorted(rolled, key=lambda t: -t[0])[:SHEET_FACES]
    pairs = [np.hstack([preprocess.crop_faces(g, b[None], size, margin)[0],
                        preprocess.crop_faces(g, b[None], size, margin, np.array([r]))[0]])
             for _, r, g, b in top]
    return rolls, pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "align"))
    args = ap.parse_args()
    model, meta = load_checkpoint(args.model)
    classes = [labeled.canonical(c) for c in meta["classes"]]
    margin, size = float(crop_margin_of(meta)), int(meta["input"]["size"])
    settings, session = DetectorSettings(), detect.load_centerface()
    paths, labels, _ = labeled.list_labeled(f"{DATA}/jaffe")
    jaffe = [(decode.decode_image(storage.read_bytes(f"{DATA}/jaffe/{p}")), classes.index(lab))
             for p, lab in zip(paths, labels) if lab in classes]
    faceapi = []
    for path in sorted(glob.glob(f"{DATA}/photos/faceapi_expr_*.jpg")):
        name = labeled.canonical(os.path.basename(path)[len("faceapi_expr_"):-4])
        faceapi.append((decode.decode_image(open(path, "rb").read()), classes.index(name)))
    record = dict(model=meta.get("model_id"), margin=margin, min_roll_deg=preprocess.MIN_ROLL_DEG)
    for name, items in (("jaffe", jaffe), ("faceapi", faceapi)):
        got = score_photos(items, model, meta, session, settings, margin)
        r = np.abs(got["rolls"])
        record[name] = dict(n=len(items), plain=int(sum(got["plain"])),
                            aligned=int(sum(got["aligned"])),
                            changed=int(sum(a != b for a, b in zip(got["plain_labels"],
                                                                   got["aligned_labels"]))),
                            rolled=int((r > preprocess.MIN_ROLL_DEG).sum()),
                            roll_median=round(float(np.median(r)), 2),
                            roll_p90=round(float(np.percentile(r, 90)), 2))
    rolls, pairs = video_faces(session, settings, margin, size)
    r = np.abs(rolls)
    record["videos"] = dict(faces=len(r), rolled=int((r > preprocess.MIN_ROLL_DEG).sum()),
                            roll_median=round(float(np.median(r)), 2),
                            roll_p90=round(float(np.percentile(r, 90)), 2))
    os.makedirs(args.out, exist_ok=True)
    if pairs:
        rows = [np.hstack(pairs[i:i + 4] + [np.zeros_like(pairs[0])] * (4 - len(pairs[i:i + 4])))
                for i in range(0, len(pairs), 4)]
        cv2.imwrite(os.path.join(args.out, "align_sheet.png"),
                    cv2.resize(np.vstack(rows), None, fx=2, fy=2,
                               interpolation=cv2.INTER_NEAREST))
    with open(os.path.join(args.out, "align.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
