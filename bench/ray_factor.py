"""Ray's overhead factor with today's defaults (CenterFace): CPU of a whole `fer-batch
annotate` run against the same work done in one process without Ray.

docs/scaling.md prices the night as (sum of stage costs) x a Ray factor; the factor 1.3
was measured in the Haar era, when detection was 91% of the work. This measures it again:

    in-process  FaceCropper.process + FacePredictor on one thread each (the actors' own
                code and thread settings, called directly): CPU s of this process
    pipeline    `fer-batch annotate VIDEO` with Ray started in-process (the local
                default): CPU s of the whole process tree (driver, raylet, GCS, workers),
                less the same for a one-photo run (start-up, model load, commit)
    factor      (pipeline - one-photo run) / in-process

The input is the shared 1080p clip looped to --minutes (`bench/segments.loop_video`;
B-frames, a keyframe every 4.2 s; written under /tmp and deleted at the end), or --source
(files or folders), annotated with the shipped defaults (2 fps, CenterFace at 576, flip
averaging) or --all-frames.

    .venv/bin/python bench/ray_factor.py [--minutes 2 | --source PATH ...] [--all-frames]
        [--out bench/_work/ray_factor.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common as C  # noqa: E402
from bench.segments import CLIP, loop_video  # noqa: E402


def in_process(sources_: list[str], every_n: int) -> dict:
    """CPU s of the cropper's and the classifier's work on the sources, in this process."""
    import cv2
    import numpy as np
    import torch

    from fer_batch import sources
    from fer_batch.infer import FacePredictor
    from fer_batch.model import load_checkpoint
    from fer_batch.preprocess import FaceCropper
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    _, meta = load_checkpoint("default")
    cropper = FaceCropper(channels=meta["input"]["channels"], face_size=meta["input"]["size"],
                          crop_margin=float(meta["preprocessing"].get("crop_margin", 0.0)),
                          every_n_frames=every_n)
    predictor = FacePredictor(checkpoint="default", num_threads=1)
    entries = [e for e in sources.list_files(sources_) if e["status"] == "pending"]
    t0 = time.process_time()
    batches = [b for entry in entries for b in cropper.process(entry)]
    crop_s = time.process_time() - t0
    faces = int(sum((b["kind"] == "face").sum() for b in batches))
    t0 = time.process_time()
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    predictor(merged)
    classify_s = time.process_time() - t0
    return dict(cropper_cpu_s=round(crop_s, 2), classifier_cpu_s=round(classify_s, 2),
                cpu_s=round(crop_s + classify_s, 2), faces=faces)


def annotate(source: list, out: Path, log: Path, extra: list) -> dict:
    res = C.run_measured([C.PY, "-m", "fer_batch", "annotate", *map(str, source), "--output",
                          str(out), *extra], pss=False, log=log)
    manifest = json.loads(next((out / "_runs").glob("*.json")).read_text()) \
        if res["rc"] == 0 else {}
    return dict(rc=res["rc"], wall_s=res["wall_s"], cpu_s=res["cpu_s"],
                peak_rss_mib=res["peak_rss_mib"],
                faces=manifest.get("faces"), frames=manifest.get("frames"),
                cpu_by_process=res["cpu_by_process"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--source", nargs="+", default=None,
                    help="annotate these files or folders instead of the looped 1080p clip")
    ap.add_argument("--all-frames", action="store_true", help="every frame, not 2 fps")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fer-rayfactor-"))
    try:
        if a.source:
            video = dict(path=None, seconds=None, bytes=0)
            source = a.source
        else:
            video = loop_video(CLIP, work / "long_1080p.mp4", a.minutes)
            source = [video["path"]]
        extra = ["--all-frames"] if a.all_frames else []
        state = C.machine_state()
        photo = work / "one" / "photo.jpg"
        photo.parent.mkdir()
        shutil.copy(C.gt_photos()[0], photo)
        fixed = annotate([photo.parent], work / "out_one", work / "one.log", extra)
        C.log(f"one-photo run: {fixed['cpu_s']} CPU s, {fixed['wall_s']} s")
        run = annotate(source, work / "out_video", work / "video.log", extra)
        C.log(f"video run: {run['cpu_s']} CPU s, {run['wall_s']} s, {run['faces']} faces")
        alone = in_process(source, 1 if a.all_frames else 0)
        C.log(f"in process: {alone}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    net = run["cpu_s"] - fixed["cpu_s"]
    factor = net / alone["cpu_s"]
    res = dict(source=source, all_frames=a.all_frames, video=video, machine=state,
               one_photo_run=fixed, video_run=run, in_process=alone,
               pipeline_net_cpu_s=round(net, 1), factor=round(factor, 2))
    if a.out:
        C.save_json(Path(a.out), res)
    what = " ".join(a.source) if a.source else \
        f"{video['seconds']} s of 1920x1080 H.264 ({video['bytes'] / 2**20:.0f} MiB)"
    print(f"\n{what}, {'--all-frames' if a.all_frames else 'shipped defaults'}; machine: "
          f"{state.get('cpu_model')}, {state.get('cpus')} CPUs, load {state.get('loadavg')}; "
          f"git {state.get('git')}\n")
    print("| run | rc | wall s | CPU s (process tree) | peak RSS MiB (tree) | faces |")
    print("|---|---|---|---|---|---|")
    print(f"| one photo (start-up, model, commit) | {fixed['rc']} | {fixed['wall_s']} | "
          f"{fixed['cpu_s']} | {fixed['peak_rss_mib']} | {fixed['faces']} |")
    print(f"| the input | {run['rc']} | {run['wall_s']} | {run['cpu_s']} | "
          f"{run['peak_rss_mib']} | {run['faces']} |")
    print(f"| the input in one process, no Ray (cropper {alone['cropper_cpu_s']} + "
          f"classifier {alone['classifier_cpu_s']}) | | | {alone['cpu_s']} | | "
          f"{alone['faces']} |")
    print(f"\nRay factor: ({run['cpu_s']} - {fixed['cpu_s']}) / {alone['cpu_s']} = "
          f"**{factor:.2f}**")
    print("CPU s by process (video run):", json.dumps(run["cpu_by_process"]))


if __name__ == "__main__":
    main()
