"""The OLMo-core callback on a real OLMo-core `Trainer` run on the CPU (`olmo2_1M`-sized)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from regionwatch.errors import ConfigError
from regionwatch.store import SnapshotStore
from tests.support.factories import make_watch
from tests.support.olmo import TOKENS_PER_STEP, olmo_trainer
from tests.support.stacks import require
from tests.test_live_vs_replay import assert_same_numbers

pytestmark = pytest.mark.slow  # each test trains a real OLMo-core model for a few steps


def monitor(probes, run_dir: Path, every: int = 2):
    """The callback under test: every `every` steps, the small probe."""
    olmo = require("regionwatch.olmo_core")
    watch = make_watch(every, maps_schedule=None)
    return olmo.RegionMonitorCallback(watch, probes=probes, run_dir=run_dir)


class Crash(require("olmo_core.train.callbacks").Callback):
    """Kills training after step `at`, as a preempted job dies (after the monitor's post_step)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def post_step(self) -> None:
        if self.trainer.global_step == self.at:
            raise RuntimeError(f"killed at step {self.at}")


def rank0_state(checkpoint: Path) -> dict:
    """The trainer state OLMo-core saved in a step folder (numpy RNG arrays allowed, no code)."""
    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    with torch.serialization.safe_globals(allowed):
        return torch.load(checkpoint / "train" / "rank0.pt", weights_only=True)


def test_olmo_core_snapshots_at_global_step_and_tokens(
    tmp_path: Path, text_tokenizer, lm_probes
) -> None:
    """Snapshots at the trainer's global steps and tokens; the last equals measuring the weights."""
    callback = monitor(lm_probes, tmp_path / "run")
    trainer = olmo_trainer(text_tokenizer, tmp_path, steps=5, callbacks={"regionwatch": callback})
    trainer.fit()
    store = SnapshotStore(tmp_path / "run")
    records = store.records()
    assert [(r["step"], r["tokens"]) for r in records] == [
        (step, step * TOKENS_PER_STEP) for step in (0, 2, 4, 5)
    ]
    assert trainer.global_train_tokens_seen == 5 * TOKENS_PER_STEP
    model = trainer.train_module.model.eval()
    olmo = require("regionwatch.olmo_core")
    assert_same_numbers(store.read(5), model, store, decoder=olmo.OLMO_CORE_DECODER)
    state = rank0_state(tmp_path / "save" / "step3")  # the callback's state is in the checkpoint
    assert state["callbacks"]["regionwatch"]["run_id"] == store.run_id


def test_olmo_core_resumes_from_its_checkpoint_without_duplicates(
    tmp_path: Path, text_tokenizer, lm_probes
) -> None:
    """Killed at step 5, resumed from step 3: every scheduled step is stored exactly once."""
    first = olmo_trainer(
        text_tokenizer,
        tmp_path,
        steps=8,
        callbacks={"regionwatch": monitor(lm_probes, tmp_path / "run"), "crash": Crash(5)},
    )
    with pytest.raises(RuntimeError, match="killed at step 5"):
        first.fit()
    store = SnapshotStore(tmp_path / "run")
    assert store.steps() == [0, 2, 4]
    lost = store.read(4)  # measured after the newest checkpoint (step 3): cut back, then retaken
    again = olmo_trainer(
        text_tokenizer,
        tmp_path,
        steps=8,
        callbacks={"regionwatch": monitor(lm_probes, tmp_path / "run")},
    )
    again.fit()  # OLMo-core loads the newest checkpoint of its save folder: step 3
    store = SnapshotStore(tmp_path / "run")
    records = store.records()
    assert [(r["step"], r["tokens"]) for r in records] == [
        (step, step * TOKENS_PER_STEP) for step in (0, 2, 4, 6, 8)
    ]
    assert store.read(4).weights_fingerprint == lost.weights_fingerprint  # the same step 4


def test_olmo_core_fresh_run_into_a_held_run_dir_is_refused(
    tmp_path: Path, text_tokenizer, lm_probes
) -> None:
    """A new training run into another run's directory is refused before its first step."""
    olmo_trainer(
        text_tokenizer,
        tmp_path / "a",
        steps=2,
        callbacks={"regionwatch": monitor(lm_probes, tmp_path / "run")},
    ).fit()
    held = SnapshotStore(tmp_path / "run").records()
    other = olmo_trainer(
        text_tokenizer,
        tmp_path / "b",
        steps=2,
        seed=1,
        callbacks={"regionwatch": monitor(lm_probes, tmp_path / "run")},
    )
    with pytest.raises(ConfigError, match="already holds run"):
        other.fit()
    assert other.global_step == 0
    assert SnapshotStore(tmp_path / "run").records() == held
