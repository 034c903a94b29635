"""Shared helpers of the benchmark harness: paths, archives of links, machine state,
process-tree CPU/memory sampling, face recall against the hand-labelled photo boxes.

Nothing here is imported by fer_batch; bench/ is never a dependency of the package.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"  # read-only real data; never copied, only linked
WORK = REPO / "bench" / "_work"  # git-ignored scratch: archives of links, outputs, temp
PY = REPO / ".venv" / "bin" / "python"
FER_PY = REPO / "bench" / ".venv-fer" / "bin" / "python"
VIDEOS = DATA / "videos"
PHOTOS = DATA / "photos"
CKPLUS = DATA / "ckplus48"
MEDIA_EXT = (".mp4", ".avi", ".mov", ".mkv", ".jpg", ".jpeg", ".png", ".tiff", ".tif")
IOU_MATCH = 0.5  # a detection matches a ground-truth box at IoU >= 0.5 (PASCAL VOC rule)
SAMPLE_S = 0.5  # process-tree sampling period, seconds
RAY_PORT = 6391  # GCS port of the benchmark's own Ray cluster (not 6379: others use it here)


def media_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in MEDIA_EXT)


def build_archive(name: str, video_copies: int, photo_copies: int,
                  videos: list[Path] | None = None, photos: list[Path] | None = None) -> Path:
    """WORK/name/cNNN/{videos,photos}/...: symlinks to the shared data, replicated."""
    root = WORK / name
    if root.exists():
        shutil.rmtree(root)
    vids = videos if videos is not None else media_files(VIDEOS)
    pics = photos if photos is not None else media_files(PHOTOS)
    for c in range(max(video_copies, photo_copies)):
        for sub, files, n in (("videos", vids, video_copies),
                              ("photos", pics, photo_copies)):
            if c >= n:
                continue
            d = root / f"c{c:03d}" / sub
            d.mkdir(parents=True, exist_ok=True)
            for f in files:
                (d / f.name).symlink_to(f)
    return root


def build_small_files(name: str, n_min: int) -> Path:
    """At least n_min small images: CK+48 PNGs (48x48) linked in copies of 1,000 per folder."""
    root = WORK / name
    if root.exists():
        shutil.rmtree(root)
    pngs = sorted(CKPLUS.rglob("*.png"))
    copies = -(-n_min // len(pngs))
    for c in range(copies):
        for i, f in enumerate(pngs):
            d = root / f"c{c:03d}" / f"d{i // 1000:02d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{f.parent.name}_{f.name}").symlink_to(f)
    return root


def gt_photos() -> list[Path]:
    """The 9 photos with hand-labelled boxes (about 500x375 each: cheap to detect on)."""
    return [PHOTOS / f for f in sorted(ground_truth())]


def video_frames() -> dict[str, int]:
    """Frame count of each shared video, from manifest.csv (OpenCV's count)."""
    with open(VIDEOS / "manifest.csv") as f:
        return {r["file"]: int(r["frames"]) for r in csv.DictReader(f)}


def versions() -> dict:
    import av
    import cv2
    import ray
    import torch
    return dict(python=platform.python_version(), ray=ray.__version__, torch=torch.__version__,
                opencv=cv2.__version__, pyav=av.__version__, numpy=np.__version__,
                ffmpeg=".".join(map(str, av.library_versions.get("libavcodec", ()))))


def machine_state() -> dict:
    """CPU, memory, load and the busiest other processes, to read noisy numbers against."""
    busy = []
    for p in psutil.process_iter(["name", "cpu_percent", "cmdline"]):
        busy.append(p)
    time.sleep(0.5)
    cpu = []
    for p in busy:
        try:
            cpu.append((p.cpu_percent(), " ".join(p.info["cmdline"] or [p.info["name"]]).strip()[:60]))
        except psutil.Error:
            pass
    cpu.sort(reverse=True)
    model = ""
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                     if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                host=platform.node(), cpu_model=model, cpus=psutil.cpu_count(),
                mem_gib=round(psutil.virtual_memory().total / 2**30, 1),
                mem_avail_gib=round(psutil.virtual_memory().available / 2**30, 1),
                loadavg=[round(x, 2) for x in os.getloadavg()],
                top=[f"{c:.0f}% {cmd}" for c, cmd in cpu[:6] if c > 5],
                git=_git_head(), **versions())


