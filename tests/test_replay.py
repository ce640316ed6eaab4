"""Replay on real checkpoints: every source kind, failures, resume, live == replay.

Finding and placing checkpoints is tested in test_checkpoints.py, loading them in test_loading.py.
"""

from __future__ import annotations

import gc
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import GPT2Config, GPT2LMHeadModel

from regionwatch import ConfigError, ProbeConfig, SnapshotStore
from regionwatch.checkpoints import discover
from regionwatch.cli import main
from regionwatch.errors import StoreError
from regionwatch.loading import MODEL_FILES_DIR
from regionwatch.onset import LIVE_RUN_KEY
from regionwatch.replaying import replay
from regionwatch.snapshot import weights_fingerprint
from tests.support.disk import fill
from tests.support.lm import SMALL_PROBE
from tests.support.replay_runs import lightning_run, save_model, truncate

SMALL = ["--alphas", str(SMALL_PROBE.num_alphas), "--grid", str(SMALL_PROBE.grid)]
REPO = Path(__file__).resolve().parents[1]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN included, which torch.equal counts as unequal)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def assert_same_snapshots(live: Path, replayed: Path, steps: list[int]) -> None:
    """The replayed run holds, at each step, what the live run logged, bit for bit.

    A live run draws region maps at fewer snapshots than curves (its maps schedule), a replay at
    every checkpoint; the engine batches pair curves the same way either way, so every array the
    live snapshot has is bitwise equal to the replayed one, and so are the shared scalars.
    """
    live_store, replay_store = SnapshotStore(live), SnapshotStore(replayed)
    for step in steps:
        a, b = live_store.read(step), replay_store.read(step)
        assert (a.tokens, a.weights_fingerprint) == (b.tokens, b.weights_fingerprint), step
        assert b.info["driver"] == "replay"
        arrays_a, arrays_b = a.arrays(), b.arrays()
        assert any(name.startswith("maps/") for name in arrays_b)
        assert arrays_a.keys() <= arrays_b.keys()
        for name in arrays_a:
            assert bitwise_equal(arrays_a[name], arrays_b[name]), (step, name)
        assert dict(a.summary).items() <= dict(b.summary).items(), step


def test_save_pretrained_dirs_replay_with_the_tokenizer_they_hold(
    tmp_path: Path, text_tokenizer
) -> None:
    """The probe set comes from the checkpoints' own tokenizer; the run has TensorBoard logs."""
    models = [
        save_model(tmp_path / "src" / f"step{s}-tokens{t}", seed=s, tokenizer=text_tokenizer)
        for s, t in ((1, 1000), (2, 2000))
    ]
    result = replay([tmp_path / "src"], out=tmp_path / "run", config=SMALL_PROBE, progress=False)
    assert result.ok
    assert [c.step for c in result.measured] == [1, 2]
    store = SnapshotStore(tmp_path / "run")
    rows = store.records()
    assert [(r["step"], r["tokens"]) for r in rows] == [(1, 1000), (2, 2000)]
    assert [r["weights_fingerprint"] for r in rows] == [weights_fingerprint(m) for m in models]
    store.probes(tokenizer=text_tokenizer)  # raises unless built with this very tokenizer
    assert store.read(2).info["checkpoint"] == str(tmp_path / "src" / "step2-tokens2000")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("regionwatch/max_slope/median")] == [1000, 2000]


def test_a_replay_onto_a_full_disk_is_refused_before_measuring(
    tmp_path: Path, small_disk: Path, text_tokenizer
) -> None:
    """The run's disk is full before step 2 is replayed into it: refused at the start, naming the
    space needed, nothing measured, and the run keeps step 1 (a disk that fills mid-run:
    tests/test_full_disk.py)."""
    for step in (1, 2):
        path = tmp_path / "src" / f"step{step}-tokens{step}000"
        save_model(path, seed=step, tokenizer=text_tokenizer)
        if step == 1:
            replay([path], out=small_disk / "run", config=SMALL_PROBE, progress=False)
    fill(small_disk)
    with pytest.raises(ConfigError, match=r"MiB free on its filesystem; a run needs about"):
        replay([tmp_path / "src"], out=small_disk / "run", progress=False)
    assert SnapshotStore(small_disk / "run").steps() == [1]


def test_trainer_checkpoints_replay_exactly_the_live_numbers(
    tmp_path: Path, trainer_live: Path, probes
) -> None:
    """checkpoint-N folders of a live HF Trainer run give bit for bit the numbers it logged."""
    result = replay([trainer_live / "out"], out=tmp_path / "run", probes=probes, config=SMALL_PROBE)
    assert [c.step for c in result.measured] == [2, 4]
    assert_same_snapshots(trainer_live / "live", tmp_path / "run", [2, 4])


