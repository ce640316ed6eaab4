"""Linear in the run's length: the index grows by appends, a report reads each snapshot once,
and its figures stay readable at thousands of points. (Times: benchmarks/bench_store.py.)"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from regionwatch import store as store_module
from regionwatch.report.data import SlopeSeries
from regionwatch.report.trends import MAX_BARS, slope_over_tokens_figure
from regionwatch.snapshot import Snapshot
from regionwatch.store import SnapshotStore
from tests.support.factories import make_probes, make_snapshot
from tests.support.lm import SMALL_PROBE

RUN_ID = "run-1"


@pytest.fixture(scope="module")
def base() -> Snapshot:
    return make_snapshot(make_probes(), run_id=RUN_ID, maps=False)


def at(snapshot: Snapshot, step: int) -> Snapshot:
    return dataclasses.replace(snapshot, step=step, tokens=100 * step)


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore.create(
        tmp_path / "run", probes=make_probes(), config=SMALL_PROBE, run_id=RUN_ID
    )


def index_identity(store: SnapshotStore) -> tuple[int, int]:
    """(inode, size) of index.jsonl: an append keeps the inode, a rewrite replaces the file."""
    info = os.stat(store.path / "index.jsonl")
    return info.st_ino, info.st_size


def test_writes_in_training_order_append_to_the_index(
    store: SnapshotStore, base: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps in order: one line appended per write, the index file never rewritten nor read."""
    store.write(at(base, 0))
    inode, size = index_identity(store)
    reads = []
    real = store_module._parse_jsonl
    monkeypatch.setattr(
        store_module, "_parse_jsonl", lambda *a, **k: reads.append(a[0].name) or real(*a, **k)
    )
    for step in range(1, 30):
        store.write(at(base, step))
    assert reads == []  # the writer keeps its own view: no write re-reads the index
    after, grown = index_identity(store)
    assert after == inode
    assert grown > size
    monkeypatch.undo()
    assert store.steps() == list(range(30))
    assert (store.path / "index.jsonl").read_bytes().endswith(b"\n")


def test_out_of_order_writes_and_truncation_rewrite_the_sorted_index(
    store: SnapshotStore, base: Snapshot
) -> None:
    """An earlier point, a replaced step or a cut back: the index is rewritten, still sorted."""
    for step in (0, 2, 4):
        store.write(at(base, step))
    inode, _ = index_identity(store)
    store.write(at(base, 1))  # a replay filling a gap
    assert index_identity(store)[0] != inode
    store.write(dataclasses.replace(at(base, 4), wall_time=5.0))  # the final step retaken
    assert [r["step"] for r in store.records()] == [0, 1, 2, 4]
    assert store.read(4).wall_time == 5.0
    assert store.truncate_after(1) == [2, 4]
    store.write(at(base, 3))  # appends after the compaction
    lines = (store.path / "index.jsonl").read_text().splitlines()
    assert [r["step"] for r in store.records()] == [0, 1, 3]
    assert len(lines) == 4  # the header and one line per snapshot: no stale rows


def test_a_torn_last_line_is_not_yet_written(
    store: SnapshotStore, base: Snapshot, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash mid-append: readers skip the unterminated line silently; the writer repairs it."""
    for step in range(3):
        store.write(at(base, step))
    store.close()
    index = store.path / "index.jsonl"
    whole = index.read_bytes()
    lines = whole.splitlines(keepends=True)
    index.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])  # step 2's line cut mid-way
    with caplog.at_level(logging.WARNING, logger="regionwatch"):
        reader = SnapshotStore(store.path)
        assert reader.steps() == [0, 1]
        assert reader.verify() == []
    assert caplog.records == []
    writer = SnapshotStore(store.path)
    writer.write(at(base, 3))  # the repair rewrites the index (step 2's sidecar is there)
    assert writer.steps() == [0, 1, 2, 3]
    assert index.read_bytes().startswith(whole)


def test_a_torn_failure_line_is_repaired_before_the_next_append(
    store: SnapshotStore, base: Snapshot
) -> None:
    """failures.jsonl cut mid-line by a crash: the next writer rewrites it, then appends."""
    store.record_failure(step=1, tokens=10, error="first")
    store.record_failure(step=2, tokens=20, error="second")
    store.close()
    failures = store.path / "failures.jsonl"
    failures.write_bytes(failures.read_bytes()[:-10])
    writer = SnapshotStore(store.path)
    writer.record_failure(step=3, tokens=30, error="third")
    assert [f["error"] for f in writer.failures()] == ["first", "third"]


def test_the_slope_figure_stays_readable_at_2000_snapshots() -> None:
    """Thousands of points: at most MAX_BARS bars and markers, the quartiles as a band."""
    tokens = np.arange(2000, dtype=float) * 1000
    median = np.linspace(1.1, 3.0, 2000)
    series = SlopeSeries(
        label="long",
        tokens=tokens,
        q25=median - 0.1,
        median=median,
        q75=median + 0.1,
        num_alphas=21,
    )
    fig = slope_over_tokens_figure([series])
    ax = fig.axes[0]
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    line, _, (segments,) = bars.lines
    assert len(segments.get_segments()) <= MAX_BARS
    assert len(line.get_xdata()) == 2000  # the median line keeps every snapshot
    shown = line.get_markevery()
    assert 2 <= int(np.count_nonzero(shown)) <= MAX_BARS
    assert len(ax.collections) >= 2  # the quartile band beside the bars
