"""SnapshotStore: exact round trips, one snapshot per step, crash safety, damage, readers."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regionwatch import store as store_module
from regionwatch.atomic import TEMP_MARK
from regionwatch.errors import ConfigError, StoreError
from regionwatch.measurement import ProbeConfig
from regionwatch.probes import ProbeSet
from regionwatch.sampling import NamedPair
from regionwatch.snapshot import Snapshot
from regionwatch.store import STORE_FORMAT_VERSION, SnapshotStore
from tests import store_writer
from tests.conftest import file_states, random_prompts
from tests.support.factories import make_probes, make_snapshot

CONFIG = ProbeConfig(num_alphas=5, grid=5)
RUN_ID = "run-1"
WRITER = Path(__file__).with_name("store_writer.py")
KILLS = 24
KILL_SEED = 20261125
ROW_KEYS = {"step", "tokens", "wall_time", "run_id", "max_slope/median", "file", "size", "sha256"}


@pytest.fixture(scope="module")
def probes() -> ProbeSet:
    return make_probes(named=(NamedPair("U", "user", (1, 2, 3), (1, 2, 4), "x", "y"),))


@pytest.fixture(scope="module")
def snapshot(probes: ProbeSet) -> Snapshot:
    return make_snapshot(probes, CONFIG, run_id=RUN_ID, step=7, tokens=4096, info={"note": "t"})


@pytest.fixture
def store(tmp_path: Path, probes: ProbeSet) -> Iterator[SnapshotStore]:
    with SnapshotStore.create(tmp_path / "run", probes=probes, config=CONFIG, run_id=RUN_ID) as s:
        yield s


def at(snapshot: Snapshot, step: int, tokens: int) -> Snapshot:
    return dataclasses.replace(snapshot, step=step, tokens=tokens)


def assert_same(back: Snapshot, sent: Snapshot) -> None:
    """Every stamp, scalar, raw and derived array equal (NaN equal to NaN), as test_snapshot."""
    assert back.record() == sent.record()
    assert back.header() == json.loads(json.dumps(sent.header()))
    for part, curves in sent.measurement.curves.items():
        for name in ("alphas", "distance", "relative", "max_slope", "logit_diff", "top_a", "top_b"):
            got, want = getattr(back.measurement.curves[part], name), getattr(curves, name)
            assert got.dtype == want.dtype, (part, name)
            assert torch.equal(got.nan_to_num(-1), want.nan_to_num(-1)), (part, name)
    for name in ("axis", "distance", "rgb", "anchors"):
        got, want = getattr(back.measurement.maps, name), getattr(sent.measurement.maps, name)
        assert torch.equal(got, want), name


def files(run: Path) -> dict[str, set[str]]:
    """Names on disk by kind: data files, sidecars (as data names), index rows, temp files."""
    snapshots = run / "snapshots"
    lines = (run / "index.jsonl").read_text().splitlines()
    return {
        "data": {p.name for p in snapshots.glob("*.safetensors")},
        "sidecars": {p.with_suffix(".safetensors").name for p in snapshots.glob("*.json")},
        "index": {json.loads(line)["file"] for line in lines[1:]},
        "temp": {p.name for d in (run, snapshots) for p in d.glob(TEMP_MARK)},
    }


@contextmanager
def writer_active(run: Path) -> Iterator[None]:
    """Hold the writer lock as a live writer does: opens then skip their repair, as readers do."""
    with (run / "writer.lock").open("a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


def assert_consistent(store: SnapshotStore) -> None:
    """After an open: no temp file, index == sidecars == data files, every file intact."""
    names = files(store.path)
    assert names["temp"] == set()
    assert names["data"] == names["sidecars"] == names["index"]
    assert {row["file"] for row in store.records()} == names["index"]
    assert store.verify() == []


# --- round trips and the one-snapshot-per-step rule -------------------------------------------


def test_store_round_trip_is_exact(store: SnapshotStore, snapshot: Snapshot) -> None:
    """A snapshot read back, also through a fresh reader, equals the one written."""
    path = store.write(snapshot)
    assert path.name == "0000000000004096-0000000007.safetensors"
    assert_same(store.read(7), snapshot)
    assert_same(SnapshotStore(store.path).read(7), snapshot)
    assert store.probes().equals(store.probes())
    assert store.probes().fingerprint == snapshot.probe_fingerprint


@settings(max_examples=12)
@given(
    step=st.sampled_from([0, 1, 10**9 - 1]) | st.integers(0, 10**9 - 1),
    tokens=st.sampled_from([0, 10**15, 10**16 - 1]) | st.integers(0, 10**16 - 1),
)
def test_store_round_trip_at_any_step_and_tokens(
    tmp_path_factory: pytest.TempPathFactory,
    probes: ProbeSet,
    snapshot: Snapshot,
    step: int,
    tokens: int,
) -> None:
    """Any step < 10^9 and tokens < 10^16 round-trip; the file name sorts like (tokens, step)."""
    run = tmp_path_factory.mktemp("prop") / "run"
    with SnapshotStore.create(run, probes=probes, config=CONFIG, run_id=RUN_ID) as store:
        store.write(at(snapshot, step, tokens))
        assert_same(store.read(step), at(snapshot, step, tokens))
        name = store.records()[0]["file"]
        assert name == f"{tokens:016d}-{step:010d}.safetensors"


def test_records_are_sorted_index_rows(store: SnapshotStore, snapshot: Snapshot) -> None:
    """records() is sorted by (tokens, step) and carries record(), file, size and sha256."""
    for step, tokens in [(3, 300), (1, 100), (2, 100), (0, 0)]:
        store.write(at(snapshot, step, tokens))
    records = store.records()
    assert [(r["tokens"], r["step"]) for r in records] == [(0, 0), (100, 1), (100, 2), (300, 3)]
    for row in records:
        assert row.items() >= at(snapshot, row["step"], row["tokens"]).record().items()
        path = store.path / "snapshots" / row["file"]
        assert row["size"] == path.stat().st_size
    assert store.steps() == [0, 1, 2, 3]
    assert store.latest() == (3, 300)


def test_rewriting_a_step_replaces_it(store: SnapshotStore, snapshot: Snapshot) -> None:
    """The same step again, with the same or other tokens, leaves exactly one snapshot."""
    store.write(at(snapshot, 5, 500))
    store.write(at(snapshot, 6, 600))
    again = dataclasses.replace(at(snapshot, 5, 500), wall_time=1.0)
    store.write(again)
    assert_same(store.read(5), again)
    moved = at(snapshot, 5, 512)
    store.write(moved)
    assert_same(store.read(5), moved)
    assert [(r["step"], r["tokens"]) for r in store.records()] == [(5, 512), (6, 600)]
    assert sorted(p.name for p in (store.path / "snapshots").iterdir()) == [
        "0000000000000512-0000000005.json",
        "0000000000000512-0000000005.safetensors",
        "0000000000000600-0000000006.json",
        "0000000000000600-0000000006.safetensors",
    ]
    # The sidecar commits the index row only; the header lives once, in the data file.
    sidecar = json.loads(
        (store.path / "snapshots" / "0000000000000512-0000000005.json").read_text()
    )
    assert sidecar == {
        "format": "regionwatch.sidecar",
        "format_version": 1,
        "row": store.records()[0],
    }


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"run_id": "other"}, "run_id 'other'"),
        ({"probe_fingerprint": "0" * 16}, "probe fingerprint '0000000000000000'"),
        ({"config_fingerprint": "f" * 16}, "config fingerprint 'ffffffffffffffff'"),
    ],
)
def test_write_refuses_another_runs_snapshot(
    store: SnapshotStore, snapshot: Snapshot, change: dict[str, str], match: str
) -> None:
    """A snapshot of another run, probe set or config is refused, and nothing is written."""
    with pytest.raises(StoreError, match=match):
        store.write(dataclasses.replace(snapshot, **change))
    assert store.records() == []


@pytest.mark.parametrize(("step", "tokens"), [(-1, 0), (10**10, 0), (0, 10**16), (0, -5)])
def test_write_refuses_steps_and_tokens_beyond_the_file_name(
    store: SnapshotStore, snapshot: Snapshot, step: int, tokens: int
) -> None:
    """Negative or too wide step/tokens are a ConfigError saying the allowed range."""
    with pytest.raises(ConfigError, match=r"need 0 <="):
        store.write(at(snapshot, step, tokens))


# --- create, reopen and refuse ----------------------------------------------------------------


def test_create_reopens_a_matching_run(
    tmp_path: Path, probes: ProbeSet, snapshot: Snapshot
) -> None:
    """create() on a run of the same probes and config reopens it (memory budget may differ)."""
    run = tmp_path / "run"
    with SnapshotStore.create(run, probes=probes, config=CONFIG, info={"model": "m"}) as first:
        run_id = first.run_id
        first.write(dataclasses.replace(snapshot, run_id=run_id))
    assert len(run_id) == store_module.RUN_ID_CHARS
    budget = dataclasses.replace(CONFIG, max_batch_tokens=4096)
    with SnapshotStore.create(run, probes=probes, config=budget) as again:
        assert (again.run_id, again.info, again.config) == (run_id, {"model": "m"}, CONFIG)
        assert again.steps() == [7]
    meta = json.loads((run / "config.json").read_text())
    assert meta["format_version"] == STORE_FORMAT_VERSION
    assert meta["config"] == CONFIG.to_dict()
    assert meta["probe_fingerprint"] == probes.fingerprint
    assert {"created", "regionwatch_version", "config_fingerprint"} <= set(meta)


def test_create_refuses_a_run_measured_differently(tmp_path: Path, probes: ProbeSet) -> None:
    """Another config, probe set or run id: a StoreError naming the difference and the fix."""
    run = tmp_path / "run"
    SnapshotStore.create(run, probes=probes, config=CONFIG, run_id=RUN_ID).close()
    other = dataclasses.replace(probes, random=random_prompts(6, 6, seed=9))
    cases = [
        ({"config": ProbeConfig(num_alphas=7, grid=5)}, r"num_alphas=7 \(the run's: 5\)"),
        ({"probes": other}, f"probe set {other.fingerprint}"),
        ({"run_id": "run-2"}, "run_id 'run-2'"),
    ]
    for change, match in cases:
        kwargs = {"probes": probes, "config": CONFIG, **change}
        with pytest.raises(StoreError, match=match) as err:
            SnapshotStore.create(run, **kwargs)
        assert "new --out / run_dir" in str(err.value)


def test_a_directory_that_is_not_a_run_is_refused(tmp_path: Path, probes: ProbeSet) -> None:
    """Opening a non-run, or creating in a non-empty non-run directory, is a StoreError."""
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a regionwatch run directory"):
        SnapshotStore(tmp_path)
    with pytest.raises(StoreError, match=r"not empty and not a regionwatch run.*notes.txt"):
        SnapshotStore.create(tmp_path, probes=probes, config=CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_newer_store_format_is_refused(store: SnapshotStore) -> None:
    """A run written by a newer regionwatch is refused with an upgrade hint."""
    path = store.path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    with pytest.raises(StoreError, match=r"format_version 99.*upgrade regionwatch"):
        SnapshotStore(store.path)


def test_an_interrupted_create_can_be_retried(tmp_path: Path, probes: ProbeSet) -> None:
    """A create that died before config.json (probes saved, temp files) is completed by the next."""
    run = tmp_path / "run"
    probes.save(run / "probes")
    (run / ".config.json.0123.rwtmp").write_text("{")
    with SnapshotStore.create(run, probes=probes, config=CONFIG) as store:
        assert store.records() == []
    assert not list(run.glob(TEMP_MARK))


def test_a_second_writer_is_refused(
    store: SnapshotStore, snapshot: Snapshot, probes: ProbeSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a store writes, a second writer gets a StoreError; readers and temp files are fine."""
    monkeypatch.setattr(store_module, "WRITER_LOCK_WAIT_S", 0.1)
    store.write(snapshot)
    live = store.path / "snapshots" / ".x.json.abc.rwtmp"  # as if the writer were mid-write
    live.write_text("{")
    reader = SnapshotStore(store.path)
    assert live.exists()  # a reader must not clean a live writer's temp files
    with pytest.raises(StoreError, match=rf"another writer \(pid {os.getpid()}\)"):
        reader.write(at(snapshot, 8, 5000))
    with pytest.raises(StoreError, match="another writer"):
        SnapshotStore.create(store.path, probes=probes, config=CONFIG)
    assert reader.steps() == [7]
    store.close()
    reader.write(at(snapshot, 8, 5000))  # the first writer is gone: the lock is free
    assert not live.exists()  # and the new writer cleaned up
    assert reader.steps() == [7, 8]
    reader.close()