def test_lightning_checkpoints_replay_exactly_the_live_numbers(
    tmp_path: Path, lightning_live: Path
) -> None:
    """A live Lightning run's .ckpt files, its run dir a SOURCE, give its numbers bit for bit."""
    live = lightning_live / "live"
    result = replay([live, lightning_live / "ckpts"], out=tmp_path / "run", progress=False)
    assert [c.step for c in result.measured] == [1, 2, 3, 4]
    assert {c.found for c in result.measured} == {
        "step from the checkpoint's global_step, tokens from the RegionMonitor state in the "
        "checkpoint"
    }
    assert (
        SnapshotStore(tmp_path / "run").probe_fingerprint == SnapshotStore(live).probe_fingerprint
    )
    assert_same_snapshots(live, tmp_path / "run", [2, 4])


def test_into_adds_the_missing_points_to_a_live_run(
    tmp_path: Path, lightning_live: Path, capsys
) -> None:
    """--into measures only the steps the live run lacks and leaves its own snapshots alone."""
    run = shutil.copytree(lightning_live / "live", tmp_path / "live")
    before = {r["step"]: r["wall_time"] for r in SnapshotStore(run).records()}
    code = main(["replay", str(lightning_live / "ckpts"), "--into", str(run)])
    assert code == 0
    assert "2 measured, 2 already there, 0 failed" in capsys.readouterr().out
    rows = SnapshotStore(run).records()
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert {r["step"]: r["wall_time"] for r in rows if r["step"] in before} == before
    assert [r["tokens"] for r in rows] == sorted(r["tokens"] for r in rows)


def test_mixed_sources_in_one_call(
    tmp_path: Path, lightning_live: Path, trainer_live: Path, probe_dir: Path, capsys
) -> None:
    """save_pretrained dirs, Trainer checkpoints and .ckpt files together, in token order."""
    save_model(tmp_path / "step3-tokens150", seed=3)
    sources = [
        trainer_live / "out" / "checkpoint-4",
        tmp_path / "step3-tokens150",
        lightning_live / "ckpts" / "epoch=0-step=1.ckpt",
    ]
    argv = ["replay", *map(str, sources), "--out", str(tmp_path / "run"), "--probe", str(probe_dir)]
    assert main([*argv, *SMALL]) == 0
    assert "3 measured" in capsys.readouterr().out
    store = SnapshotStore(tmp_path / "run")
    rows = store.records()
    assert [r["step"] for r in rows] == [1, 3, 4]
    assert [r["tokens"] for r in rows] == sorted(r["tokens"] for r in rows)
    assert rows[1]["tokens"] == 150
    assert [store.read(r["step"]).info["checkpoint_kind"] for r in rows] == [
        "state_dict",
        "pretrained",
        "pretrained",
    ]


def test_bad_checkpoints_are_reported_and_skipped(tmp_path: Path, probe_dir: Path, capsys) -> None:
    """Corrupt, weightless and misshapen checkpoints fail alone; the rest go in; exit status 1."""
    for step in (1, 2, 3, 4, 5):
        save_model(tmp_path / f"step{step}-tokens{step * 100}", seed=step)
    truncate(tmp_path / "step2-tokens200" / "model.safetensors")
    (tmp_path / "step3-tokens300" / "model.safetensors").unlink()
    config = GPT2Config.from_pretrained(tmp_path / "step4-tokens400")
    config.n_layer = 3  # the config now promises a block the weights lack
    config.save_pretrained(tmp_path / "step4-tokens400")
    argv = ["replay", str(tmp_path), "--out", str(tmp_path / "run"), "--probe", str(probe_dir)]
    assert main([*argv, *SMALL]) == 1
    out, err = capsys.readouterr()
    assert "2 measured, 0 already there, 3 failed" in out
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert [line.split()[1].rstrip(":") for line in failed] == [
        str(tmp_path / f"step{s}-tokens{s * 100}") for s in (2, 3, 4)
    ]
    assert "missing" in failed[2]
    assert "h.2" in failed[2]
    assert SnapshotStore(tmp_path / "run").steps() == [1, 5]
    assert "replay: 100%" in err
    assert "step5-tokens500" in err


