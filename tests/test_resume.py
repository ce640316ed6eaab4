"""Exact resume: kill -9 a training process (mid-write too), resume; every snapshot exists once.

CPU-only: the training runs in a subprocess (tests/resume_train.py) that is killed and relaunched,
so it takes no `device` fixture; the in-process driver tests cover CUDA.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from regionwatch import SnapshotStore
from regionwatch.atomic import TEMP_MARK
from tests.support.lm import small_probes

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
SCHEDULED = [0, 2, 4, 6, 8, 10]
# Marks after which the training script waits for an answer on stdin (see resume_train.py). A
# mark ends its line: another thread's unfinished output (HF prints its logs) may come before it.
PAUSE = re.compile(r"(STEP|WRITE) \d+$")
RUN_LIMIT_S = 300  # a run takes about 10 s here
# Where each run is killed: at the n-th pause line starting with this text.
KILLS = [
    ("WRITE", 2),
    ("STEP", 5),
    ("WRITE", 2),
]  # in a write, after a checkpoint, in a write again


def launch(kind: str, out: Path, kill_at: tuple[str, int] | None) -> list[str]:
    """Run the training script; with `kill_at`, SIGKILL it at that output line; return its lines.

    The script waits at every pause line until answered, so the kill lands exactly there.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.resume_train", kind, str(out), str(STEPS)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    # A lost answer would leave both sides waiting: the run is killed instead, and fails below.
    watchdog = threading.Timer(RUN_LIMIT_S, proc.kill)
    watchdog.start()
    lines, seen = [], 0
    for line in proc.stdout:
        lines.append(line.strip())
        mark = PAUSE.search(line.strip())
        if mark is None:
            continue
        if kill_at and mark[1] == kill_at[0]:
            seen += 1
            if seen == kill_at[1]:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.stdin.write("go\n")
        proc.stdin.flush()
    proc.stdin.close()
    proc.wait(timeout=120)
    watchdog.cancel()
    if kill_at is None:
        assert proc.returncode == 0, lines[-5:]
        assert lines[-1] == "DONE"
    return lines


def prepare(tmp: Path, tokenizer) -> Path:
    tokenizer.save_pretrained(tmp / "tokenizer")
    small_probes(tokenizer).save(tmp / "probes")
    return tmp


def check_run(out: Path) -> SnapshotStore:
    """Every scheduled snapshot exactly once, whole, and TensorBoard never doubling back."""
    store = SnapshotStore(out / "run")
    assert store.steps() == SCHEDULED
    assert store.verify() == []
    assert store.failures() == []
    records = store.records()
    tokens = [r["tokens"] for r in records]
    assert tokens == sorted(set(tokens))
    for step in SCHEDULED:
        assert store.read(step).step == step
    assert not list((out / "run").rglob(f"*{TEMP_MARK}*"))
    events = EventAccumulator(str(out / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("regionwatch/max_slope/median")]
    assert steps == tokens  # each step once, in order: resumed curves never double back
    return store


@pytest.mark.slow
def test_lightning_resume_after_kills(tmp_path: Path, text_tokenizer) -> None:
    """Killed mid-write and after a checkpoint, then resumed from last.ckpt: each snapshot once."""
    out = prepare(tmp_path, text_tokenizer)
    for kill in KILLS:
        launch("lightning", out, kill)
    launch("lightning", out, None)
    check_run(out)


@pytest.mark.slow
def test_hf_resume_after_kills_equals_an_uninterrupted_run(tmp_path: Path, text_tokenizer) -> None:
    """The HF Trainer resumes data order and RNG exactly: the snapshots equal an unbroken run's."""
    out = prepare(tmp_path / "killed", text_tokenizer)
    for kill in KILLS:
        launch("hf", out, kill)
    launch("hf", out, None)
    killed = check_run(out)
    clean_out = prepare(tmp_path / "clean", text_tokenizer)
    launch("hf", clean_out, None)
    clean = check_run(clean_out)
    for a, b in zip(killed.records(), clean.records(), strict=True):
        assert (a["step"], a["tokens"], a["weights_fingerprint"]) == (
            b["step"],
            b["tokens"],
            b["weights_fingerprint"],
        )
        assert a["max_slope/median"] == b["max_slope/median"]
