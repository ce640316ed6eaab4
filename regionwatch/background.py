"""`BackgroundWriter`: figures, events, logger copies and store writes off the training thread.

A snapshot's probe must run on the training thread (it reads the weights of this very step), but
everything after it only reads the finished, immutable `Snapshot`: rendering curve figures and
region maps, TensorBoard events, copies to the trainer's loggers, the store's files and index.
Those are jobs for one worker thread, run in the order they were submitted, so the store and
every event file see snapshots in training order.

- **Bounded.** At most `capacity` jobs wait; `submit` blocks while the queue is full (a sink
  slower than the schedule then slows training down, instead of holding an unbounded number of
  snapshots in memory). The time `submit` waits is counted in `blocked_seconds`.
- **Isolated.** A job that raises is logged with its traceback, counted in `failures` and handed
  to `on_failure`; the jobs after it still run, and nothing reaches the training thread
  (DESIGN.md: a probe, and so a sink, never kills training).
- **Drained.** `drain` waits until every job submitted so far has run; `close` drains and stops
  the thread. On a crash the (daemon) thread dies with the process: what was queued is lost, and
  every store write is atomic, so the store stays consistent.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Two snapshots' worth of jobs (a snapshot is a handful: store, events, logger copies): enough to
# absorb one slow write while the next snapshot is measured, and never more than a few snapshots'
# arrays held in memory.
DEFAULT_CAPACITY = 8

Job = Callable[[], object]


@dataclass(frozen=True)
class Failure:
    """One failed background job: what it was, and the error's repr."""

    what: str
    error: str


class BackgroundWriter:
    """Runs jobs on one daemon thread, in submission order, through a bounded queue.

    The thread starts on the first `submit`, so a writer that never gets a job costs nothing.

    Args:
        name: the thread's name (shows in tracebacks and debuggers).
        capacity: most jobs waiting at once; `submit` blocks beyond it. >= 1.

    Raises:
        ValueError: capacity < 1.

    Example:
        >>> writer = BackgroundWriter("regionwatch-writer")
        >>> writer.submit("tensorboard step 40", lambda: sink.write(snapshot))
        >>> writer.close()  # drains: every submitted job has run
    """

    def __init__(
        self,
        name: str,
        *,
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r}: need an int >= 1")
        self.name = name
        self._queue: queue.Queue[tuple[str, Job] | None] = queue.Queue(maxsize=capacity)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.failures: list[Failure] = []
        self.busy_seconds = 0.0  # time the worker spent running jobs
        self.blocked_seconds = 0.0  # time `submit` waited on a full queue (the caller's stall)

    def submit(self, what: str, job: Job) -> None:
        """Queue `job` (run later on the worker thread); blocks while the queue is full.

        Args:
            what: names the job in the log and in `failures` (e.g. "tensorboard, step 40").
            job: a callable taking no arguments; its result is ignored.
        """
        self._start()
        try:
            self._queue.put_nowait((what, job))
        except queue.Full:
            started = time.perf_counter()
            self._queue.put((what, job))
            self.blocked_seconds += time.perf_counter() - started

    def run_now(self, what: str, job: Job) -> None:
        """Run `job` on the calling thread, isolated and recorded as a queued job would be.

        For the few writes that must happen on the caller's thread (the trainer's own loggers
        are not all thread-safe); the queued jobs keep running meanwhile.
        """
        self._run(what, job)

    def drain(self) -> None:
        """Wait until every job submitted so far has run (or failed)."""
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        """Drain, then stop the worker thread; a later `submit` starts a new one."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.join()
        self._queue.put(None)  # the worker's stop signal, after every real job
        thread.join()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._run(*item)
            finally:
                self._queue.task_done()

    def _run(self, what: str, job: Job) -> None:
        started = time.perf_counter()
        try:
            job()
        except Exception as err:  # guarantee: a failed sink write never stops training
            logger.exception("background write failed (%s); training continues", what)
            self.failures.append(Failure(what, repr(err)))
        finally:
            self.busy_seconds += time.perf_counter() - started
