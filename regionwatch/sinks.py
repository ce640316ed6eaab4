"""Sinks: where a snapshot goes besides the store, and the fan-out that writes it to each.

A `Sink` takes a finished snapshot with its rendered images, and is closed at the end of the run.
regionwatch's own TensorBoard run is one; the copies to the trainer's loggers are others (one per
logger, in the drivers). Adding a sink is one class. `Fanout` writes every snapshot to every sink,
each write isolated from training and from the other sinks:

- `"background"` sinks (files of regionwatch's own, thread-safe writers) are jobs for the
  monitor's `BackgroundWriter`, in snapshot order, beside training.
- `"bounded"` sinks (the trainer's own loggers, which the trainer writes from its training thread
  and which are not all thread-safe; Lightning's CSVLogger loses rows written from two threads at
  once) are written while the training thread waits, so their writes never overlap the trainer's
  own. Each write runs on a helper thread, so that the wait is bounded: a write still running
  after `timeout_s` (a logger that hangs) drops that sink for the rest of the run, with a warning
  naming it, and training goes on.
- `"training"` sinks run on the training thread itself, unbounded: for loggers that keep state
  per thread (the HF Trainer's integrations: MLflow's active run belongs to the thread that
  started it, and a write from another thread would open a second run).

Images are rendered once per snapshot, by the first sink that reads them (`Rendered`), on that
sink's thread; a snapshot no sink draws is never rendered.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal, Protocol

import numpy as np

from regionwatch.background import BackgroundWriter, Failure
from regionwatch.snapshot import Snapshot
from regionwatch.tensorboard import STEP_ROOT, images, scalars, step_tag

logger = logging.getLogger(__name__)

Placement = Literal["background", "bounded", "training"]  # where a sink's writes run (above)
TOKENS_TAG = f"{STEP_ROOT}/tokens"  # tokens seen, beside the headline scalars in every logger


class Sink(Protocol):
    """One destination of every snapshot (besides the store, which the monitor writes itself).

    Attributes:
        name: names the sink in the log, in `Monitor.sink_failures`, and when it is dropped.
        placement: where its writes run: "background" (the background writer), "bounded" (a
            helper thread while the training thread waits, at most `timeout_s`) or "training"
            (the training thread itself).
    """

    name: str
    placement: Placement

    def write(self, snapshot: Snapshot, rendered: Mapping[str, np.ndarray]) -> None:
        """Write one snapshot; `rendered` holds its images by tag, rendered on first read."""

    def close(self) -> None:
        """Flush and release what the sink holds; called once, after its last write."""


class Rendered(Mapping[str, np.ndarray]):
    """A snapshot's images by tag (`tensorboard.images`), rendered once, on first read.

    Shared by every sink of one snapshot, on whichever threads they run.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self._render: Callable[[], dict[str, np.ndarray]] = functools.cache(
            lambda: images(snapshot)
        )
        self._lock = threading.Lock()

    def _images(self) -> dict[str, np.ndarray]:
        with self._lock:  # two sinks on two threads: one renders, the other waits for it
            return self._render()

    def __getitem__(self, tag: str) -> np.ndarray:
        return self._images()[tag]

    def __iter__(self) -> Iterator[str]:
        return iter(self._images())

    def __len__(self) -> int:
        return len(self._images())


class Fanout:
    """Writes every snapshot to every sink: the trainer's loggers first, then the queued ones.

    Args:
        writer: the monitor's background writer (queued writes; failures are recorded in its
            `failures`, as are the other sinks' writes that fail or time out).
        sinks: the sinks, in the order they are written.
        timeout_s: the longest the training thread waits for one "bounded" sink's write.
    """

    def __init__(
        self, writer: BackgroundWriter, sinks: Sequence[Sink], *, timeout_s: float
    ) -> None:
        self._writer = writer
        self._sinks = list(sinks)
        self._timeout_s = timeout_s
        self.dropped: list[str] = []  # names of sinks dropped for the run, in order

    def write(self, snapshot: Snapshot) -> None:
        """Write `snapshot` to the trainer's loggers (the training thread waits), queue the rest.

        The loggers come first, so that a logger sees a snapshot's scalars before its images.
        """
        rendered = Rendered(snapshot)
        where = f"step {snapshot.step}"
        for sink in [s for s in self._sinks if s.placement != "background"]:
            self._run(
                sink, f"{sink.name}, {where}", functools.partial(sink.write, snapshot, rendered)
            )
        for sink in self._sinks:
            if sink.placement == "background":
                write = functools.partial(sink.write, snapshot, rendered)
                self._writer.submit(f"{sink.name}, {where}", write)

    def close(self) -> None:
        """Close every sink, each where it writes (the background ones after their writes)."""
        for sink in self._sinks:
            if sink.placement == "background":
                self._writer.submit(f"closing {sink.name}", sink.close)
            else:
                self._run(sink, f"closing {sink.name}", sink.close)
        self._sinks = []

    def _run(self, sink: Sink, what: str, job: Callable[[], object]) -> None:
        """Run a sink's job now, isolated: "bounded" on a helper thread, waiting `timeout_s`."""
        if sink not in self._sinks:  # dropped by an earlier job of the same name
            return
        if sink.placement == "training":
            self._writer.run_now(what, job)
            return
        helper = threading.Thread(
            target=self._writer.run_now,
            args=(what, job),
            name=f"regionwatch-{sink.name}",
            daemon=True,
        )
        helper.start()
        helper.join(self._timeout_s)
        if not helper.is_alive():
            return
        # The write hangs: leave its (daemon) thread behind and stop writing to that sink.
        self._sinks = [s for s in self._sinks if s.name != sink.name]
        self.dropped.append(sink.name)
        self._writer.failures.append(
            Failure(what, f"no answer after {self._timeout_s:g} s; dropped for the rest of the run")
        )
        logger.warning(
            "regionwatch: %s did not return within %g s; training goes on, and %s gets no "
            "more regionwatch copies in this run (raise WatchConfig.logger_timeout_s if it is "
            "merely slow)",
            what,
            self._timeout_s,
            sink.name,
        )


def headline(snapshot: Snapshot) -> dict[str, float]:
    """The scalars copied to the trainer's loggers: TensorBoard's tags, plus tokens seen.

    Named `regionwatch_step/<key>` (`tensorboard.step_tag`): they sit at the trainer's step, and
    must never share a name with the token-axis run. `regionwatch_step/tokens` comes in the same
    call, so that a dashboard can chart them against tokens.
    """
    copies = {step_tag(name): value for name, value in scalars(snapshot).items()}
    return {**copies, TOKENS_TAG: float(snapshot.tokens)}
