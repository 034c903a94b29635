"""The fixed cost of a small annotate run on a warm local Ray, by process: one Ray (2 CPUs)
runs `fer-batch annotate --all-frames` over a 7-file archive (5 clips of 20 frames, a face
photo, a broken file) --runs times, and a sampler thread adds up each process's CPU time
(psutil, every 0.1 s; its own CPU is left out of the driver's) under the Ray task or
actor names it had. The archive is about 2 CPU s of real work; the rest is what a run
costs before and after its work (worker processes starting and importing, Ray Data, the
commit). The test suite is made of such runs.

    python bench/run_overhead.py --runs 3 [--md out.md]

To compare commits in one session, run it from a worktree of each, with PYTHONPATH at it
(Ray's local workers inherit the driver's environment).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def make_archive(root: Path) -> None:
    import cv2
    import numpy as np

    from conftest import encode_video, face_image
    root.mkdir(parents=True)
    small = cv2.resize(face_image(), (240, 300), interpolation=cv2.INTER_AREA)[:180]
    for i in range(5):
        encode_video(root / f"clip{i}.mp4",
                     [np.roll(small, 7 * i + 2 * k, axis=1) for k in range(20)], fps=10)
    cv2.imwrite(str(root / "face.jpg"), face_image())
    (root / "broken.jpg").write_bytes(b"<html>502 Bad Gateway</html>")


class CpuByProcess:
    """Cumulative CPU seconds of every process seen, keyed by (pid, start time), with the
    names (Ray task/actor titles) each one had. Not common.TreeSampler: that one sums one
    command's process tree every 0.5 s, where short-lived workers end between samples, and
    keeps no per-run split of a Ray that outlives the runs."""

    def __init__(self):
        self.seen: dict = {}
        self.own_cpu = 0.0  # this sampler thread's CPU: in the driver's process, not its
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            for p in psutil.process_iter(["pid", "cmdline", "cpu_times", "create_time"]):
                ct, cmd = p.info["cpu_times"], p.info["cmdline"] or []
                if ct is None:
                    continue
                key = (p.info["pid"], p.info["create_time"])
                names = self.seen.get(key, (set(), 0.0))[0]
                if cmd:
                    names.add(kind(cmd[0]))
                self.seen[key] = (names, ct.user + ct.system)
            self.own_cpu = time.thread_time()
            time.sleep(0.1)

    def snapshot(self) -> tuple[dict, float]:
        """(key -> (names, CPU s), the sampler's own CPU s so far)."""
        return {k: (set(n), c) for k, (n, c) in self.seen.items()}, self.own_cpu

    def stop(self):
        self._stop.set()


def kind(title: str) -> str:
    """A process's role from its title: the Ray task or actor, else the program."""
    if title.startswith("ray::"):
        name = title[5:].split(".")[0].split(" ")[0]
        return name.replace("MapWorker(MapBatches(", "").rstrip(")")
    return "driver" if title.endswith("python") or "python" in title else Path(title).name


ROLES = ("FacePredictor", "FaceCropper", "Write", "split_units", "driver")


def role(names: set) -> str:
    """The column of a process, by the first of ROLES it ran (a worker can run a split task,
    then a write task); Ray's own actors and daemons are "Ray"."""
    return next((r for r in ROLES if r in names), "Ray")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--md", help="append the table to this Markdown file")
    a = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray
    import torch

    from fer_batch import cli
    from fer_batch import model as M
    work = Path(tempfile.mkdtemp(prefix="fer-overhead-"))
    make_archive(work / "archive")
    torch.manual_seed(0)
    checkpoint = str(work / "model.pt")
    M.save_checkpoint(checkpoint, M.build_model(), classes=M.EMOTIONS, channels=["equalized"],
                      model_args=dict(num_classes=7, in_channels=1, stem="imagenet"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sampler = CpuByProcess()
    time.sleep(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(sys.modules["fer_batch"].__file__).parent
                            ).stdout.strip()
    rows = []
    for i in range(a.runs):
        out = work / f"out{i}"
        (before, own0), t0 = sampler.snapshot(), time.perf_counter()
        code = cli.main(["annotate", str(work / "archive"), "--model", checkpoint,
                         "--output", str(out), "--all-frames"])
        wall = time.perf_counter() - t0
        time.sleep(0.5)
        by_role = collections.Counter()
        after, own1 = sampler.snapshot()
        for key, (names, cpu) in after.items():
            by_role[role(names)] += cpu - before.get(key, (names, 0.0))[1]
        by_role["driver"] -= own1 - own0  # the sampling is the benchmark's, not the run's
        rows.append((i, code, wall, by_role))
    sampler.stop()
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    roles = [*ROLES, "Ray"]
    lines = [f"`bench/run_overhead.py --runs {a.runs}` at {commit}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{os.cpu_count()} CPUs: CPU seconds by process role per run",
             "", "| run | rc | wall s | CPU s (all) | " + " | ".join(roles) + " |",
             "|---" * (4 + len(roles)) + "|"]
    for i, code, wall, c in rows:
        lines.append(f"| {i} | {code} | {wall:.1f} | {sum(c.values()):.1f} | "
                     + " | ".join(f"{c[r]:.1f}" for r in roles) + " |")
    text = "\n".join(lines)
    print(text)
    if a.md:
        with open(a.md, "a") as f:
            f.write(text + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
