"""The example scripts run as users run them (subprocesses, a few steps): they must not rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from regionwatch import SnapshotStore

ROOT = Path(__file__).resolve().parents[1]


def run_example(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_lightning.py", "train_hf.py"])
def test_training_examples_store_snapshots(tmp_path: Path, script: str) -> None:
    """Each framework's example trains, measures at step 0 and the end, and says where."""
    out = tmp_path / "run"
    printed = run_example(f"examples/{script}", "--out", str(out), "--steps", "3")
    steps = [r["step"] for r in SnapshotStore(out / "regionwatch").records()]
    assert (steps[0], steps[-1]) == (0, 3)  # every 25 steps (Lightning) / log-spaced (HF default)
    assert "tensorboard --logdir" in printed


@pytest.mark.slow
def test_emergence_example_writes_its_findings(tmp_path: Path) -> None:
    """The emergence script trains, re-measures at S = 30, reports, and writes every finding."""
    toy = yaml.safe_load((ROOT / "configs" / "emergence-2l-128.yaml").read_text())
    toy |= {
        "width": 32,
        "heads": 2,
        "vocab_size": 512,
        "seq_len": 64,
        "batch_size": 8,
        "probe": {"grid": 7},
    }
    config = tmp_path / "emergence-toy.yaml"
    config.write_text(yaml.safe_dump(toy))
    run_example(
        "examples/emergence.py",
        "--out",
        str(tmp_path / "out"),
        "--configs",
        str(config),
        "--steps",
        "4",
    )
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    run = findings["runs"]["toy"]
    assert run["tokens"][0] == 0
    assert run["tokens"][-1] == 4 * 8 * 64
    assert 1.0 <= run["init"]["median"] < 2.0
    assert set(run["s30"]) == {"init", "final"}
    assert (tmp_path / "out" / "report" / "index.html").is_file()
