"""The emergence onset: only against a true initialization, and kept incrementally."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from regionwatch import metrics
from regionwatch.onset import (
    LIVE_RUN_KEY,
    OWN_INIT,
    Baseline,
    OnsetTracker,
    live_baseline,
    record_onset,
    tracker,
)
from regionwatch.replaying import replay
from regionwatch.store import SnapshotStore
from tests.support.factories import make_monitor
from tests.support.lm import SMALL_PROBE, tiny_gpt2
from tests.support.report_runs import probe_set, snapshot, synthetic_run
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB

SMALL_TOKENS = [0, 1_000_000, 4_000_000, 16_000_000, 64_000_000]


def row(step: int, tokens: int, median: float | None, q75: float | None = None, **extra) -> dict:
    """An index row with the keys the onset reads."""
    q25 = None if median is None else median - 0.1
    q75 = q75 if q75 is not None or median is None else median + 0.1
    base = {"step": step, "tokens": tokens, "position_unknown": []}
    return base | {"max_slope/q25": q25, "max_slope/median": median, "max_slope/q75": q75} | extra


def test_onset_leaves_the_band_of_step_0() -> None:
    """The band is step 0's; the onset is emergence_onset against its q75."""
    rows = [row(0, 0, 1.0, 1.2), row(1, 10, 1.1), row(2, 100, 1.3), row(3, 1000, 1.4)]
    onset = record_onset(rows)
    assert onset.tokens == 100
    assert onset.baseline == Baseline(q25=0.9, median=1.0, q75=1.2, origin=OWN_INIT)
    assert onset.tokens == metrics.emergence_onset([0, 10, 100, 1000], [1.0, 1.1, 1.3, 1.4], 1.2)
    assert onset.describe() == "100 tokens"
    assert record_onset(rows[:2]).describe() == "not yet"


def test_without_step_0_there_is_no_onset_and_the_reason_is_said() -> None:
    """A run whose first snapshot is later never takes it for the initialization."""
    later = [row(5, 500, 1.0, 1.2), row(6, 600, 1.1), row(7, 700, 1.3), row(8, 800, 1.4)]
    onset = record_onset(later)
    assert onset.tokens is None  # the first-snapshot band would have said 700
    assert onset.baseline is None
    assert onset.why_none == (
        "it has no snapshot at step 0 (its first is at step 5, 500 tokens), so nothing shows "
        "its initialization"
    )
    assert onset.describe().startswith("none: it has no snapshot at step 0")
    # Step 0 without max slopes (every pair excluded) is no band either, not the next snapshot's.
    unmeasured = record_onset([row(0, 0, None, 9.0), *later])
    assert unmeasured.why_none == "its step-0 snapshot has no max slopes (every pair excluded)"
    assert record_onset([]).why_none == "it has no snapshots yet"


def test_a_snapshot_of_unknown_position_is_never_a_baseline_or_a_point() -> None:
    """A one-off measurement stored in step 0's slot is no initialization and no onset."""
    one_off = row(0, 0, 1.0, 1.2, position_unknown=["step", "tokens"])
    onset = record_onset([one_off])
    assert onset.baseline is None
    assert onset.why_none == (
        "none of its snapshots has a known place in training (one-off measurements)"
    )
    # Beside a later point of known position: still no band, and the one-off is not a point.
    mixed = record_onset([one_off, row(9, 2 * 10**12, 4.0)])
    assert mixed.baseline is None
    live = Baseline(q25=0.5, median=1.0, q75=1.5, origin="live")
    assert record_onset([one_off], live).tokens is None  # not a point of the series
    assert record_onset([one_off, row(9, 10**9, 4.0)], live).tokens == 10**9


rows_strategy = st.lists(
    st.tuples(
        st.integers(0, 30),  # step; tokens grow with it (a run's order)
        # median (None: every pair excluded); a few values, so that a median often equals a q75
        st.one_of(st.none(), st.sampled_from([0.5, 1.0, 1.5]), st.floats(0.0, 3.0)),
        st.one_of(st.sampled_from([0.0, 0.5]), st.floats(0.0, 1.0)),  # q75 - median
        st.booleans(),  # position unknown
    ),
    max_size=25,
)


