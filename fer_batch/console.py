"""What a person sees on the console: progress bars and one-line results, not Ray's internals.

Ray's own messages (worker output, Ray Data's operator dumps, Ray Train's checkpoint
reports) stay in Ray's log files (/tmp/ray/session_latest/logs); ``--verbose`` brings them
back to the console. Progress is a tqdm bar on a terminal and a plain line every
LINE_INTERVAL_S seconds otherwise (``ray job submit``, cron, CI logs).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

LINE_INTERVAL_S = 30.0  # one progress line this often when stderr is not a terminal


def quiet_ray(verbose: bool) -> None:
    """After ray.init: Ray's and Ray Data's console handlers show errors only (their log
    files keep everything); Ray Data draws no progress bars of its own."""
    if verbose:
        return
    from ray.data import DataContext
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                    handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)


def divert_native_stderr() -> str | None:
    """Send what C and C++ code write to file descriptor 2 (Ray's core worker: actor restart
    notes, GCS reconnects) to a log file, and keep Python's sys.stderr (progress bars,
    warnings, tracebacks) on the console. Only when sys.stderr is the process's own (not
    under pytest's capture or a notebook). Returns the log file's path, or None."""
    if sys.stderr is not sys.__stderr__ or sys.__stderr__ is None:
        return None
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    folder = os.path.join(tempfile.gettempdir(), "ray")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"fer-batch-driver-{os.getpid()}.err")
    sys.stderr.flush()
    console = os.dup(fd)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, fd)
    os.close(log)
    sys.stderr = sys.__stderr__ = os.fdopen(console, "w", buffering=1)
    return path


class LineProgress:
    """tqdm's small API (update, set_postfix_str, write, close) as one line every
    LINE_INTERVAL_S seconds, for logs that are not a terminal."""

    def __init__(self, total: int | None, desc: str, unit: str):
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.postfix = 0, ""
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= LINE_INTERVAL_S:
            self._line()

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def _line(self) -> None:
        self.last = time.monotonic()
        elapsed = self.last - self.t0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        eta = ""
        if self.total and self.n:
            eta = f", about {elapsed * (self.total - self.n) / self.n:.0f} s left"
        print(f"{self.desc}: {done} {self.unit}s, {elapsed:.0f} s{eta}"
              + (f"  {self.postfix}" if self.postfix else ""), file=sys.stderr, flush=True)

    @staticmethod
    def write(s: str) -> None:
        print(s, flush=True)

    def close(self) -> None:
        if self.n:
            self._line()


def progress_bar(total: int | None, desc: str, unit: str = "it"):
    """A tqdm bar on a terminal, else a LineProgress."""
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
    return LineProgress(total, desc, unit)