# --- crash safety -----------------------------------------------------------------------------


def repaired(run: Path) -> SnapshotStore:
    """The store as its next writer sees it: crash repair done (a reader repairs nothing)."""
    store = SnapshotStore(run)
    store.repair()
    return store


def kill_state(run: Path) -> set[str]:
    """What a killed writer left, before anyone reopens the store."""
    names = files(run)
    state = {
        "temp file": bool(names["temp"]),
        "data without sidecar": bool(names["data"] - names["sidecars"]),
        "sidecar not indexed": bool(names["sidecars"] - names["index"]),
        "indexed without sidecar": bool(names["index"] - names["sidecars"]),
    }
    return {name for name, hit in state.items() if hit} or {"consistent"}


def test_kill_9_at_random_points_never_shows_a_partial_snapshot(
    tmp_path: Path, probes: ProbeSet, snapshot: Snapshot
) -> None:
    """SIGKILL a writer >= 20 times mid-work: each reopen shows only whole, exact snapshots."""
    run = tmp_path / "run"
    SnapshotStore.create(run, probes=probes, config=CONFIG, run_id=RUN_ID).close()
    store_writer.save_base(snapshot, tmp_path / "base.safetensors")
    base = store_writer.load_base(tmp_path / "base.safetensors")
    rng, states, committed = random.Random(KILL_SEED), Counter(), 0
    errors = tmp_path / "writer.err"
    command = [sys.executable, str(WRITER), str(run), str(tmp_path / "base.safetensors")]
    with (
        errors.open("w") as err,
        subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
        ) as writer,
    ):

        def send(line: str) -> None:
            writer.stdin.write(line + "\n")
            writer.stdin.flush()

        def until(word: str) -> str:
            """The argument of the next `word` line; children's `done` lines are skipped."""
            while not (line := writer.stdout.readline()).startswith(word):
                assert line, f"writer ended:\n{errors.read_text()}"
                assert not line.startswith("dead"), errors.read_text()
            return line.split()[-1]

        until("ready")
        for kill in range(KILLS):
            send(f"fork {kill}")
            pid = int(until("child"))
            # Progress by the child's own reports, not by the clock: 0 operations (a kill while
            # it opens the store) to 3, then a short random delay into the next operation.
            ops = rng.choice([0, 1, 2, 3])
            for _ in range(ops):
                until("done")
            time.sleep(rng.choice([0.0, rng.uniform(0, 0.03)]))
            os.kill(pid, signal.SIGKILL)
            send(f"reap {pid}")
            status = int(until("status"))
            assert os.WIFSIGNALED(status), f"writer exited by itself:\n{errors.read_text()}"
            states.update(kill_state(run))
            with writer_active(run):  # what a reader sees before anyone repairs the crash
                assert SnapshotStore(run).verify() == []
            with repaired(run) as store:
                assert_consistent(store)
                rows = store.records()
                assert rows or committed + ops == 0  # a committed write is never lost entirely
                for row in rows:
                    variant = row["tokens"] - row["step"] * store_writer.TOKENS_PER_STEP
                    assert variant in store_writer.VARIANTS
                    assert_same(
                        store.read(row["step"]), store_writer.derive(base, row["step"], variant)
                    )
                store.failures()
            committed += ops
        send("exit")
    logging.getLogger(__name__).info(
        "%d kills after %d reported operations: %s", KILLS, committed, dict(states)
    )
    assert committed >= KILLS  # the seeded schedule made the writers work between the kills


