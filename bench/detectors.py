"""Face detectors compared (issue 14): for each detector and setting, recall on the 43
hand-labelled faces of the shared photos (IoU >= 0.5, bench/common.recall), false
positives on the no-face clips (frames sampled as annotate does, 2 fps) and on the dog
photo, and CPU ms per frame at 1080p, 720p and 360p (one thread, median of a few frames).

    python bench/detectors.py [--out bench/_work/detectors.json] [--quick]
    python bench/detectors.py --framing    # measure detect.CENTERFACE_TO_HAAR
    python bench/detectors.py --min-face-scan    # measure detect.CENTERFACE_MIN_NET_FACE

CPU time is process_time of this one-threaded process (cv2 and ONNX Runtime pinned to one
thread), so another busy core slows the wall clock but hardly the figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common as C  # noqa: E402
from fer_batch import decode, detect  # noqa: E402
from fer_batch.config import ANNOTATE_DEFAULTS as D, DetectorSettings  # noqa: E402

NO_FACE_CLIPS = ("noface_intel_bottle-detection.mp4", "noface_intel_car-detection.mp4")
DOG_PHOTO = "noface_dlib_dogs.jpg"
# 1080p and 360p frames come from the shared clips; there is no 720p clip, so the 720p
# frames are the 1080p ones downscaled (INTER_AREA), as a 720p encode of the scene would be
TIMING_CLIPS = {"1080p": "facenet_pytorch_street.mp4",
                "360p": "face_recognition_short_hamilton_clip.mp4"}
TIMING_FRAMES = 5  # frames per resolution, spread over the clip; the median is reported
# faces in big frames, where the detect side matters (the labelled photos are ~500x375, under
# every side compared): detections on the 1080p street clip with 1-8 people, 2 fps sampling
CROWD_CLIP = "facenet_pytorch_street.mp4"

# label -> (detector, load_detector keywords beyond the defaults, min face as a share of the
# frame's shorter side or 0). The first Haar row is today's default (config.py).
SETTINGS = {
    "haar 1280 sf1.1 (default before)": ("haar", {}, 0),
    "haar 960 sf1.1": ("haar", dict(detect_max_side=960), 0),
    "haar 640 sf1.1": ("haar", dict(detect_max_side=640), 0),
    "haar 1280 sf1.2": ("haar", dict(scale_factor=1.2), 0),
    "haar 960 sf1.2": ("haar", dict(detect_max_side=960, scale_factor=1.2), 0),
    "haar 640 sf1.2": ("haar", dict(detect_max_side=640, scale_factor=1.2), 0),
    "haar 960 sf1.2 min 1/30 side": ("haar", dict(detect_max_side=960, scale_factor=1.2),
                                     1 / 30),
    "haar 1280 sf1.1 min 1/20 side": ("haar", {}, 1 / 20),
    "centerface 640 t0.5": ("centerface", {}, 0),
    "centerface 640 t0.4": ("centerface", dict(centerface_threshold=0.4), 0),
    "centerface 640 t0.6": ("centerface", dict(centerface_threshold=0.6), 0),
    "centerface 480 t0.5": ("centerface", dict(centerface_max_side=480), 0),
    "centerface 544 t0.5": ("centerface", dict(centerface_max_side=544), 0),
    "centerface 576 t0.5": ("centerface", dict(centerface_max_side=576), 0),
    "centerface 960 t0.5": ("centerface", dict(centerface_max_side=960), 0),
    "centerface 576 t0.5 --min-face 50": ("centerface", dict(min_face=50), 0),
}
QUICK = ("haar 1280 sf1.1 (default before)", "haar 960 sf1.2", "centerface 640 t0.5")


def build(label: str):
    """gray (h, w) uint8 -> boxes, for one row of SETTINGS."""
    name, kw, min_share = SETTINGS[label]
    det = detect.load_detector(DetectorSettings(detector=name, **kw))
    if not min_share:
        return det

    def relative(gray):  # min face relative to the frame: fewer pyramid levels on big frames
        det.kw["min_face"] = max(D.min_face, int(min_share * min(gray.shape[:2])))
        return det(gray)
    return relative


def clip_frames(name: str, sample_fps: float | None = D.sample_fps) -> list[np.ndarray]:
    """Gray frames of a shared clip: annotate's sampling (None = every frame)."""
    kw = dict(sample_fps=sample_fps) if sample_fps else dict(every_n=1)
    return [g for _, _, g in decode.iter_frames(str(C.VIDEOS / name), **kw)]


