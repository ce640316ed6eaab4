"""A snapshot of unknown position (a one-off measurement) is never drawn as initialization.

`regionwatch measure MODEL` without --step/--tokens knows neither: the snapshot is stored as
"position unknown" and is never an init band, an onset baseline or a point at 0 tokens in any
figure, table or TensorBoard event. Old stores (before positions were recorded) still load.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import GPT2Config

from regionwatch.cli import main, parser
from regionwatch.measurement import ProbeConfig
from regionwatch.onset import tracker
from regionwatch.report import load_run, write_report
from regionwatch.report.build import curve_panel, map_columns
from regionwatch.report.maps import region_strip_figure
from regionwatch.report.trends import slope_by_model_figure, slope_over_tokens_figure
from regionwatch.snapshot import POSITION_KEY, Snapshot
from regionwatch.store import SnapshotStore
from regionwatch.tensorboard import TensorBoardSink
from tests.support.replay_runs import save_model
from tests.support.report_runs import probe_set, snapshot

OLD_STORES = Path(__file__).parent / "data" / "stores"
UNKNOWN = ("step", "tokens")
TWO_T = 2 * 10**12  # SmolLM2-135M's training tokens, as its model card states


def one_off(probes, config, *, run_id: str, index: int, step: int = 0, tokens: int = 0) -> Snapshot:
    """A synthetic snapshot of unknown position, stored as measure stores it (step 0's slot)."""
    snap = snapshot(probes, config, run_id=run_id, index=index, step=step, tokens=tokens)
    return dataclasses.replace(snap, position_unknown=UNKNOWN)


def write_run(path: Path, snapshots: list[tuple[str, int, int, int]], run_id: str) -> None:
    """A run of ("known" or "unknown", index, step, tokens) snapshots."""
    probes, config = probe_set(), ProbeConfig(num_alphas=11, grid=13)
    info = {"driver": "measure", "source": str(path)}
    with SnapshotStore.create(path, probes=probes, config=config, run_id=run_id, info=info) as s:
        for kind, index, step, tokens in snapshots:
            make = one_off if kind == "unknown" else snapshot
            s.write(make(probes, config, run_id=run_id, index=index, step=step, tokens=tokens))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained model measured once (unknown position), and a run mixing both kinds."""
    root = tmp_path_factory.mktemp("position")
    write_run(root / "pretrained", [("unknown", 9, 0, 0)], "pretrained")
    mixed = [("unknown", 9, 0, 0), ("known", 2, 10, 10**6), ("known", 5, 20, 10**8)]
    write_run(root / "mixed", mixed, "mixed")
    return {"pretrained": root / "pretrained", "mixed": root / "mixed"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, text_tokenizer) -> Path:
    """A saved tiny GPT-2 with its tokenizer: a "pretrained" model for `measure`."""
    path = tmp_path_factory.mktemp("model")
    save_model(path, seed=3, tokenizer=text_tokenizer)
    return path


def measure(model_dir: Path, *extra: str) -> int:
    return main(["measure", str(model_dir), "--pairs", "9", "--alphas", "5", "--grid", "5", *extra])


@pytest.mark.slow
def test_measure_of_a_saved_model_stores_an_unknown_position(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """No --step/--tokens: position unknown, shown as such; --tokens 2T: tokens known."""
    assert measure(model_dir, "--out", str(tmp_path / "once")) == 0
    (row,) = SnapshotStore(tmp_path / "once").records()
    assert row[POSITION_KEY] == ["step", "tokens"]
    assert SnapshotStore(tmp_path / "once").read(0).position_unknown == UNKNOWN
    capsys.readouterr()
    assert main(["show", str(tmp_path / "once")]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.endswith(" ok"))
    assert line.split()[:2] == ["unknown", "unknown"]
    assert "emergence onset: none: none of its snapshots has a known place in training" in out
    assert measure(model_dir, "--out", str(tmp_path / "smol"), "--tokens", "2T") == 0
    (row,) = SnapshotStore(tmp_path / "smol").records()
    assert (row["tokens"], row[POSITION_KEY]) == (TWO_T, ["step"])


@pytest.mark.slow
def test_a_fresh_init_is_at_step_0_and_slots_are_not_mixed(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """--init-from is initialization by construction; an unknown one never replaces it."""
    config_dir = tmp_path / "config"
    GPT2Config.from_pretrained(model_dir).save_pretrained(config_dir)
    small = ["--alphas", "5", "--grid", "5", "--out", str(tmp_path / "run")]
    init = ["measure", "--init-from", str(config_dir), "--tokenizer", str(model_dir)]
    assert main([*init, "--pairs", "9", *small]) == 0
    (row,) = SnapshotStore(tmp_path / "run").records()
    assert (row["step"], row["tokens"], row[POSITION_KEY]) == (0, 0, [])
    capsys.readouterr()
    again = ["measure", str(model_dir), "--probe", str(tmp_path / "run" / "probes")]
    assert main([*again, *small]) == 2  # refused before measuring
    err = capsys.readouterr().err
    assert "already holds a snapshot in the slot of step 0 (0 tokens)" in err
    assert "position unknown: step and tokens" in err
    assert [r[POSITION_KEY] for r in SnapshotStore(tmp_path / "run").records()] == [[]]


@pytest.mark.parametrize(
    ("argv", "dest", "value"),
    [
        (["measure", "m", "--tokens", "2T"], "tokens", TWO_T),
        (["measure", "m", "--tokens", "4.2M"], "tokens", 4_200_000),
        (["measure", "m", "--tokens", "1234"], "tokens", 1234),
        (["replay", "c", "--out", "r", "--tokens-per-step", "1M"], "tokens_per_step", 10**6),
        (["report", "r", "--out", "o", "--at", "10B"], "at", 10**10),
    ],
)
def test_token_counts_take_suffixes(argv: list[str], dest: str, value: int) -> None:
    """Wherever the CLI takes a token count, K/M/B/T suffixes read as training logs write them."""
    assert getattr(parser().parse_args(argv), dest) == value


def test_a_bad_token_count_is_refused_naming_the_flag(capsys: pytest.CaptureFixture) -> None:
    """argparse names the flag and the value."""
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(["measure", "m", "--tokens", "2X"])
    assert exit_info.value.code == 2
    assert "argument --tokens: invalid tokens value: '2X'" in capsys.readouterr().err


def test_unknown_positions_are_no_init_band_onset_or_0_tokens_point(
    runs: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    """The figure data: the tokens axis holds only placed points, no band, no "0" tick."""
    pretrained, mixed = (load_run(runs[name], progress=False) for name in ("pretrained", "mixed"))
    assert pretrained.tokens.size == 0
    assert pretrained.emergence.baseline is None
    assert np.isnan([pretrained.init_q25, pretrained.init_q75]).all()
    series = mixed.slope_series()
    np.testing.assert_array_equal(series.tokens, [10**6, 10**8])
    assert np.isnan([series.init_q25, series.init_q75]).all()  # no step 0: no band
    assert mixed.emergence.why_none.startswith(
        "it has no snapshot at step 0 (its first is at step 10"
    )
    ax = slope_over_tokens_figure([series]).axes[0]
    assert not ax.patches  # no init band drawn
    assert "init band" not in ax.get_title()
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    np.testing.assert_array_equal(bars.lines[0].get_xdata(), [10**6, 10**8])
    assert "0" not in [t.get_text() for t in ax.get_xticklabels()]
    panel = curve_panel(mixed, max_curves=8)
    np.testing.assert_array_equal(panel.tokens, [10**6, 10**8])
    # Drawn apart: one labelled point per model, on no tokens axis.
    points = [*pretrained.model_points(), *mixed.model_points()]
    assert [p.label for p in points] == [pretrained.label, mixed.label]
    fig = slope_by_model_figure(points, num_alphas=11)
    ax = fig.axes[0]
    assert ax.get_xscale() == "linear"
    assert not ax.patches
    assert [t.get_text() for t in ax.get_xticklabels()] == [p.label for p in points]
    drawn = [c.lines[0].get_ydata()[0] for c in ax.containers]
    assert drawn == [p.median for p in points]
    assert "tokens" not in ax.get_xlabel()
    # show says the same: the one-off's row is unknown, and there is no onset, with the reason.
    capsys.readouterr()
    assert main(["show", str(runs["mixed"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:2] == ["unknown", "unknown"]
    assert lines[-1] == f"emergence onset: none: {mixed.emergence.why_none}"


@pytest.mark.slow
def test_report_names_one_offs_apart_and_never_initialization(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """The page and files: a model comparison, "unknown" cells, no band, no 0-token column."""
    index = write_report([runs["pretrained"], runs["mixed"]], tmp_path / "out", progress=False)
    html = index.read_text()
    out = tmp_path / "out"
    assert (out / "max_slope_models.png").is_file()
    assert (out / "curves_models.png").is_file()
    assert (out / "max_slope.png").is_file()  # the mixed run's placed points
    pretrained = html.split('<h2 id="run-pretrained">')[1].split("<h2")[0]
    assert "Emergence onset: <b>none</b> (no init band)" in pretrained
    assert "none of its snapshots has a known place in training" in pretrained
    assert "initialization" not in pretrained
    assert "<td>unknown</td><td>unknown</td>" in pretrained
    assert 'data-tokens="0"' in pretrained  # the stored slot, marked unknown in its cells
    assert "<td>0</td>" not in pretrained
    assert "pretrained, mixed: snapshots without a known place in training" in html
    mixed = html.split('<h2 id="run-mixed">')[1].split("<h2")[0]
    assert "it has no snapshot at step 0 (its first is at step 10, 1,000,000 tokens)" in mixed


def test_region_strip_names_a_one_off_column(runs: dict[str, Path]) -> None:
    """The map strip's column of a one-off is titled by what it is, not "0"."""
    mapped = load_run(runs["mixed"], progress=False).snapshots
    subset, titles = map_columns(mapped, max_curves=8)
    fig = region_strip_figure(
        mapped[0].maps.axis,
        np.stack([mapped[i].maps.rgb for i in subset]),
        np.stack([mapped[i].maps.anchors for i in subset]),
        [titles[i] for i in subset],
        title="mixed",
    )
    assert [ax.get_title() for ax in fig.axes[: len(subset)]] == [
        "1M",
        "100M",
        "position in training unknown",
    ]


def test_tensorboard_never_writes_an_unknown_position(tmp_path: Path) -> None:
    """A one-off snapshot is not an event at step 0; a placed one is written as ever."""
    probes, config = probe_set(), ProbeConfig(num_alphas=11, grid=13)
    with TensorBoardSink(tmp_path / "tb") as sink:
        sink.write(one_off(probes, config, run_id="r", index=9), run_scalars={"onset/tokens": 5.0})
        sink.write(snapshot(probes, config, run_id="r", index=2, step=10, tokens=10**6))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert "regionwatch/onset/tokens" not in tags["scalars"]
    for tag in tags["scalars"]:
        assert [e.step for e in events.Scalars(tag)] == [10**6], tag
    for tag in tags["images"]:
        assert [e.step for e in events.Images(tag)] == [10**6], tag


@pytest.mark.slow
def test_old_stores_keep_loading(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before positions were recorded: `measure`'s step 0 reads as unknown, a training run's not."""
    for name in ("old_measure_run", "old_training_run"):
        shutil.copytree(OLD_STORES / name, tmp_path / name)
    old_measure = SnapshotStore(tmp_path / "old_measure_run")
    assert "position_unknown" not in (tmp_path / "old_measure_run" / "index.jsonl").read_text()
    (row,) = old_measure.records()
    assert (row["step"], row["tokens"], row[POSITION_KEY]) == (0, 0, ["step", "tokens"])
    assert old_measure.read(0).position_unknown == UNKNOWN
    assert old_measure.verify() == []
    training = SnapshotStore(tmp_path / "old_training_run")
    assert [r[POSITION_KEY] for r in training.records()] == [[]] * 5
    assert training.read(0).position_unknown == ()
    onset = tracker(training).result()
    assert onset.tokens == 4_000_000  # the onset the old code gave (test_report's)
    assert onset.baseline.origin == "step 0 of this run"
    index = write_report(
        [tmp_path / "old_measure_run", tmp_path / "old_training_run"],
        tmp_path / "out",
        progress=False,
    )
    assert (tmp_path / "out" / "max_slope_models.png").is_file()
    assert "Emergence onset: <b>4M tokens</b>" in index.read_text()
    capsys.readouterr()
    assert main(["show", str(tmp_path / "old_measure_run"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown[POSITION_KEY] == ["step", "tokens"]