class SimulatedCrash(Exception):
    """Raised in place of a filesystem call: the process 'dies' right before it."""


@contextmanager
def crash_before_call(monkeypatch: pytest.MonkeyPatch, number: int) -> Iterator[list[int]]:
    """Crash at the `number`-th (0-based) call of os.replace, os.unlink or os.fsync."""
    calls = [0]

    def wrap(real: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            if calls[0] == number:
                raise SimulatedCrash
            calls[0] += 1
            return real(*args, **kwargs)

        return call

    with monkeypatch.context() as patch:
        for name in ("replace", "unlink", "fsync"):
            patch.setattr(os, name, wrap(getattr(os, name)))
        yield calls


SCENARIOS = {
    # name: (operation on a store holding steps 0, 1, 2 at variant 0; allowed states of step 1/3)
    "new step": (lambda s, d: s.write(d(3, 0)), 3, {"none", 0}),
    "same file": (
        lambda s, d: s.write(dataclasses.replace(d(1, 0), wall_time=5.0)),
        1,
        {0, "none", "new"},
    ),
    "other tokens": (lambda s, d: s.write(d(1, 1)), 1, {0, "none", 1}),
    "truncate": (lambda s, d: s.truncate_after(0), 1, {0, "none"}),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_crash_before_any_filesystem_call_leaves_a_consistent_store(
    tmp_path: Path,
    probes: ProbeSet,
    snapshot: Snapshot,
    monkeypatch: pytest.MonkeyPatch,
    scenario: str,
) -> None:
    """Crash before each replace/unlink/fsync of a write: the reopened store is whole and exact."""
    operation, step, allowed = SCENARIOS[scenario]

    def derive(s: int, variant: int) -> Snapshot:
        return store_writer.derive(snapshot, s, variant)

    baseline = tmp_path / "baseline"
    with SnapshotStore.create(baseline, probes=probes, config=CONFIG, run_id=RUN_ID) as store:
        for s in range(3):
            store.write(derive(s, 0))
    outcomes, number = set(), 0
    while True:
        run = tmp_path / f"crash-{number}"
        shutil.copytree(baseline, run)
        store = SnapshotStore(run)
        with crash_before_call(monkeypatch, number) as calls:
            try:
                operation(store, derive)
                crashed = False
            except SimulatedCrash:
                crashed = True
        store.close()
        with repaired(run) as reopened:
            assert_consistent(reopened)
            rows = {row["step"]: row for row in reopened.records()}
            for other in {0, 1, 2} - {step} - ({2} if scenario == "truncate" else set()):
                assert_same(reopened.read(other), derive(other, 0))
            if step not in rows:
                outcomes.add("none")
            elif scenario == "same file" and reopened.read(step).wall_time == 5.0:
                outcomes.add("new")
            else:
                variant = rows[step]["tokens"] - step * store_writer.TOKENS_PER_STEP
                assert_same(reopened.read(step), derive(step, variant))
                outcomes.add(variant)
        if not crashed:
            break
        number += 1
    assert number == calls[0] >= 6  # every call of the operation was a crash point
    assert outcomes == allowed  # and the crashes reached every allowed state


def test_repair_reconciles_the_index_with_the_sidecars(
    store: SnapshotStore, snapshot: Snapshot, caplog: pytest.LogCaptureFixture
) -> None:
    """Repair: temp files and orphans go, unindexed sidecars are indexed, vanished rows dropped."""
    for step in range(4):
        store.write(at(snapshot, step, step))
    store.close()
    run, snapshots = store.path, store.path / "snapshots"
    index = (run / "index.jsonl").read_text().splitlines()
    (run / "index.jsonl").write_text("\n".join(index[:2]) + "\n")  # steps 1, 2, 3 unindexed
    (snapshots / "0000000000000002-0000000002.json").unlink()  # step 2 not committed
    damaged = snapshots / "0000000000000003-0000000003.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"?")  # step 3's sidecar does not match
    (snapshots / ".0000000000000009-0000000009.safetensors.ab.rwtmp").write_bytes(b"half")
    with caplog.at_level(logging.INFO, logger="regionwatch"):
        reopened = repaired(run)
    reopened.close()
    assert reopened.steps() == [0, 1]
    assert not list(snapshots.glob(TEMP_MARK))
    assert "indexing 0000000000000001-0000000001.json" in caplog.text
    assert "0000000000000002-0000000002.safetensors: a write interrupted" in caplog.text
    assert f"not indexing {damaged}: sha256 differs" in caplog.text
    damaged.with_suffix(".json").unlink()  # give up on step 3: its data goes on the next open
    (snapshots / "0000000000000001-0000000001.json").unlink()
    with caplog.at_level(logging.WARNING, logger="regionwatch"):
        assert repaired(run).steps() == [0]
    assert "dropping 0000000000000001-0000000001.safetensors from the index" in caplog.text


# --- damage -----------------------------------------------------------------------------------


def test_truncated_and_bit_flipped_files_are_named(
    store: SnapshotStore, snapshot: Snapshot, caplog: pytest.LogCaptureFixture
) -> None:
    """read() names the file and reason, verify() lists both, records() skips the truncated one."""
    paths = [store.write(at(snapshot, step, 10 * step)) for step in range(3)]
    truncated, flipped = paths[0], paths[1]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"{truncated.name}: damaged: size \d+ bytes"):
        store.read(0)
    with pytest.raises(StoreError, match=rf"{flipped.name}: damaged: sha256 differs"):
        store.read(1)
    assert_same(store.read(2), at(snapshot, 2, 20))
    damage = store.verify()
    assert [(d.file, d.reason.split()[0]) for d in damage] == [
        (truncated, "size"),
        (flipped, "sha256"),
    ]
    with caplog.at_level(logging.WARNING, logger="regionwatch"):
        steps = [row["step"] for row in store.records()]
    assert steps == [1, 2]  # a flip of the right size is found only by verify() and read()
    assert f"skipping {truncated}" in caplog.text


def test_a_damaged_index_line_is_skipped_and_rebuilt(
    store: SnapshotStore, snapshot: Snapshot, caplog: pytest.LogCaptureFixture
) -> None:
    """records() skips a damaged index line with a warning; the next writer rebuilds it."""
    for step in range(3):
        store.write(at(snapshot, step, step))
    store.close()
    index = store.path / "index.jsonl"
    lines = index.read_text().splitlines()
    lines[2] = lines[2][:40]
    index.write_text("\n".join(lines) + "\n")
    with writer_active(store.path), caplog.at_level(logging.WARNING, logger="regionwatch"):
        reader = SnapshotStore(store.path)  # a writer is active: the open repairs nothing
        assert reader.steps() == [0, 2]
        assert [d.reason.split(":")[0] for d in reader.verify()] == ["line 3"]
    assert "index.jsonl: line 3: damaged" in caplog.text
    assert repaired(store.path).steps() == [0, 1, 2]


@pytest.mark.parametrize("damage", ["garbage", "other step"])
def test_a_file_with_a_matching_hash_but_wrong_content_is_refused(
    store: SnapshotStore, snapshot: Snapshot, damage: str
) -> None:
    """Unreadable safetensors or another step's file, even with the index fixed up, is refused."""
    store.write(at(snapshot, 0, 0))
    store.write(at(snapshot, 1, 1))
    target = store.path / "snapshots" / store.records()[1]["file"]
    data = (
        b"\x08" + bytes(50)
        if damage == "garbage"
        else (store.path / "snapshots" / store.records()[0]["file"]).read_bytes()
    )
    target.write_bytes(data)
    index = store.path / "index.jsonl"
    lines = [json.loads(line) for line in index.read_text().splitlines()]
    lines[2].update(size=len(data), sha256=store_module.bytes_digest(data))
    index.write_text("".join(json.dumps(line) + "\n" for line in lines))
    match = "unreadable safetensors" if damage == "garbage" else "header mismatch"
    with pytest.raises(StoreError, match=f"{target.name}: {match}"):
        store.read(1)


def test_reading_a_missing_step_names_what_exists(store: SnapshotStore, snapshot: Snapshot) -> None:
    """read() of a step without a snapshot says which steps the run has."""
    store.write(at(snapshot, 4, 40))
    with pytest.raises(StoreError, match=r"no snapshot at step 5; the run has steps 4..4 \(1\)"):
        store.read(5)


# --- resume, failures, analysis ---------------------------------------------------------------


def test_truncate_after_drops_later_snapshots_and_failures(
    store: SnapshotStore, snapshot: Snapshot
) -> None:
    """truncate_after(s) drops every snapshot and failure after s; latest() follows."""
    assert store.latest() is None
    for step in range(5):
        store.write(at(snapshot, step, 100 * step))
    store.record_failure(step=1, tokens=100, error="early")
    store.record_failure(step=4, tokens=400, error="late")
    assert store.truncate_after(2) == [3, 4]
    assert store.steps() == [0, 1, 2]
    assert store.latest() == (2, 200)
    assert [f["error"] for f in store.failures()] == ["early"]
    assert store.truncate_after(2) == []
    assert_consistent(store)


def test_failures_are_recorded_but_not_counted(store: SnapshotStore, snapshot: Snapshot) -> None:
    """A failed measurement is listed by failures() and is never a snapshot."""
    store.write(at(snapshot, 0, 0))
    store.record_failure(step=1, tokens=10, error="CUDA out of memory")
    failures = SnapshotStore(store.path).failures()
    assert [(f["step"], f["tokens"], f["error"]) for f in failures] == [
        (1, 10, "CUDA out of memory")
    ]
    assert store.steps() == [0]
    assert store.latest() == (0, 0)


def test_to_pandas_has_one_row_per_snapshot(
    store: SnapshotStore, snapshot: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """to_pandas() is records() as a DataFrame; without pandas, a clear ImportError."""
    for step in range(3):
        store.write(at(snapshot, step, step))
    frame = store.to_pandas()
    assert list(frame["step"]) == [0, 1, 2]
    assert frame.to_dict("records")[1]["file"] == store.records()[1]["file"]
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"needs pandas.*pip install pandas"):
        store.to_pandas()


def test_records_load_no_tensors_and_hash_nothing(
    store: SnapshotStore, snapshot: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """records(), steps() and latest() only read the index and stat files."""
    store.write(snapshot)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("records() must not load tensors or hash files")

    monkeypatch.setattr(store_module.safetensors.torch, "load", forbidden)
    monkeypatch.setattr(store_module, "file_digest", forbidden)
    monkeypatch.setattr(store_module, "bytes_digest", forbidden)
    monkeypatch.setattr(Snapshot, "from_parts", forbidden)
    assert [row["step"] for row in store.records()] == [7]
    assert store.latest() == (7, 4096)


def test_the_index_is_plain_json_lines_readable_without_torch(
    store: SnapshotStore, snapshot: Snapshot
) -> None:
    """Any tool reads index.jsonl with json alone (torch blocked), and gets records()."""
    for step in range(3):
        store.write(at(snapshot, step, 7 * step))
    code = (
        "import sys, json; sys.modules['torch'] = None\n"
        "lines = open(sys.argv[1], encoding='utf-8').read().splitlines()\n"
        "header, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(json.dumps({'header': header, 'rows': rows}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(store.path / "index.jsonl")],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(out.stdout)
    assert got["header"] == {"format": "regionwatch.index", "format_version": 1, "run_id": RUN_ID}
    assert got["rows"] == store.records()
    assert all(set(row) >= ROW_KEYS for row in got["rows"])


def test_a_reader_never_sees_a_partial_write(
    store: SnapshotStore, snapshot: Snapshot, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader thread polling records() and read() while 50 snapshots are written never fails."""
    reader, done, problems, reads = SnapshotStore(store.path), threading.Event(), [], [0]

    def poll() -> None:
        while not done.is_set():
            try:
                rows = reader.records()
                for row in rows[-2:]:
                    assert reader.read(row["step"]).step == row["step"]
                    reads[0] += 1
            except Exception as err:  # noqa: BLE001 - collected and asserted below
                problems.append(repr(err))

    thread = threading.Thread(target=poll)
    with caplog.at_level(logging.WARNING, logger="regionwatch"):
        thread.start()
        for step in range(50):
            store.write(at(snapshot, step, 10 * step))
            if step % 10 == 9:  # rewrites unlink files readers may be reading
                store.write(at(snapshot, step - 5, 10 * step - 49))
        done.set()
        thread.join()
    assert problems == []
    assert reads[0] > 0
    assert caplog.records == []
    assert len(reader.records()) == 50


# --- readers never write; links are never followed --------------------------------------------


def test_a_reader_repairs_nothing(store: SnapshotStore, snapshot: Snapshot) -> None:
    """Crash leftovers stay until a writer comes: opening, listing, verifying write nothing."""
    for step in range(3):
        store.write(at(snapshot, step, step))
    store.close()
    run, snapshots = store.path, store.path / "snapshots"
    (snapshots / ".0000000000000009-0000000009.safetensors.ab.rwtmp").write_bytes(b"half")
    orphan = snapshots / "0000000000000009-0000000009.safetensors"
    orphan.write_bytes(b"no sidecar")
    lines = (run / "index.jsonl").read_text().splitlines()
    (run / "index.jsonl").write_text("\n".join(lines[:2]) + "\n")  # steps 1, 2 unindexed
    before = file_states(run)
    reader = SnapshotStore(run)
    assert reader.steps() == [0]
    assert reader.verify() == []
    reader.failures()
    reader.probes()
    assert file_states(run) == before  # not a byte, not an mtime
    assert repaired(run).steps() == [0, 1, 2]  # the writer's repair indexes them
    assert not orphan.exists()


def test_a_linked_writer_lock_is_refused_and_its_target_untouched(
    store: SnapshotStore, snapshot: Snapshot, tmp_path: Path
) -> None:
    """writer.lock as a link: readers refuse the run, writers too; the target keeps its bytes."""
    store.write(snapshot)
    store.close()
    target = tmp_path / "precious.txt"
    target.write_text("user data\n")
    mtime = target.lstat().st_mtime_ns
    (store.path / "writer.lock").unlink()
    (store.path / "writer.lock").symlink_to(target)
    with pytest.raises(StoreError, match=r"writer.lock is a symbolic link"):
        SnapshotStore(store.path)
    with pytest.raises(StoreError, match=r"writer.lock is a symbolic link"):
        SnapshotStore.create(store.path, probes=store.probes(), config=CONFIG)
    assert (target.read_text(), target.lstat().st_mtime_ns) == ("user data\n", mtime)


@pytest.mark.parametrize("entry", ["snapshots", "index.jsonl", "config.json", "failures.jsonl"])
def test_a_linked_run_entry_is_refused_and_its_target_untouched(
    store: SnapshotStore, snapshot: Snapshot, tmp_path: Path, entry: str
) -> None:
    """A run entry that is a link (snapshots/ into a weights folder): refused, nothing touched."""
    store.write(snapshot)
    store.record_failure(step=9, tokens=9, error="x")
    store.close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(store.path / entry, elsewhere / entry)
    target = elsewhere / entry
    if entry == "snapshots":  # what a crash repair would delete: weights without sidecars, temps
        (target / "model.safetensors").write_bytes(b"weights")
        (target / ".model.safetensors.0a.rwtmp").write_bytes(b"partial download")
    (store.path / entry).symlink_to(target)
    before = file_states(elsewhere)
    for open_it in (
        lambda: SnapshotStore(store.path),
        lambda: SnapshotStore.create(store.path, probes=store.probes(), config=CONFIG),
    ):
        with pytest.raises(StoreError, match=rf"{entry} is a symbolic link"):
            open_it()
    assert file_states(elsewhere) == before


def test_a_linked_snapshot_file_is_not_followed(store: SnapshotStore, snapshot: Snapshot) -> None:
    """A snapshot file swapped for a link to an identical copy is damage, never read through."""
    path = store.write(snapshot)
    copy = path.parent.parent / "copy.safetensors"
    shutil.copy(path, copy)
    path.unlink()
    path.symlink_to(copy)
    with pytest.raises(StoreError, match=r"cannot read the snapshot of step 7"):
        store.read(7)
    assert [d.reason for d in store.verify()] == [
        "not a regular file (a link or a directory; the store wrote a file)"
    ]


def test_a_tampered_sidecar_is_reported_and_its_intact_snapshot_kept(
    store: SnapshotStore, snapshot: Snapshot
) -> None:
    """An altered sidecar is damage for verify(); its intact snapshot stays indexed and readable."""
    for step in range(3):
        store.write(at(snapshot, step, step))
    store.close()
    sidecar = store.path / "snapshots" / "0000000000000001-0000000001.json"
    sidecar.write_text(sidecar.read_text().replace('"size"', '"sizes"'))
    reader = SnapshotStore(store.path)
    assert reader.steps() == [0, 1, 2]
    (damage,) = reader.verify()
    assert damage.file == sidecar
    assert damage.reason.startswith("sidecar damaged")
    writer = repaired(store.path)  # the writer's repair keeps it too
    assert writer.steps() == [0, 1, 2]
    assert_same(writer.read(1), at(snapshot, 1, 1))
    assert [d.file for d in writer.verify()] == [sidecar]
    writer.close()
    altered = store.path / "snapshots" / "0000000000000002-0000000002.json"
    body = json.loads(altered.read_text())
    body["row"]["max_slope/median"] = 99.0  # well-formed, but not what was written
    altered.write_text(json.dumps(body))
    assert [(d.file, d.reason.split(":")[0]) for d in SnapshotStore(store.path).verify()] == [
        (sidecar, "sidecar damaged (not a snapshot sidecar (bad keys ['size']))"),
        (altered, "sidecar row differs from the index's (altered after the write)"),
    ]
