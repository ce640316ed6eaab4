"""The HF Trainer distributed: DDP on 2 CPU processes under torchrun; FSDP on GPUs only.

HF FSDP cannot run on the CPU: with `fsdp=` set and `use_cpu=True` the Trainer falls back to DDP
without a word, so its test is `gpu`-marked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regionwatch import SnapshotStore, measure
from tests.support.lm import assert_same_numbers, small_probes, tiny_gpt2
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def run_hf(tmp: Path, tokenizer, layout: str, *flags: str) -> SnapshotStore:
    """Train under torchrun on 2 processes; return the run's store after checking the last
    snapshot equals measuring the final weights in one process."""
    tokenizer.save_pretrained(tmp / "tokenizer")
    small_probes(tokenizer).save(tmp / "probes")
    done = subprocess.run(
        [
            sys.executable,
            *("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
            *("-m", "tests.hf_ddp_train", str(tmp), str(STEPS), *flags),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    store = SnapshotStore(tmp / "run")
    assert store.steps() == [0, 2, 4]
    assert store.failures() == []
    final = store.read(STEPS)
    assert (final.info["world_size"], final.info["layout"]) == (2, layout)
    tokens = [int(w[1]) for w in map(str.split, done.stdout.splitlines()) if w[:1] == ["TOKENS"]]
    assert final.tokens == tokens[0]
    model = tiny_gpt2(VOCAB)
    model.load_state_dict(torch.load(tmp / "final.pt", weights_only=True))
    assert_same_numbers(final.measurement, measure(model.eval(), store.probes(), store.config))
    return store


@pytest.mark.slow
def test_hf_trainer_ddp_equals_one_process(tmp_path: Path, text_tokenizer) -> None:
    """Two ranks each measure their shard; the merged snapshot equals one process's."""
    run_hf(tmp_path, text_tokenizer, "local")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP over 2 ranks needs 2 GPUs")
@pytest.mark.parametrize("layout", ["fsdp1", "fsdp2"])
def test_hf_trainer_fsdp_equals_one_process(tmp_path: Path, text_tokenizer, layout: str) -> None:
    """`fsdp="full_shard"` (accelerate), FSDP version 1 (blocks auto-wrapped) or 2: measured in
    place, lock-step; FSDP1 through its root, which the callback reaches through `attach`."""
    run_hf(tmp_path, text_tokenizer, layout, f"--{layout}")