def build(rows: list[tuple[int, float | None, float, bool]]) -> list[dict]:
    """Index rows from drawn tuples; an unknown position sits in step 0's slot, as stored."""
    out = []
    for step, median, spread, unknown in rows:
        q75 = None if median is None else median + spread
        if unknown:
            out.append(row(0, 0, median, q75, position_unknown=["step", "tokens"]))
        else:
            out.append(row(step, 1000 * step, median, q75))
    return out


@given(
    rows=rows_strategy,
    live=st.one_of(st.none(), st.sampled_from([1.0, 1.5]), st.floats(0.0, 3.0)),
    seed=st.randoms(),
)
def test_tracker_equals_the_onset_over_all_records(rows, live, seed) -> None:
    """Row by row, in any order and with retakes, the tracker equals `record_onset` so far."""
    baseline = None if live is None else Baseline(q25=live, median=live, q75=live, origin="live")
    drawn = build(rows)
    seed.shuffle(drawn)
    onset = OnsetTracker(baseline, no_live="it names no live run")
    held: dict[int, dict] = {}
    for r in drawn:
        onset.add(r)
        held[r["step"]] = r  # the store keeps one snapshot per step: a retake replaces it
        expected = record_onset(held.values(), baseline)
        assert onset.onset == expected.tokens
        assert onset.result().tokens == expected.tokens
        assert onset.baseline == expected.baseline


@given(rows=rows_strategy)
def test_tracker_in_run_order_equals_the_old_whole_run_onset(rows) -> None:
    """A run from step 0 on, added in order: emergence_onset against step 0, as before."""
    drawn = sorted({r["step"]: r for r in build(rows)}.values(), key=lambda r: r["step"])
    drawn = [r for r in drawn if not r["position_unknown"]]
    onset = OnsetTracker()
    for r in drawn:
        onset.add(r)
    measured = [r for r in drawn if r["max_slope/median"] is not None]
    if not drawn or drawn[0]["step"] != 0 or not measured or measured[0] is not drawn[0]:
        assert onset.onset is None
        return
    expected = metrics.emergence_onset(
        [r["tokens"] for r in measured],
        [r["max_slope/median"] for r in measured],
        drawn[0]["max_slope/q75"],
    )
    assert onset.onset == expected


def replay_like(path: Path, live: Path | None, tokens: list[int], *, probes_seed: int = 0) -> None:
    """The live run's snapshots after step 0, written to a new run naming `live` (if given)."""
    probes = probe_set(probes_seed)
    config = SnapshotStore(live or path.parent / "live").config
    info = {} if live is None else {LIVE_RUN_KEY: str(live)}
    with SnapshotStore.create(path, probes=probes, config=config, info=info) as store:
        for i, t in enumerate(tokens):
            if t:  # no step-0 checkpoint
                store.write(
                    snapshot(probes, config, run_id=store.run_id, index=i, step=10 * i, tokens=t)
                )


def test_a_run_without_step_0_takes_the_live_runs_band(tmp_path: Path) -> None:
    """The same snapshots after step 0 give the live run's onset, against its step-0 band."""
    synthetic_run(tmp_path / "live", SMALL_TOKENS)
    live = tracker(SnapshotStore(tmp_path / "live")).result()
    assert live.tokens == SMALL_TOKENS[2]
    replay_like(tmp_path / "replay", tmp_path / "live", SMALL_TOKENS)
    replayed = tracker(SnapshotStore(tmp_path / "replay")).result()
    assert replayed.tokens == live.tokens
    assert (replayed.baseline.q25, replayed.baseline.q75) == (
        live.baseline.q25,
        live.baseline.q75,
    )
    assert replayed.baseline.origin == f"step 0 of live run {tmp_path / 'live'}"
    # Without the live run named: no onset, and why; never the first snapshot's band.
    replay_like(tmp_path / "alone", None, SMALL_TOKENS)
    alone = tracker(SnapshotStore(tmp_path / "alone")).result()
    assert alone.tokens is None
    assert alone.why_none == (
        "it has no snapshot at step 0 (its first is at step 10, 1,000,000 tokens), so nothing "
        "shows its initialization, and it names no live run ('live_run' in its config.json) to "
        "take one from"
    )


