"""DDP with 2 CPU processes (gloo): sharded probes, gathered on rank 0, equal a 1-process run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regionwatch import SnapshotStore, measure
from tests.support.lm import BATCH, small_probes, tiny_gpt2
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.mark.slow
def test_ddp_snapshots_equal_one_process_measurements(tmp_path: Path, text_tokenizer) -> None:
    """Two ranks each measure half the pairs; the merged snapshot equals measuring in one process,
    and tokens seen are summed over both ranks' (padded) batches."""
    text_tokenizer.save_pretrained(tmp_path / "tokenizer")
    small_probes(text_tokenizer).save(tmp_path / "probes")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_train.py"), str(tmp_path), str(STEPS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    store = SnapshotStore(tmp_path / "run")
    assert store.steps() == [0, 2, 4]
    local = {
        int(w[1]): int(w[2])
        for w in (line.split() for line in done.stdout.splitlines())
        if w[:1] == ["LOCAL"]
    }
    assert set(local) == {0, 1}
    assert store.records()[-1]["tokens"] == local[0] + local[1]
    assert local[0] + local[1] < 2 * STEPS * BATCH * 16  # padding left out
    final = store.read(STEPS)
    assert (final.info["world_size"], final.info["layout"]) == (2, "local")
    model = tiny_gpt2(VOCAB)
    model.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True))
    single = measure(model.eval(), store.probes(), store.config)
    for part, curves in single.curves.items():
        sharded = final.measurement.curves[part]
        torch.testing.assert_close(sharded.distance, curves.distance, atol=1e-5, rtol=1e-5)
        assert torch.equal(sharded.top_a, curves.top_a), part
    torch.testing.assert_close(final.measurement.maps.rgb, single.maps.rgb, atol=1e-5, rtol=0)
    for key, value in single.summary.items():
        assert final.summary[key] == pytest.approx(value, rel=1e-4, nan_ok=True), key