def _git_head() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "fer_batch"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("+dirty(fer_batch)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


class TreeSampler:
    """Samples a process and all its descendants every SAMPLE_S seconds (a thread):
    peak summed RSS and PSS, CPU seconds of the whole tree, /dev/shm use (Ray's object
    store lives there), and the process count."""

    def __init__(self, pid: int, pss: bool = True, extra_roots=()):
        self.root, self.pss, self.extra = pid, pss, list(extra_roots)
        self.peak_rss = self.peak_pss = self.peak_shm = 0
        self.peak_procs = 0
        self.cpu: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.shm0 = _shm_used()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_S)

    def sample(self):
        procs = []
        for pid in [self.root, *self.extra]:  # extra: a shared Ray cluster's GCS and raylet
            try:
                root = psutil.Process(pid)
                procs += [root] + root.children(recursive=True)
            except psutil.Error:
                pass
        if not procs:
            return
        rss = pss = 0
        for p in procs:
            try:
                if self.pss:
                    m = p.memory_full_info()
                    pss += m.pss
                else:
                    m = p.memory_info()
                rss += m.rss
                t = p.cpu_times()
                # each process's own CPU: a parent's children_* would count again the
                # workers it reaped, already sampled here under their own pid (measured:
                # 48.0 against 44.6 CPU s for one annotate run, so the "CPU s (tree)"
                # columns measured before 2026-12-07 read up to ~8% high)
                self.cpu[p.pid] = t.user + t.system
                if self.names.get(p.pid, "ray::IDLE") in ("ray::IDLE", "default_worker"):
                    self.names[p.pid] = proc_name(p)  # a worker's task or actor, once known
            except psutil.Error:
                pass
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_shm = max(self.peak_shm, _shm_used() - self.shm0)
        self.peak_procs = max(self.peak_procs, len(procs))

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())

    def summary(self) -> dict:
        return dict(peak_rss_mib=round(self.peak_rss / 2**20), peak_pss_mib=round(self.peak_pss / 2**20),
                    peak_shm_mib=round(self.peak_shm / 2**20), cpu_s=round(self.cpu_s, 1),
                    procs=self.peak_procs, cpu_by_process=self.by_name())

    def by_name(self) -> dict:
        """CPU seconds per kind of process (Ray names its workers by actor class)."""
        out: dict[str, float] = {}
        for pid, cpu in self.cpu.items():
            name = self.names.get(pid, "?")
            out[name] = round(out.get(name, 0.0) + cpu, 1)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def proc_name(p) -> str:
    """A short label: 'ray::FaceCropper', 'raylet', 'gcs_server', 'driver (python)'..."""
    try:
        title = " ".join(p.cmdline())[:200] or p.name()
    except psutil.Error:
        return "?"
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0][:60]
    for key in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env",
                "monitor.py", "default_worker", "plasma", "fer_batch", "naive.py",
                "fer_peer.py"):
        if key in title:
            return key
    return p.name()


def _shm_used() -> int:
    try:
        return shutil.disk_usage("/dev/shm").used
    except OSError:
        return 0


def ray_cluster_pids(temp_dir: Path) -> list[int]:
    """GCS, raylet and other daemons of the Ray cluster started with this temp dir."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(temp_dir) in cmd and ("gcs_server" in cmd or "raylet" in cmd):
            out.append(p.pid)
    return out


def start_ray(temp_dir: Path, cpus: int = 2, tries: int = 4) -> float:
    """`ray start --head` once for all runs (a driver's own start times out after 30 s on a
    machine this loaded); returns the seconds it took. Stop with stop_ray()."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    for i in range(tries):  # bench/ray_start.py: `ray start` that waits for a slow raylet
        t0 = time.perf_counter()
        rc = subprocess.run([PY, REPO / "bench" / "ray_start.py", "--head",
                             f"--num-cpus={cpus}", "--num-gpus=0", f"--port={RAY_PORT}",
                             "--include-dashboard=false", f"--temp-dir={temp_dir}",
                             "--disable-usage-stats"], capture_output=True, text=True)
        if rc.returncode == 0:
            return time.perf_counter() - t0
        log(f"ray start failed (try {i + 1}): {rc.stderr[-300:]}")
        stop_ray(temp_dir)
    raise RuntimeError("ray start failed")


def stop_ray(temp_dir: Path) -> None:
    """Stop only the cluster started with temp_dir (never `ray stop`: that would stop the
    other engineers' Ray clusters on this shared machine too)."""
    procs = []
    mine = [p.pid for p in psutil.process_iter(["cmdline"])
            if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    for pid in mine:
        try:
            p = psutil.Process(pid)
            procs += p.children(recursive=True) + [p]
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def run_measured(cmd: list, *, env: dict | None = None, pss: bool = True,
                 timeout: float = 3600, log: Path | None = None, extra_roots=()) -> dict:
    """Run cmd (at the caller's niceness), sample its process tree, return
    wall seconds, exit code, the sampler summary and the stdout tail."""
    full_env = dict(os.environ, **(env or {}))
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    p = subprocess.Popen(list(map(str, cmd)), stdout=out,
                         stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
    with TreeSampler(p.pid, pss=pss, extra_roots=extra_roots) as s:
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        s.sample()
    wall = time.perf_counter() - t0
    if log:
        out.close()
    tail = log.read_text()[-3000:] if log else ""
    return dict(cmd=" ".join(map(str, cmd)), rc=rc, wall_s=round(wall, 2), **s.summary(),
                tail=tail)


def iou(a, b) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union else 0.0


def ground_truth() -> dict[str, list]:
    """file name -> list of (x, y, w, h) hand-labelled faces (43 boxes in 9 photos)."""
    gt: dict[str, list] = {}
    with open(PHOTOS / "face_boxes.csv") as f:
        for r in csv.DictReader(f):
            if r.get("ignore", "0") != "1":
                gt.setdefault(r["file"], []).append(tuple(int(r[k]) for k in "xywh"))
    return gt


def match_count(truth: list, found: list) -> int:
    """Greedy one-to-one matches at IoU >= IOU_MATCH between two box lists."""
    used, n = set(), 0
    for t in truth:
        best, bi = IOU_MATCH, None
        for i, f in enumerate(found):
            v = iou(t, f)
            if i not in used and v >= best:
                best, bi = v, i
        if bi is not None:
            used.add(bi)
            n += 1
    return n


def recall(found: dict[str, list], truth: dict[str, list] | None = None) -> dict:
    """Recall of found boxes (file name -> boxes) against ground truth (default: the
    hand-labelled photo faces): {matched, total, recall}."""
    truth = truth if truth is not None else ground_truth()
    total = sum(len(v) for v in truth.values())
    matched = sum(match_count(v, found.get(k, [])) for k, v in truth.items())
    return dict(matched=matched, total=total, recall=round(matched / total, 3) if total else None)


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str))


def median(xs):
    return float(np.median(xs)) if len(xs) else float("nan")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