def timing_frames(quick: bool) -> dict[str, list[np.ndarray]]:
    n = 2 if quick else TIMING_FRAMES
    out = {}
    for res, clip in TIMING_CLIPS.items():
        frames = clip_frames(clip, None)
        out[res] = [frames[i] for i in np.linspace(0, len(frames) - 1, n + 2)[1:-1].astype(int)]
    out["720p"] = [cv2.resize(g, (1280, 720), interpolation=cv2.INTER_AREA)
                   for g in out["1080p"]]
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0].shape[0]))


def cpu_ms(fn, gray) -> float:
    t = time.process_time()
    fn(gray)
    return 1000 * (time.process_time() - t)


def measure(label: str, photos: dict, no_face: dict, timing: dict, crowd: list) -> dict:
    det = build(label)
    det(timing["360p"][0])  # warm-up (ONNX Runtime allocates on its first run)
    found = {n: [tuple(b) for b in det(g).tolist()] for n, g in photos.items()}
    fp_clips = {n: int(sum(len(det(g)) for g in frames)) for n, frames in no_face.items()}
    ms = {res: round(float(np.median([cpu_ms(det, g) for g in frames])), 1)
          for res, frames in timing.items()}
    return dict(setting=label, gt=C.recall(found), fp_no_face_clips=fp_clips,
                fp_no_face_frames=sum(len(f) for f in no_face.values()),
                fp_dog_photo=len(found.get(DOG_PHOTO, [])),
                faces_1080p_clip=int(sum(len(det(g)) for g in crowd)), crowd_frames=len(crowd),
                cpu_ms=ms)


def table(rows: list[dict]) -> str:
    res = list(rows[0]["cpu_ms"])
    out = ["| detector, setting | GT recall (of 43) | false faces, no-face clips "
           f"({rows[0]['fp_no_face_frames']} frames) | dog photo | faces found, 1080p street "
           f"clip ({rows[0]['crowd_frames']} frames) | "
           + " | ".join(f"CPU ms/frame {r}" for r in res) + " |",
           "|---|---|---|---|---|" + "---|" * len(res)]
    for r in rows:
        out.append(f"| {r['setting']} | {r['gt']['matched']} | "
                   f"{sum(r['fp_no_face_clips'].values())} | {r['fp_dog_photo']} | "
                   f"{r['faces_1080p_clip']} | "
                   + " | ".join(str(r["cpu_ms"][k]) for k in res) + " |")
    return "\n".join(out)


def framing() -> dict:
    """CenterFace's own boxes against the Haar boxes (annotate's Haar settings) of the same
    faces on every shared photo: the median side ratio (Haar side / sqrt(w h)) and centre
    shift (fraction of the CenterFace height) that detect.haar_framing applies."""
    haar = detect.load_detector("haar")
    session = detect.load_centerface()
    side, dy, dx = [], [], []
    for p in C.media_files(C.PHOTOS):
        g = decode.decode_image(p.read_bytes())
        hb = haar(g).tolist()
        cb = detect.detect_centerface(g, session, max_side=0, threshold=0.5, min_face=0,
                                      raw=True).tolist()
        for c in cb:  # the Haar box with the closest centre inside the CenterFace box
            cx, cy = c[0] + c[2] / 2, c[1] + c[3] / 2
            inside = [h for h in hb if abs(h[0] + h[2] / 2 - cx) < c[2] / 2
                      and abs(h[1] + h[3] / 2 - cy) < c[3] / 2]
            if not inside:
                continue
            h = min(inside, key=lambda h: (h[0] + h[2] / 2 - cx) ** 2 + (h[1] + h[3] / 2 - cy) ** 2)
            side.append(h[2] / np.sqrt(c[2] * c[3]))
            dy.append((h[1] + h[3] / 2 - cy) / c[3])
            dx.append((h[0] + h[2] / 2 - cx) / c[2])
    q = lambda xs: [round(float(v), 3) for v in np.percentile(xs, [25, 50, 75])]  # noqa: E731
    return dict(faces=len(side), side_ratio_q25_50_75=q(side), shift_y_q25_50_75=q(dy),
                shift_x_q25_50_75=q(dx))


