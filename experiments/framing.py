"""Measure how a labeled folder of ready-made face crops is framed, relative to a Haar box.

annotate cuts faces out of frames around Haar boxes; CK+48 and FER2013 were cut by their
authors with their own framing. This script finds the Haar face inside each crop (upscaled
4x so the cascade has room) and reports where the box sits: the margin that turns a Haar
box into the dataset's frame is (1 / box side - 1) / 2. That margin is --crop-margin
(stored in the checkpoint), so annotate's crops look like the training crops.

    .venv/bin/python experiments/framing.py ../shared/fer2013/train ../shared/data/ckplus48
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np

from fer_batch import detect, labeled

UPSCALE = 4  # 48 -> 192 pixels: the cascade's 24 px window fits with room to slide


def framing(folder: str, step: int) -> dict:
    """Median Haar box (centre x, centre y, width, height as fractions of the crop) over
    every step-th image of folder, and the margin that makes the box the crop."""
    paths, _, _ = labeled.list_labeled(folder)
    cascade, found = detect.load_cascade(), []
    for rel in paths[::step]:
        gray = cv2.imread(f"{folder}/{rel}", cv2.IMREAD_GRAYSCALE)
        side = gray.shape[0] * UPSCALE
        big = cv2.resize(gray, (side, side), interpolation=cv2.INTER_CUBIC)
        boxes = detect.detect_faces(big, cascade, min_face=side // 3)
        if len(boxes):
            x, y, w, h = boxes[np.argmax(boxes[:, 2])]
            found.append(((x + w / 2) / side, (y + h / 2) / side, w / side, h / side))
    r = np.array(found)
    med = np.median(r, axis=0)
    return dict(folder=folder, images=len(paths[::step]), with_face=len(r),
                centre=med[:2].round(3).tolist(), side=float(med[2].round(3)),
                side_iqr=np.percentile(r[:, 2], [25, 75]).round(3).tolist(),
                margin=float(round((1 / med[2] - 1) / 2, 3)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--step", type=int, default=20, help="use every N-th image")
    args = p.parse_args(argv)
    cv2.setNumThreads(1)
    for folder in args.folders:
        m = framing(folder, args.step)
        print(f"{m['folder']}: Haar box found in {m['with_face']}/{m['images']} crops; median "
              f"box side {m['side']} of the crop (IQR {m['side_iqr']}), centre {m['centre']}; "
              f"margin {m['margin']}")


if __name__ == "__main__":
    main()
