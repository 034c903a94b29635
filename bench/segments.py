"""One long 1080p video annotated as one task vs in time segments (--segment-seconds), on
one Ray cluster of 2 CPUs started once for all runs (issue 14: segments vs one task >= 1.8x).

The video is the shared 1080p clip (facenet_pytorch_street.mp4, 4.2 s, 25 fps, H.264, one
keyframe per copy) looped by stream copy to --minutes minutes: real 1080p packets, no
re-encoding, written under /tmp (never into the repository). Each run's outputs are compared:
the files row (frames, faces) and the face rows must be the same whatever the segmenting.

    .venv/bin/python bench/segments.py [--minutes 10] [--sample-fps 0.5] [--segments 0 300]
        [--decode-threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common as C  # noqa: E402

CLIP = C.VIDEOS / "facenet_pytorch_street.mp4"  # 1920x1080, 25 fps, 105 frames


def loop_video(src: Path, dst: Path, minutes: float) -> dict:
    """dst: the video stream of src repeated (stream copy, timestamps shifted) to at least
    `minutes`; returns its size and length."""
    with av.open(str(src)) as inp:
        s_in = inp.streams.video[0]
        packets = [p for p in inp.demux(s_in) if p.dts is not None]
        period = int(s_in.duration)  # stream time-base units per copy
        copies = int(minutes * 60 / float(s_in.duration * s_in.time_base)) + 1
        with av.open(str(dst), "w") as out:
            s_out = out.add_stream_from_template(s_in)
            for k in range(copies):
                for p in packets:
                    q = av.Packet(bytes(p))
                    q.pts, q.dts = p.pts + k * period, p.dts + k * period
                    q.is_keyframe, q.time_base, q.stream = p.is_keyframe, p.time_base, s_out
                    out.mux(q)
    return dict(path=str(dst), bytes=dst.stat().st_size, copies=copies,
                seconds=round(copies * float(s_in.duration * s_in.time_base), 1))


def annotate(video: Path, out: Path, segment_s: float, sample_fps: float, threads: int,
             log: Path) -> dict:
    cmd = [C.PY, "-m", "fer_batch", "annotate", str(video), "--output", str(out),
           "--address", f"127.0.0.1:{C.RAY_PORT}", "--sample-fps", str(sample_fps),
           "--segment-seconds", str(segment_s), "--decode-threads", str(threads)]
    # the cluster of C.start_ray requires Ray 2.60's token authentication (README)
    res = C.run_measured(cmd, pss=False, log=log, env=dict(RAY_AUTH_MODE="token"))
    manifest = json.loads(next((out / "_runs").glob("*.json")).read_text()) if res["rc"] == 0 \
        else {}
    import fer_batch
    faces = fer_batch.read_faces(str(out), as_pandas=True) if res["rc"] == 0 else None
    key = sorted(zip(faces["frame_index"], faces["face_index"], faces["x"], faces["y"])) \
        if faces is not None else None
    return dict(segment_s=segment_s, threads=threads, rc=res["rc"], wall_s=res["wall_s"],
                processing_s=manifest.get("processing_seconds"),
                frames=manifest.get("frames"), faces=manifest.get("faces"),
                files_ok=manifest.get("files_ok"), face_key=hash(str(key)),
                cpu_s=res.get("cpu_s"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--sample-fps", type=float, default=0.5)
    ap.add_argument("--segments", type=float, nargs="+", default=[0, 300])
    ap.add_argument("--decode-threads", type=int, nargs="+", default=[1],
                    help="each value runs every --segments setting (the first run is the base)")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fer-segments-"))
    t0 = time.perf_counter()
    video = loop_video(CLIP, work / "long_1080p.mp4", a.minutes)
    C.log(f"{video} written in {time.perf_counter() - t0:.1f} s")
    state = C.machine_state()
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-seg-", dir="/tmp"))
    C.log(f"ray start: {C.start_ray(ray_dir, cpus=2):.1f} s")
    rows = []
    try:
        # the per-run fixed cost (actor start, model load, listing, commit): the 4.2 s clip
        fixed = annotate(CLIP, work / "out-fixed", 0, a.sample_fps, a.decode_threads[0],
                         work / "log-fixed.txt")
        C.log(json.dumps(fixed))
        for threads, s in [(t, s) for t in a.decode_threads for s in a.segments]:
            r = annotate(Path(video["path"]), work / f"out-{s:g}-t{threads}", s, a.sample_fps,
                         threads, work / f"log-{s:g}-t{threads}.txt")
            C.log(json.dumps(r))
            rows.append(r)
    finally:
        C.stop_ray(ray_dir)
    base = rows[0]
    print(f"\n{video['seconds']:.0f} s of 1920x1080 H.264 ({video['bytes'] / 2**20:.0f} MiB), "
          f"--sample-fps {a.sample_fps:g}; machine: {state['cpu_model']}, {state['cpus']} "
          f"CPUs, load {state['loadavg']}; git {state['git']}\n")
    f = fixed["processing_s"] or 0.0
    print(f"Fixed cost per run (the same settings on the 4.2 s source clip, {fixed['frames']} "
          f"frames): {f} s of processing; 'net' subtracts it.\n")
    print("| --decode-threads | --segment-seconds | segments | wall s | processing s | frames | "
          "faces | same faces | speed-up (processing) | speed-up (net of fixed) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        seg, length = r["segment_s"], video["seconds"]
        n = int(length // seg) if seg and length > 1.5 * seg else 1  # the last takes the rest
        up = base["processing_s"] / r["processing_s"] if r["processing_s"] else float("nan")
        net = ((base["processing_s"] - f) / (r["processing_s"] - f)
               if r["processing_s"] and r["processing_s"] > f else float("nan"))
        print(f"| {r['threads']} | {seg:g} | {n} | {r['wall_s']:.1f} | {r['processing_s']} | "
              f"{r['frames']} | {r['faces']} | {r['face_key'] == base['face_key']} | "
              f"{up:.2f}x | {net:.2f}x |")
    print(f"\noutputs and logs: {work}")


if __name__ == "__main__":
    main()