# faces of known size for the scan: every third JAFFE photo (one face each) and frames of
# four clips with faces; not the labelled photos, which check the result (tests, recall)
SCAN_CLIPS = ("facenet_pytorch_street.mp4", "intel_face-demographics-walking.mp4",
              "face_recognition_short_hamilton_clip.mp4",
              "intel_head-pose-face-detection-male.mp4")
SCAN_SCALES = (0.8, 0.6, 0.5, 0.4, 0.33, 0.25, 0.2, 0.15, 0.1)
SCAN_BINS = (0, 8, 10, 12, 14, 16, 20, 24, 32, 48, 10**9)


def min_face_scan() -> list[dict]:
    """How small may a face be at CenterFace's input? Each image's faces found at full
    resolution (raw boxes) are looked for again at SCAN_SCALES of the image; a face counts
    as found at IoU >= 0.5. Recall per band of the face's side at the network's input."""
    from fer_batch.tracks import box_iou
    session = detect.load_centerface()
    images = [decode.decode_image(p.read_bytes())
              for p in sorted((C.DATA / "jaffe").rglob("*.tiff"))[::3]]
    for clip in SCAN_CLIPS:
        images += clip_frames(clip, 0.5)[:6]
    hit = np.zeros(len(SCAN_BINS) - 1)
    total = np.zeros(len(SCAN_BINS) - 1)

    def run(gray, side):
        return detect.detect_centerface(gray, session, max_side=side, threshold=0.5,
                                        min_face=0, raw=True)
    for gray in images:
        ref = run(gray, 0)
        for s in SCAN_SCALES:
            got = run(gray, int(max(gray.shape) * s))
            found = (box_iou(ref, got).max(axis=1) >= 0.5 if len(got)
                     else np.zeros(len(ref), bool))
            band = np.searchsorted(SCAN_BINS, np.sqrt(ref[:, 2] * ref[:, 3]) * s, "right") - 1
            np.add.at(total, band, 1)
            np.add.at(hit, band, found)
    return [dict(net_face_px=f"{lo}-{hi}" if hi < 10**9 else f"{lo}+", faces=int(n),
                 found=int(k), recall=round(float(k / n), 2))
            for lo, hi, n, k in zip(SCAN_BINS, SCAN_BINS[1:], total, hit) if n]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(C.WORK / "detectors.json"))
    ap.add_argument("--quick", action="store_true", help="3 settings, fewer timing frames")
    ap.add_argument("--framing", action="store_true", help="only measure CENTERFACE_TO_HAAR")
    ap.add_argument("--min-face-scan", action="store_true",
                    help="only measure CENTERFACE_MIN_NET_FACE (recall by face size at input)")
    ap.add_argument("--only", default="", help="only the settings whose label contains this")
    a = ap.parse_args(argv)
    cv2.setNumThreads(1)
    if a.framing:
        print(framing())
        return
    if a.min_face_scan:
        for row in min_face_scan():
            print(row)
        return
    state = C.machine_state()
    photos = {p.name: decode.decode_image(p.read_bytes()) for p in C.media_files(C.PHOTOS)
              if p.name in C.ground_truth() or p.name == DOG_PHOTO}
    no_face = {n: clip_frames(n) for n in NO_FACE_CLIPS}
    timing = timing_frames(a.quick)
    crowd = clip_frames(CROWD_CLIP)
    rows = []
    for label in [s for s in (QUICK if a.quick else SETTINGS) if a.only in s]:
        C.log(f"detectors: {label}")
        rows.append(measure(label, photos, no_face, timing, crowd))
    C.save_json(Path(a.out), dict(machine=state, rows=rows))
    print(f"machine: {state['cpus']} CPUs ({state['cpu_model']}), load {state['loadavg']}, "
          f"busy: {state['top']}; {state['date']}, git {state['git']}")
    print(table(rows))


if __name__ == "__main__":
    main()
