"""The run's attempt ledger: how often each file was started, what finished, and the
croppers' watchdog (docs/failures.md).

Kept apart from pipeline.py on purpose: every cropper actor and every split task unpickles
an ``AttemptCounter``, which imports this module in the worker, and pipeline.py imports
torch (the classifier) and Ray Data. A cropper needs neither: importing pipeline.py cost
each of them ~3.8 CPU s and ~750 MB of memory (BENCHMARKS.md section 11).
"""

from __future__ import annotations

import os
import threading
import time

import ray


@ray.remote(num_cpus=0)
class AttemptLedger:
    """Counts how often each file was started without finishing, so a file that kills its
    worker every time (a decoder segfault, an OOM kill) is recorded as an error after a
    bounded number of tries instead of being retried forever by Ray's actor restarts.
    A file that finished is forgotten: when a task of several files is retried after a
    crash, only the file that was running when the worker died is counted against."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.stalls: dict[str, float] = {}  # uri -> seconds without progress, when it hung
        self.done = [0, 0, 0]  # files, frames, faces

    def begin(self, uri: str) -> int:
        self.counts[uri] = self.counts.get(uri, 0) + 1
        return self.counts[uri]

    def stalled(self, uri: str, seconds: float) -> None:
        """The worker on uri is about to end itself: no progress for `seconds`."""
        self.stalls[uri] = seconds

    def give_up_reason(self, uri: str) -> str:
        """Why the tries of uri ended their workers, for its error row."""
        tries = self.counts.get(uri, 1) - 1
        if uri in self.stalls:
            return (f"hung: no progress for {self.stalls[uri]:.0f} s (--stall-timeout-s), "
                    f"{tries} tries; gave up")
        return (f"worker died {tries} times while processing this file (decoder crash, hang "
                "holding the interpreter, or out of memory); gave up")

    def finish(self, uri: str, frames: int = 0, faces: int = 0, files: float = 1) -> None:
        """uri is done; files: the share of a file it was (1 / count for a segment)."""
        self.counts.pop(uri, None)
        self.stalls.pop(uri, None)
        self.done = [a + b for a, b in zip(self.done, (files, frames, faces))]

    def progress(self) -> list[int]:
        """[files, frames, faces] finished so far (for the console; a file redone after a
        worker crash counts again)."""
        return [int(self.done[0] + 1e-6), *self.done[1:]]


class AttemptCounter:
    """Picklable callable handed to FaceCropper: uri -> attempt number (1 = first try);
    .alive() on each decoded frame; .finish(uri) when the file is done (not waited for);
    .give_up_reason(uri) for the error row of a file whose tries all ended their workers.

    With stall_timeout_s > 0 it is also the worker's watchdog (docs/failures.md): a file
    without progress for that long is noted in the ledger and the worker ends itself, like
    a crash: Ray restarts it and retries the task, and the ledger bounds the tries. A hang
    in C code that holds the interpreter lock stops the watchdog thread too; faulthandler's
    C-level timer (armed a little later) ends the worker then."""

    def __init__(self, ledger, stall_timeout_s: float = 0.0):
        self.ledger, self.stall_timeout_s = ledger, stall_timeout_s
        self._current = None  # (uri, time of last progress) while a file is processed
        self._thread = None

    def __getstate__(self):  # what travels to the actors: no thread, no current file
        return dict(ledger=self.ledger, stall_timeout_s=self.stall_timeout_s)

    def __setstate__(self, state):
        self.__init__(**state)

    def __call__(self, uri: str) -> int:
        tries = ray.get(self.ledger.begin.remote(uri))
        if self.stall_timeout_s > 0:
            import faulthandler
            self._current = (uri, time.monotonic())
            faulthandler.dump_traceback_later(self.stall_timeout_s + 10, exit=True)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True,
                                                name="fer-batch-watchdog")
                self._thread.start()
        return tries

    def alive(self) -> None:
        if self._current is not None:
            self._current = (self._current[0], time.monotonic())

    def finish(self, uri: str, frames: int = 0, faces: int = 0, files: float = 1) -> None:
        self._current = None
        self.ledger.finish.remote(uri, frames, faces, files)

    def give_up_reason(self, uri: str) -> str:
        return ray.get(self.ledger.give_up_reason.remote(uri))

    def _watch(self) -> None:
        import faulthandler
        import signal
        limit = self.stall_timeout_s
        every = min(5.0, max(0.2, limit / 4))
        while True:
            time.sleep(every)
            current = self._current
            if current is None:
                faulthandler.cancel_dump_traceback_later()
                continue
            idle = time.monotonic() - current[1]
            if idle > limit:
                try:
                    ray.get(self.ledger.stalled.remote(current[0], idle), timeout=30)
                finally:
                    os.kill(os.getpid(), signal.SIGKILL)  # as a crash: Ray retries the task
            # backstop for a hang that holds the GIL (this thread stops too): a C timer
            faulthandler.dump_traceback_later(limit - idle + 2 * every, exit=True)