def test_identical_weights_are_warned_and_one_model_lives_at_a_time(
    tmp_path: Path, probes, caplog
) -> None:
    """Two checkpoints with the same weights: a warning naming both; models freed in between."""
    save_model(tmp_path / "step1-tokens10", seed=0)
    shutil.copytree(tmp_path / "step1-tokens10", tmp_path / "step2-tokens20")
    save_model(tmp_path / "step3-tokens30", seed=1)
    alive: list[int] = []

    class CountModels(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "max slope median" in record.getMessage():  # the one line after each snapshot
                alive.append(sum(isinstance(o, GPT2LMHeadModel) for o in gc.get_objects()))

    gc.collect()
    baseline = sum(isinstance(o, GPT2LMHeadModel) for o in gc.get_objects())
    counter = CountModels(level=logging.INFO)
    logging.getLogger("regionwatch.monitor").addHandler(counter)
    try:
        with caplog.at_level(logging.INFO, logger="regionwatch"):
            result = replay(
                [tmp_path], out=tmp_path / "run", probes=probes, config=SMALL_PROBE, progress=False
            )
    finally:
        logging.getLogger("regionwatch.monitor").removeHandler(counter)
    assert [(c.step, twin) for c, twin in result.duplicates] == [(2, 1)]
    warning = next(
        r.getMessage() for r in caplog.records if "exactly the weights" in r.getMessage()
    )
    assert "step2-tokens20" in warning
    assert "step1-tokens10" in warning
    assert len(alive) == 3
    assert max(alive) == baseline + 1


@pytest.mark.slow
def test_replay_killed_midway_resumes_without_measuring_twice(
    tmp_path: Path, probes, probe_dir: Path
) -> None:
    """kill -9 after the first snapshot lands; the rerun measures only what is missing."""
    for step in range(1, 6):
        save_model(tmp_path / "src" / f"step{step}-tokens{step * 10}", seed=step)
    run = tmp_path / "run"
    argv = ["replay", str(tmp_path / "src"), "--out", str(run), "--probe", str(probe_dir), *SMALL]
    child = subprocess.Popen(
        [sys.executable, "-m", "regionwatch", *argv],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not _snapshots(run) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    store = SnapshotStore(run)  # reopening cleans whatever the kill left
    before = {r["step"]: r["wall_time"] for r in store.records()}
    assert 1 <= len(before) < 5
    result = replay([tmp_path / "src"], out=run, probes=probes, config=SMALL_PROBE, progress=False)
    assert sorted(c.step for c in result.skipped) == sorted(before)
    assert sorted(c.step for c in result.measured) == sorted(set(range(1, 6)) - set(before))
    rows = SnapshotStore(run).records()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert {r["step"]: r["wall_time"] for r in rows if r["step"] in before} == before
    assert SnapshotStore(run).verify() == []


def _snapshots(run: Path) -> int:
    try:
        lines = (run / "index.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return max(len(lines) - 1, 0)


def test_a_run_measured_differently_is_refused(tmp_path: Path, probes) -> None:
    """Resuming into a run with other settings fails before any checkpoint is measured."""
    save_model(tmp_path / "src" / "step1-tokens10", seed=0)
    replay(
        [tmp_path / "src"], out=tmp_path / "run", probes=probes, config=SMALL_PROBE, progress=False
    )
    with pytest.raises(StoreError, match=r"measured differently.*num_alphas=3"):
        replay(
            [tmp_path / "src"],
            out=tmp_path / "run",
            probes=probes,
            config=ProbeConfig(num_alphas=3, grid=5),
            progress=False,
        )


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["replay", "{tmp}/nowhere", "--out", "{tmp}/run"], "does not exist"),
        (["replay", "--out", "{tmp}/run", "--revisions", "step0"], "nothing to replay"),
        (["replay", "{tmp}", "--into", "{tmp}/run"], "not a regionwatch run"),
        (["replay", "{tmp}/empty", "--out", "{tmp}/run"], "no checkpoints in"),
    ],
)
def test_cli_usage_errors_exit_2(tmp_path: Path, capsys, argv: list[str], match: str) -> None:
    """Bad arguments and sources end with status 2 and a message saying what was wrong."""
    (tmp_path / "empty").mkdir()
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert match in capsys.readouterr().err


def test_cli_needs_exactly_one_run_dir(tmp_path: Path) -> None:
    """--out and --into are exclusive, and one is required (argparse exits with 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(["replay", str(tmp_path)])
    assert exit_.value.code == 2
    with pytest.raises(ConfigError, match="--revisions needs --repo"):
        discover([], revisions="step0")


@pytest.mark.slow
def test_lightning_checkpoints_replay_with_no_flag_while_the_live_run_is_there(
    tmp_path: Path, data, probes, capsys
) -> None:
    """`replay ckpts --out OUT`: the .ckpt names its live run, which holds the probe set and
    config.json; the replay names it as `live_run`. Once the run is gone the error names the
    flags."""
    ckpts = lightning_run(tmp_path / "src", data, probes=probes, every=2, max_steps=4)
    live = tmp_path / "src" / "live"
    assert not (ckpts / "config.json").exists()  # nothing beside the .ckpt files
    assert (live / MODEL_FILES_DIR / "config.json").is_file()
    out = tmp_path / "replayed"
    assert main(["replay", str(ckpts), "--out", str(out)]) == 0
    assert "4 measured, 0 already there, 0 failed" in capsys.readouterr().out
    assert SnapshotStore(out).info[LIVE_RUN_KEY] == str(live)
    assert SnapshotStore(out).config == SnapshotStore(live).config
    assert_same_snapshots(live, out, [2, 4])

    live.rename(tmp_path / "moved")
    assert main(["replay", str(ckpts), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert f"name the live run {live}, which is gone" in err
    assert "--probe PROBE_DIR" in err
    assert "--config DIR" in err
