"""Monitor, driven directly: maps schedule, resume state, live onset, WatchConfig validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from regionwatch import ConfigError, SnapshotStore
from regionwatch.monitor import SAME_WEIGHTS_KEY, Monitor, WatchConfig
from regionwatch.schedule import Mark, Schedule
from tests.support.factories import make_monitor, make_watch
from tests.support.lm import SMALL_PROBE, tiny_gpt2
from tests.support.report_runs import snapshot as synthetic_snapshot
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB


def run(tmp: Path, lm_probes, watch: WatchConfig, marks: list[tuple[int, int]]) -> Monitor:
    """Start at step 0, then offer the monitor each (step, tokens) of `marks`, the last as final."""
    model = tiny_gpt2(VOCAB)
    monitor = Monitor(watch, probes=lm_probes, run_dir=tmp / "run")
    monitor.setup(model, log_dir=None)
    monitor.start(model, step=0, tokens=0)
    for i, (step, tokens) in enumerate(marks):
        monitor.maybe_measure(model, step=step, tokens=tokens, final=i == len(marks) - 1)
    monitor.close()
    return monitor


def test_maps_follow_their_own_sparser_schedule(tmp_path: Path, lm_probes) -> None:
    """Curves at every snapshot; maps 1 per decade of tokens, plus the first and the last."""
    watch = make_watch(1)
    marks = [(s, 100 * s) for s in range(1, 11)]  # 100..1000 tokens: buckets 2 (100..900), 3
    run(tmp_path, lm_probes, watch, marks)
    records = SnapshotStore(tmp_path / "run").records()
    assert [r["step"] for r in records] == list(range(11))
    with_maps = [r["step"] for r in records if "maps" in r["parts"]]
    # log buckets floor(log10 t): 0 -> baseline; 100 -> 2; 1000 -> 3 (also the last)
    assert with_maps == [0, 1, 10]
    assert all("random" in r["parts"] for r in records)


def test_maps_schedule_none_maps_every_snapshot(tmp_path: Path, lm_probes) -> None:
    """maps_schedule=None draws region maps at every snapshot."""
    watch = make_watch(1, maps_schedule=None)
    run(tmp_path, lm_probes, watch, [(1, 100), (2, 200)])
    assert all("maps" in r["parts"] for r in SnapshotStore(tmp_path / "run").records())


def test_reopened_monitor_continues_both_schedules(tmp_path: Path, lm_probes) -> None:
    """A monitor reopening the run takes its last marks from the store, not from memory."""
    watch = make_watch()
    first = run(tmp_path, lm_probes, watch, [(2, 200), (4, 400), (5, 500)])
    model = tiny_gpt2(VOCAB)
    again = Monitor(watch, probes=lm_probes, run_dir=tmp_path / "run")
    again.setup(model, log_dir=None)
    again.load_state_dict(first.state_dict())  # as a driver resuming from a checkpoint does
    assert again.start(model, step=4, tokens=400) is None  # step 4 is stored: not retaken
    assert again.last == Mark(4, 400)
    assert SnapshotStore(tmp_path / "run").steps() == [0, 2, 4]
    run_id = SnapshotStore(tmp_path / "run").run_id
    assert again.state_dict() == {
        "run_dir": str(tmp_path / "run"),
        "run_id": run_id,
        "last": [4, 400],
        "step": 4,
        "tokens": 400,
    }
    again.close()


def test_onset_is_logged_live_once_the_median_leaves_the_init_band(
    tmp_path: Path, lm_probes
) -> None:
    """regionwatch/onset/tokens is logged at the onset of the store's records so far.

    The run's first snapshots are synthetic with a known onset: an init band below any measured
    curve's max slope (< 1), a second snapshot inside it, a third above it at 2000 tokens. The
    monitor then measures the model (max slope >= 1: still above) and must log 2000.
    """
    run_dir = tmp_path / "run"
    store = SnapshotStore.create(run_dir, probes=lm_probes, config=SMALL_PROBE, run_id="known")
    with store:
        for index, (width, tokens) in enumerate([(4.0, 0), (4.0, 1000), (1.0, 2000)]):
            store.write(
                synthetic_snapshot(
                    lm_probes, SMALL_PROBE, run_id="known", index=index, step=index,
                    tokens=tokens, width=width,
                )
            )  # fmt: skip
    rows = store.records()
    assert rows[1]["max_slope/median"] <= rows[0]["max_slope/q75"] < rows[2]["max_slope/median"]
    monitor = make_monitor("monitor", lm_probes, run_dir, every=1, maps_schedule=None)
    model = tiny_gpt2(VOCAB)
    monitor.setup(model, log_dir=None)
    monitor.open()
    assert monitor.measure_now(model, step=3, tokens=3000) is not None
    monitor.close()
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = events.Scalars("regionwatch/onset/tokens")
    assert [(e.step, e.value) for e in logged] == [(3000, 2000.0)]
    assert monitor.failures == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"probe": "all"}, r"WatchConfig.probe='all'"),
        ({"schedule": 50}, r"WatchConfig.schedule=50.*every_steps"),
        ({"maps_schedule": "sometimes"}, r"maps_schedule='sometimes'"),
        ({"precision": "fp16"}, r"precision='fp16'"),
        ({"seed": -1}, r"WatchConfig.seed=-1"),
    ],
)
def test_watch_config_refuses_bad_values(kwargs: dict, match: str) -> None:
    """Each bad WatchConfig value is refused at construction, naming it."""
    with pytest.raises(ConfigError, match=match):
        WatchConfig(**kwargs)


def test_precision_trainer_needs_a_trainer_context(tmp_path: Path, lm_probes) -> None:
    """precision="trainer" without a trainer precision context fails at setup."""
    monitor = Monitor(WatchConfig(precision="trainer"), probes=lm_probes, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="trainer precision context"):
        monitor.setup(tiny_gpt2(VOCAB), log_dir=None)


def test_final_snapshot_gets_maps_even_when_its_step_was_measured_without(
    tmp_path: Path, lm_probes
) -> None:
    """A step measured without maps, then offered as final, is re-measured with region maps."""
    model = tiny_gpt2(VOCAB)
    monitor = make_monitor("monitor", lm_probes, tmp_path / "run", every=1)
    monitor.setup(model, log_dir=None)
    monitor.start(model, step=0, tokens=0)
    assert monitor.maybe_measure(model, step=1, tokens=2).measurement.maps is not None
    assert monitor.maybe_measure(model, step=2, tokens=3).measurement.maps is None  # same bucket
    final = monitor.maybe_measure(model, step=2, tokens=3, final=True)
    assert final is not None
    assert final.measurement.maps is not None
    assert monitor.maybe_measure(model, step=2, tokens=3, final=True) is None  # once only
    monitor.close()
    records = SnapshotStore(tmp_path / "run").records()
    assert [(r["step"], "maps" in r["parts"]) for r in records] == [(0, True), (1, True), (2, True)]
    assert monitor.sink_failures == []


def test_unchanged_weights_reuse_the_last_measurement(tmp_path: Path, lm_probes) -> None:
    """A step that left the weights bitwise as they were (a first step at lr 0) is not measured
    again: its snapshot holds the last measurement's numbers, names that step, and costs 0 s.
    Changed weights, or other parts (maps or not), are measured."""
    model = tiny_gpt2(VOCAB)
    watch = make_watch(1, maps_schedule=Schedule.every_steps(2))
    monitor = Monitor(watch, probes=lm_probes, run_dir=tmp_path / "run")
    monitor.setup(model, log_dir=None)
    first = monitor.start(model, step=0, tokens=0)  # maps
    no_maps = monitor.maybe_measure(model, step=1, tokens=10)  # same weights, other parts
    same = monitor.maybe_measure(model, step=2, tokens=20)  # maps again, same weights
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] += 1e-3
    changed = monitor.maybe_measure(model, step=3, tokens=30, final=True)  # maps: the last
    monitor.close()

    assert no_maps.measurement.maps is None
    assert no_maps.measurement.timing["total"] > 0
    assert SAME_WEIGHTS_KEY not in no_maps.info
    assert same.info[SAME_WEIGHTS_KEY] == 0
    assert same.measurement.timing == {"total": 0.0}
    assert same.weights_fingerprint == first.weights_fingerprint
    for part, curves in first.measurement.curves.items():
        assert torch.equal(same.measurement.curves[part].distance, curves.distance), part
    assert torch.equal(same.measurement.maps.rgb, first.measurement.maps.rgb)
    assert changed.weights_fingerprint != first.weights_fingerprint
    assert SAME_WEIGHTS_KEY not in changed.info
    assert changed.measurement.timing["total"] > 0
    assert not torch.equal(
        changed.measurement.curves["random"].distance, first.measurement.curves["random"].distance
    )
    stored = {r["step"]: r for r in SnapshotStore(tmp_path / "run").records()}
    assert stored[2]["probe_seconds"] == 0.0
    assert stored[2]["parts"] == stored[0]["parts"]
    assert stored[2]["max_slope/median"] == stored[0]["max_slope/median"]


def test_context_length_error_names_the_probe_part(tmp_path: Path, lm_probes) -> None:
    """A probe set longer than the model's context is refused at setup, naming the part."""
    monitor = Monitor(WatchConfig(), probes=lm_probes, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"probe set's random prompts do not fit.*at most 8"):
        monitor.setup(tiny_gpt2(VOCAB, positions=8), log_dir=None)


def test_a_snapshot_measures_the_model_set_up_and_no_other(tmp_path: Path, lm_probes) -> None:
    """Snapshots reuse the site `setup` resolved and checked: another model object is a failed
    snapshot naming the fix (training goes on), not a measurement of unchecked weights."""
    watch = make_watch(every=1)
    model = tiny_gpt2(VOCAB)
    monitor = Monitor(watch, probes=lm_probes, run_dir=tmp_path / "run")
    monitor.setup(model, log_dir=None)
    monitor.start(model, step=0, tokens=0)
    assert monitor.measure_now(tiny_gpt2(VOCAB), step=1, tokens=2) is None
    assert monitor.measure_now(model, step=2, tokens=4) is not None
    monitor.close()
    store = SnapshotStore(tmp_path / "run")
    assert [r["step"] for r in store.records()] == [0, 2]
    [failure] = store.failures()
    assert failure["step"] == 1
    assert "the one given to Monitor.setup" in failure["error"]
