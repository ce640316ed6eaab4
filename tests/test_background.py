"""The background writer: ordered, bounded, drained, and its failures never reach training.

The end-to-end cases break real sinks: a TensorBoard directory that cannot be created, and a
run directory on a real full filesystem (a small tmpfs, filled and then freed mid-run).
"""

from __future__ import annotations

import threading
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from regionwatch import RegionMonitor, SnapshotStore
from regionwatch.background import BackgroundWriter
from regionwatch.monitor import Monitor
from tests.support.disk import fill
from tests.support.factories import make_monitor
from tests.support.lm import TinyLM, Windows, loader, tiny_gpt2, trainer
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB

MEDIAN = "regionwatch/max_slope/median"


def test_writer_runs_jobs_in_order_and_survives_a_failing_one() -> None:
    """A job that raises is recorded; the jobs after it still run, in submission order."""
    done: list[int] = []
    writer = BackgroundWriter("test-writer")
    writer.submit("first", lambda: done.append(1))
    writer.submit("broken", lambda: 1 / 0)
    writer.submit("third", lambda: done.append(3))
    writer.drain()
    assert done == [1, 3]
    assert [(f.what, f.error.split("(")[0]) for f in writer.failures] == [
        ("broken", "ZeroDivisionError")
    ]
    writer.close()
    writer.submit("after close", lambda: done.append(4))  # a new thread takes it
    writer.close()
    assert done == [1, 3, 4]


def test_writer_is_bounded_and_close_drains() -> None:
    """With capacity 1, a third job waits in submit until the worker moves on; close runs all."""
    release = threading.Event()
    done: list[str] = []
    writer = BackgroundWriter("test-writer", capacity=1)
    writer.submit("held", lambda: (release.wait(), done.append("held")))
    writer.submit("queued", lambda: done.append("queued"))
    third = threading.Thread(target=writer.submit, args=("third", lambda: done.append("third")))
    third.start()
    third.join(timeout=0.5)
    assert third.is_alive()  # blocked: one job running, one waiting, capacity 1
    release.set()
    third.join()
    writer.close()
    assert done == ["held", "queued", "third"]
    assert writer.blocked_seconds > 0


def test_writer_refuses_a_capacity_below_one() -> None:
    with pytest.raises(ValueError, match="capacity=0"):
        BackgroundWriter("test-writer", capacity=0)


def monitored(lm_probes, run_dir: Path, **kwargs) -> RegionMonitor:
    return make_monitor("lightning", lm_probes, run_dir, every=1, maps_schedule=None, **kwargs)


def test_failing_sink_is_recorded_and_the_store_stays_complete(tmp_path: Path, lm_probes) -> None:
    """TensorBoard cannot make its directory: every snapshot is still stored, none is "failed"."""
    run_dir = tmp_path / "run"
    model = tiny_gpt2(VOCAB)
    monitor = make_monitor("monitor", lm_probes, run_dir, every=1, maps_schedule=None)
    monitor.setup(model, log_dir=None)
    monitor.open()
    (run_dir / "tensorboard").write_text("a file where the event directory should be")
    for step in range(3):
        assert monitor.maybe_measure(model, step=step, tokens=10 * step) is not None
    monitor.close()  # drains; never raises for a failed write
    store = SnapshotStore(run_dir)
    assert store.steps() == [0, 1, 2]
    assert store.failures() == []  # every snapshot was stored: none is listed as failed
    assert [f.what for f in monitor.sink_failures] == [f"tensorboard, step {s}" for s in range(3)]


class FullDiskBetween(Callback):
    """Fills the disk after step `full_at` and frees it after step `free_at` (before measuring).

    It drains the monitor's queued writes first, so that exactly the snapshots of steps
    full_at..free_at-1 meet a full disk.
    """

    def __init__(self, disk: Path, monitor: Monitor, full_at: int, free_at: int) -> None:
        self.disk, self.monitor, self.full_at, self.free_at = disk, monitor, full_at, free_at

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step in (self.full_at, self.free_at):
            self.monitor.drain()
        if trainer.global_step == self.full_at:
            fill(self.disk)
        if trainer.global_step == self.free_at:
            (self.disk / "filler").unlink()


def test_full_disk_never_kills_fit_and_every_sink_recovers(
    tmp_path: Path, small_disk: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """ENOSPC at steps 2-3: fit ends normally; store and TensorBoard take steps 4-6 again."""
    run_dir = small_disk / "run"
    callback = monitored(lm_probes, run_dir)
    full = FullDiskBetween(small_disk, callback.monitor, full_at=2, free_at=4)
    fit = trainer(tmp_path, [full, callback], max_steps=6, device=device)
    fit.fit(TinyLM(VOCAB), loader(lm_data))  # raised OSError [Errno 28] at teardown before
    assert fit.global_step == 6

    store = SnapshotStore(run_dir)
    assert store.steps() == [0, 1, 4, 5, 6]
    # failures.jsonl lists only snapshots that are not stored (here its own writes hit the
    # full disk too, so it may hold fewer).
    assert {f["step"] for f in store.failures()} <= {2, 3}
    failed = {f.what for f in callback.monitor.sink_failures}
    assert {"tensorboard, step 2", "tensorboard, step 3"} <= failed
    assert not any(f"step {s}" in what for what in failed for s in (0, 1, 4, 5, 6))

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {e.step for e in events.Scalars(MEDIAN)}
    # Every stored snapshot is in TensorBoard, 4, 5 and 6 after the disk came back. (A failed
    # snapshot's scalars may have reached the disk before its images filled it.)
    assert {r["tokens"] for r in store.records()} <= logged
