"""A probe never kills training: failures are logged with tracebacks, recorded, and skipped."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Trainer

from regionwatch import SnapshotStore
from tests.support.factories import make_monitor
from tests.support.lm import TinyLM, Windows, hf_args, loader, tiny_gpt2, trainer
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB


def break_probes(
    model: torch.nn.Module, error: Exception, *, times: int | None = None
) -> list[int]:
    """Make the model's second block raise `error` in eval mode (i.e. inside a probe) only."""
    raised: list[int] = []

    def hook(module: torch.nn.Module, *_: object) -> None:
        if not module.training and (times is None or len(raised) < times):
            raised.append(1)
            raise error

    model.transformer.h[1].register_forward_hook(hook)
    return raised


def test_failing_probe_is_recorded_and_training_goes_on(
    tmp_path: Path, lm_probes, lm_data: Windows, caplog: pytest.LogCaptureFixture, device: str
) -> None:
    """Every scheduled probe fails; every step still trains; failures are stored and logged."""
    module = TinyLM(VOCAB)
    break_probes(module.lm, RuntimeError("probe exploded"))
    callback = make_monitor("lightning", lm_probes, tmp_path / "run")
    fit = trainer(tmp_path, [callback], max_steps=5, device=device)
    with caplog.at_level(logging.ERROR, logger="regionwatch"):
        fit.fit(module, loader(lm_data))
    assert fit.global_step == 5
    store = SnapshotStore(tmp_path / "run")
    assert store.steps() == []
    assert [f["step"] for f in store.failures()] == [0, 2, 4, 5]
    failures = [r for r in caplog.records if "failed; training continues" in r.getMessage()]
    assert len(failures) == 4
    assert all(r.exc_info and "probe exploded" in str(r.exc_info[1]) for r in failures)
    assert callback.monitor.failures == 4


def test_out_of_memory_retries_with_half_the_budget(
    tmp_path: Path, lm_probes, lm_data: Windows, caplog: pytest.LogCaptureFixture, device: str
) -> None:
    """An OOM inside the probe is retried once with half the memory budget, then succeeds."""
    module = TinyLM(VOCAB)
    raised = break_probes(module.lm, torch.cuda.OutOfMemoryError("CUDA out of memory"), times=1)
    callback = make_monitor("lightning", lm_probes, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="regionwatch"):
        trainer(tmp_path, [callback], max_steps=2, device=device).fit(module, loader(lm_data))
    assert len(raised) == 1
    assert SnapshotStore(tmp_path / "run").steps() == [0, 2]
    assert any("retrying with max_batch_tokens=8192" in r.getMessage() for r in caplog.records)


def test_out_of_memory_twice_gives_up_on_that_snapshot_only(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """Two OOMs in a row skip the snapshot; the next scheduled one is taken."""
    module = TinyLM(VOCAB)
    break_probes(module.lm, torch.cuda.OutOfMemoryError("CUDA out of memory"), times=2)
    callback = make_monitor("lightning", lm_probes, tmp_path / "run")
    trainer(tmp_path, [callback], max_steps=2, device=device).fit(module, loader(lm_data))
    store = SnapshotStore(tmp_path / "run")
    assert store.steps() == [2]
    assert [f["step"] for f in store.failures()] == [0]


def test_hf_failing_probe_does_not_stop_the_trainer(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """Under transformers.Trainer a failing probe is recorded and every step still runs."""
    model = tiny_gpt2(VOCAB)
    break_probes(model, ValueError("bad probe"))
    callback = make_monitor("hf", lm_probes, tmp_path / "run")
    args = hf_args(tmp_path, max_steps=4, device=device)
    run = Trainer(model, args, train_dataset=lm_data, callbacks=[callback])
    run.train()
    assert run.state.global_step == 4
    assert [f["step"] for f in SnapshotStore(tmp_path / "run").failures()] == [0, 2, 4]


class DivergingLM(TinyLM):
    """A TinyLM whose weights go NaN at `poison_step`, as a diverged run's do."""

    def __init__(self, vocab: int, *, poison_step: int) -> None:
        super().__init__(vocab)
        self.poison_step = poison_step

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.trainer.global_step == self.poison_step:
            with torch.no_grad():
                self.lm.transformer.h[1].mlp.c_fc.weight[0, 0] = torch.nan
        return super().training_step(batch, batch_idx)


def test_a_diverged_model_is_a_failed_snapshot_and_training_goes_on(
    tmp_path: Path, lm_probes, lm_data: Windows, caplog: pytest.LogCaptureFixture, device: str
) -> None:
    """NaN weights from step 3 on: steps 4 and 6 are failures naming the cause, never snapshots."""
    callback = make_monitor("lightning", lm_probes, tmp_path / "run")
    fit = trainer(tmp_path, [callback], max_steps=6, device=device)
    with caplog.at_level(logging.ERROR, logger="regionwatch"):
        fit.fit(DivergingLM(VOCAB, poison_step=3), loader(lm_data))
    assert fit.global_step == 6  # training went on
    store = SnapshotStore(tmp_path / "run")
    assert store.steps() == [0, 2]
    failures = store.failures()
    assert [f["step"] for f in failures] == [4, 6]
    for failure in failures:
        assert failure["error"].startswith("non-finite model: the outputs are NaN or inf at ")
        assert "parameters hold NaN or inf (first: transformer." in failure["error"]
    assert callback.monitor.failures == 2
    assert "measurement at step 4 failed: non-finite model" in caplog.text
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [e.step for e in events.Scalars("regionwatch/max_slope/median")]
    assert logged == [r["tokens"] for r in store.records()]  # nothing logged for steps 4 and 6
