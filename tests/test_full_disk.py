"""A full disk: nothing untrue said, nothing lost from the record, a clear refusal at start.

Every case runs on a real small tmpfs (tests/support/disk.py), filled and freed between the
snapshots of a real monitor measuring a real tiny model every step.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from regionwatch import SnapshotStore
from regionwatch.errors import ConfigError, StoreError
from regionwatch.monitor import Monitor
from regionwatch.results import ProbeConfig
from regionwatch.store import bytes_to_start
from tests.support.disk import fill
from tests.support.factories import make_monitor
from tests.support.lm import SMALL_PROBE, tiny_gpt2
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB

PROBE = replace(SMALL_PROBE, parts=("random",))  # no region maps: the disk is what is tested
STEPS = range(11)  # every_steps(1) for 10 steps: the baseline and steps 1..10


def run(
    lm_probes, run_dir: Path, disk: Path, *, full_at: int, free_at: int | None, close: bool = True
) -> tuple[Monitor, list[int]]:
    """Measure STEPS; the disk is full from `full_at` until `free_at` (None: to the end).

    Returns the monitor (closed if `close`, else drained) and the scheduled steps.
    """
    model = tiny_gpt2(VOCAB)
    monitor = make_monitor("monitor", lm_probes, run_dir, every=1, probe=PROBE, tensorboard=False)
    monitor.setup(model, log_dir=None)
    monitor.open()
    for step in STEPS:
        if step in (full_at, free_at):
            monitor.drain()  # exactly the snapshots from full_at on meet a full disk
        if step == full_at:
            fill(disk)
        if step == free_at:
            (disk / "filler").unlink()
        monitor.maybe_measure(model, step=step, tokens=10 * step)
    monitor.drain()
    if close:
        monitor.close()
    return monitor, list(STEPS)


def closing_warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(
        r.getMessage() for r in caplog.records if r.getMessage().startswith("regionwatch: ")
    )


@pytest.mark.slow
def test_a_disk_full_from_step_1_is_never_reported_complete(
    small_disk: Path, lm_probes, caplog: pytest.LogCaptureFixture
) -> None:
    """Full after the baseline: the closing warning names steps 1-10 as not stored nor listed."""
    run_dir = small_disk / "run"
    with caplog.at_level(logging.WARNING, logger="regionwatch"):
        run(lm_probes, run_dir, small_disk, full_at=1, free_at=None)
    store = SnapshotStore(run_dir)
    assert store.steps() == [0]
    said = closing_warnings(caplog)
    assert "10 scheduled snapshots are NOT stored" in said
    assert "steps 1-10" in said
    assert "could not record steps 1-10 either" in said
    assert "complete" not in said


@pytest.mark.slow
def test_a_disk_freed_mid_run_gets_every_lost_step_listed(
    small_disk: Path, lm_probes, caplog: pytest.LogCaptureFixture
) -> None:
    """Full for steps 1-4, freed at 5: stored steps and failures.jsonl cover every step, once."""
    run_dir = small_disk / "run"
    with caplog.at_level(logging.WARNING, logger="regionwatch"):
        _, scheduled = run(lm_probes, run_dir, small_disk, full_at=1, free_at=5)
    store = SnapshotStore(run_dir)
    stored, failed = store.steps(), [f["step"] for f in store.failures()]
    assert stored == [0, 5, 6, 7, 8, 9, 10]
    assert failed == [1, 2, 3, 4]  # their rows hit the full disk too, and were retried
    assert sorted(stored + failed) == scheduled
    said = closing_warnings(caplog)
    assert "4 scheduled snapshots are NOT stored" in said
    assert "steps 1-4; failures.jsonl lists each" in said


@pytest.mark.slow
def test_failure_rows_refused_to_the_end_are_written_at_close(small_disk: Path, lm_probes) -> None:
    """Full from step 8 to the end, freed only after the last write: close records 8-10."""
    run_dir = small_disk / "run"
    monitor, _ = run(lm_probes, run_dir, small_disk, full_at=8, free_at=None, close=False)
    assert [f["step"] for f in monitor.store.pending_failures] == [8, 9, 10]
    (small_disk / "filler").unlink()
    monitor.close()
    store = SnapshotStore(run_dir)
    assert store.steps() == list(range(8))
    assert [f["step"] for f in store.failures()] == [8, 9, 10]


def test_a_full_disk_at_start_is_refused_naming_the_space_needed(
    small_disk: Path, lm_probes
) -> None:
    """Before any write: a ConfigError naming the run dir, the space it needs and the fix."""
    run_dir = small_disk / "run"
    fill(small_disk)
    model = tiny_gpt2(VOCAB)
    monitor = make_monitor("monitor", lm_probes, run_dir, every=1, probe=PROBE, tensorboard=False)
    monitor.setup(model, log_dir=None)
    needed = bytes_to_start(lm_probes, monitor.watch.probe) / 2**20
    with pytest.raises(ConfigError, match=rf"run dir {run_dir} has 0.00 MiB free") as err:
        monitor.open()
    assert f"needs about {needed:.2f} MiB to start" in str(err.value)
    assert "per snapshot" in str(err.value)
    assert not (run_dir / "config.json").exists()


def test_a_full_disk_at_create_is_a_store_error(small_disk: Path, lm_probes) -> None:
    """SnapshotStore.create on a full disk: regionwatch's StoreError, never a raw OSError."""
    fill(small_disk)
    with pytest.raises(StoreError, match="free space"):
        SnapshotStore.create(small_disk / "run", probes=lm_probes, config=ProbeConfig())
