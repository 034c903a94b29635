"""Test-time averaging: what each extra view of a face buys on FER2013 val, and what it costs
per face on this CPU (issue 22, item 6). BENCHMARKS.md section 13 is this script's table.

Views of a prepared face (48x48, equalized): the face itself, its mirror image, and the face
shifted by SHIFT_PX pixels left, right, up and down (edges replicated: training shifts faces
by up to 4 pixels the same way), each shifted view also mirrored. A setting averages the
softmax of its views (calibrate.probabilities, with the checkpoint's temperature), as annotate
averages the face and its mirror image.

    .venv/bin/python experiments/tta.py [--model PATH] [--limit N] [--out runs/tta]

Cost: ms of one thread per face for one view, measured on the real predict_logits path
(batch 64, fp32, channels_last as annotate runs it on a CPU), times the number of views.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import sys

import numpy as np
import torch

from fer_batch import calibrate, evaluate, infer
from fer_batch.config import DEFAULT_MODEL
from fer_batch.model import crop_margin_of, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import machine_state  # noqa: E402 - the repository's bench helpers
FER_VAL = os.path.join(ROOT, "..", "shared", "fer2013", "val")
SHIFT_PX = 2
SHIFTS = ((SHIFT_PX, 0), (-SHIFT_PX, 0), (0, SHIFT_PX), (0, -SHIFT_PX))  # (dx, dy)
SETTINGS = {  # name -> views: (dx, dy, mirrored)
    "one view": [(0, 0, False)],
    "flip (shipped)": [(0, 0, False), (0, 0, True)],
    "flip + 4 shifts": [(0, 0, False), (0, 0, True)] + [(dx, dy, False) for dx, dy in SHIFTS],
    "flip + 4 shifts, mirrored too": [(0, 0, False), (0, 0, True)]
    + [(dx, dy, m) for dx, dy in SHIFTS for m in (False, True)],
}


def shifted(faces: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """faces (n, C, h, w) moved dx pixels right and dy down, the edges replicated."""
    p = SHIFT_PX
    padded = np.pad(faces, ((0, 0), (0, 0), (p, p), (p, p)), mode="edge")
    h, w = faces.shape[2:]
    return np.ascontiguousarray(padded[:, :, p - dy:p - dy + h, p - dx:p - dx + w])


def view_logits(model, faces: np.ndarray) -> dict:
    """(dx, dy, mirrored) -> logits (n, classes) of every view any setting uses."""
    out = {}
    for dx, dy in [(0, 0), *SHIFTS]:
        x = shifted(faces, dx, dy) if (dx, dy) != (0, 0) else faces
        both = infer.predict_logits(model, x, flip_average=True, progress=True)
        out[(dx, dy, False)], out[(dx, dy, True)] = both[:, 0], both[:, 1]
    return out


def ms_per_view(model, faces: np.ndarray, repeats: int = 3) -> float:
    """One thread's ms per face for one view, best of `repeats` passes over faces."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        infer.predict_logits(model, faces[:64], flip_average=False)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            infer.predict_logits(model, faces, flip_average=False)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 1000 * best / len(faces)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--data", default=FER_VAL)
    ap.add_argument("--limit", type=int, default=0, help="first N faces only (a quick check)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "tta"))
    args = ap.parse_args()
    model, meta = load_checkpoint(args.model)
    got = evaluate.labeled_faces(args.data, meta, None, False, crop_margin_of(meta), "haar")
    faces, y = got["faces"], got["y_true"]
    if args.limit:
        faces, y = faces[:args.limit], y[:args.limit]
    temperature = infer.temperature_of(meta)
    logits = view_logits(model, faces)
    one = ms_per_view(model, faces[:512])
    rows = []
    for name, views in SETTINGS.items():
        stacked = np.stack([logits[v] for v in views], axis=1)
        probs = calibrate.probabilities(stacked, temperature)
        summary = calibrate.summarize(probs, y)
        rows.append(dict(setting=name, views=len(views), ms_per_face=round(one * len(views), 2),
                         accuracy=round(100 * float((probs.argmax(1) == y).mean()), 2),
                         ece=round(100 * summary["ece"], 2),
                         at_80=round(100 * summary["accuracy_at_coverage"]["0.8"]["accuracy"],
                                     2)))
    record = dict(model=meta.get("model_id"), data=args.data, n=len(y), shift_px=SHIFT_PX,
                  temperature=temperature, ms_per_view=round(one, 2), rows=rows,
                  machine=machine_state())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tta.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"model {record['model']}, {len(y)} faces of {args.data}, temperature "
          f"{temperature:.3f}, {one:.2f} ms per view per face (1 thread)\n")
    print("| setting | views | ms per face (1 thread) | accuracy % | ECE % | accuracy at 80% "
          "coverage % |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['views']} | {r['ms_per_face']} | {r['accuracy']} | "
              f"{r['ece']} | {r['at_80']} |")


if __name__ == "__main__":
    main()
