"""fer_batch/decode.py at a git revision vs the working tree, in one process, alternating:
the shared videos (or --videos) through decode.iter_frames at --sample-fps (2, as annotate
runs it by default). For changes to the decode loop; CPU seconds, so a busy machine matters
less. Both versions must yield the same frames (indexes, times, pixels): checked.

    .venv/bin/python bench/decode_ab.py --before 79312ae [--rounds 3] [--sample-fps 2]
        [--videos A.mp4 B.mp4]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common as C  # noqa: E402
from fer_batch import decode  # noqa: E402


def module_at(rev: str):
    """fer_batch/decode.py as it was at git revision rev, imported under another name."""
    src = subprocess.run(["git", "show", f"{rev}:fer_batch/decode.py"], cwd=C.REPO, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "decode_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("decode_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def decode_all(mod, videos, sample_fps: float) -> tuple[float, float, int, str]:
    """(wall s, CPU s, frames, digest of the sampled frames' indexes, times and pixels)."""
    t, c, frames, digest = time.perf_counter(), time.process_time(), 0, hashlib.sha256()
    for v in videos:
        stats = mod.VideoStats()
        for index, ts, gray in mod.iter_frames(v, sample_fps=sample_fps, stats=stats):
            digest.update(f"{v}:{index}:{ts}".encode())
            digest.update(gray.tobytes())
        frames += stats.frames_decoded
    return time.perf_counter() - t, time.process_time() - c, frames, digest.hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="git revision of the 'before' decode.py")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sample-fps", type=float, default=2.0)
    ap.add_argument("--videos", nargs="*", type=Path,
                    help="videos to decode (default: the shared videos)")
    a = ap.parse_args(argv)
    videos = a.videos or sorted(p for p in C.VIDEOS.iterdir()
                                if p.suffix.lower() in (".mp4", ".mov", ".mkv", ".avi"))
    codes = {f"before ({a.before})": module_at(a.before), "after (working tree)": decode}
    res: dict[str, list] = {k: [] for k in codes}
    for rnd in range(a.rounds):  # alternate the order so warm-up favours neither
        for name in (list(codes) if rnd % 2 == 0 else list(codes)[::-1]):
            res[name].append(decode_all(codes[name], videos, a.sample_fps))
    same = len({x[3] for runs in res.values() for x in runs}) == 1
    print(f"{len(videos)} videos ({', '.join(v.name for v in videos)}), {a.rounds} rounds, "
          f"--sample-fps {a.sample_fps:g}; the same sampled frames from both: {same}\n")
    print("| decode.py | frames | wall s per round | CPU s per round | median CPU ms/frame |")
    print("|---|---|---|---|---|")
    for name, runs in res.items():
        cpu = statistics.median(x[1] for x in runs)
        print(f"| {name} | {runs[0][2]} | {' / '.join(f'{x[0]:.2f}' for x in runs)} | "
              f"{' / '.join(f'{x[1]:.2f}' for x in runs)} | {1000 * cpu / runs[0][2]:.3f} |")


if __name__ == "__main__":
    main()