def test_a_live_run_measured_differently_gives_no_band(tmp_path: Path) -> None:
    """Another probe set, or a live run that is gone: no onset, with the reason."""
    synthetic_run(tmp_path / "live", SMALL_TOKENS)
    replay_like(tmp_path / "other", tmp_path / "live", SMALL_TOKENS, probes_seed=1)
    baseline, why = live_baseline(SnapshotStore(tmp_path / "other"))
    assert baseline is None
    assert why.startswith(f"the live run it names, {tmp_path / 'live'}, measured another probe set")
    assert tracker(SnapshotStore(tmp_path / "other")).result().why_none.endswith(why)
    replay_like(tmp_path / "orphan", tmp_path / "live", SMALL_TOKENS)
    (tmp_path / "live" / "config.json").unlink()
    baseline, why = live_baseline(SnapshotStore(tmp_path / "orphan"))
    assert baseline is None
    assert why.startswith("the live run it names cannot be read (")


@pytest.mark.slow
def test_replay_without_step_0_has_the_live_runs_onset(
    tmp_path: Path, lightning_live: Path
) -> None:
    """A replay of a live run's checkpoints (no step 0) records the run and shares its band."""
    live = lightning_live / "live"
    replay([live, lightning_live / "ckpts"], out=tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["info"][LIVE_RUN_KEY] == str(live.resolve())
    replayed = SnapshotStore(tmp_path / "run")
    assert 0 not in replayed.steps()
    ours, theirs = tracker(replayed).result(), tracker(SnapshotStore(live)).result()
    assert ours.baseline is not None
    assert ours.baseline.q75 == theirs.baseline.q75
    assert math.isfinite(ours.baseline.q75)
    # On the steps both hold (identical weights), the onsets agree.
    shared = set(SnapshotStore(live).steps()) - {0}
    live_rows = [r for r in SnapshotStore(live).records() if r["step"] in shared | {0}]
    replay_rows = [r for r in replayed.records() if r["step"] in shared]
    assert record_onset(replay_rows, ours.baseline).tokens == record_onset(live_rows).tokens


@pytest.mark.slow
def test_the_monitor_keeps_the_onset_without_rereading_the_store(tmp_path: Path, lm_probes) -> None:
    """Read once at open, then one update per stored snapshot: TensorBoard gets the onset."""
    run_dir = tmp_path / "run"
    with SnapshotStore.create(run_dir, probes=lm_probes, config=SMALL_PROBE, run_id="r") as store:
        for index, (width, tokens) in enumerate([(4.0, 0), (4.0, 1000), (1.0, 2000)]):
            store.write(
                snapshot(lm_probes, SMALL_PROBE, run_id="r", index=index, step=index,
                         tokens=tokens, width=width)
            )  # fmt: skip
    monitor = make_monitor("monitor", lm_probes, run_dir, every=1, maps_schedule=None)
    model = tiny_gpt2(VOCAB)
    monitor.setup(model, log_dir=None)
    monitor.open()

    def reread() -> None:
        raise AssertionError("the store's index was read again for a snapshot")

    monitor.store.records = reread  # from here on, a re-read is a failed background write
    for step in (3, 4):
        assert monitor.measure_now(model, step=step, tokens=1000 * step, maps=False) is not None
    monitor.close()
    assert monitor.sink_failures == []
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("regionwatch/onset/tokens")]
    assert logged == [(3000, 2000.0), (4000, 2000.0)]
    assert tracker(SnapshotStore(run_dir)).onset == 2000
