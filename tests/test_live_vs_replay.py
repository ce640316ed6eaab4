"""Live == replay: the numbers logged for a step equal `measure` on that step's saved weights.

Bitwise, so the saved weights are measured on the device the run trained on: the same kernels.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, Trainer

from regionwatch import (
    Snapshot,
    SnapshotStore,
    measure,
)
from regionwatch.decoder import Decoder
from regionwatch.snapshot import weights_fingerprint
from tests.support.factories import make_monitor
from tests.support.lm import TinyLM, Windows, hf_args, loader, tiny_gpt2, trainer
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB


def assert_same_numbers(
    live: Snapshot, model: torch.nn.Module, store: SnapshotStore, *, decoder: Decoder | None = None
) -> None:
    """Bitwise equal curves, maps and headline scalars, and the same weights."""
    replayed = measure(model, store.probes(), store.config, decoder=decoder)
    assert weights_fingerprint(model) == live.weights_fingerprint
    for part, curves in live.measurement.curves.items():
        again = replayed.curves[part]
        assert torch.equal(again.distance, curves.distance), part
        assert torch.equal(again.top_a, curves.top_a), part
    if live.measurement.maps is not None:  # the live maps schedule skips some snapshots
        assert torch.equal(replayed.maps.distance, live.measurement.maps.distance)
    for key, value in live.summary.items():
        assert replayed.summary[key] == pytest.approx(value, rel=0, abs=0, nan_ok=True), key


def test_lightning_live_numbers_equal_measuring_the_checkpoints(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """Each .ckpt saved at a snapshot step reproduces that snapshot exactly (fp32)."""
    monitor = make_monitor("lightning", lm_probes, tmp_path / "run", every=3)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    fit = trainer(tmp_path, [monitor, saver], max_steps=6, enable_checkpointing=True, device=device)
    fit.fit(TinyLM(VOCAB), loader(lm_data))
    store = SnapshotStore(tmp_path / "run")
    checkpoints = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert [c.name for c in checkpoints] == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt"]
    for path, step in zip(checkpoints, (3, 6), strict=True):
        module = TinyLM(VOCAB)
        module.load_state_dict(
            torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        )
        assert_same_numbers(store.read(step), module.lm.to(device), store)


def test_hf_live_numbers_equal_measuring_the_checkpoints(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """Each checkpoint-N dir saved at a snapshot step reproduces that snapshot exactly."""
    monitor = make_monitor("hf", lm_probes, tmp_path / "run")
    run_args = hf_args(tmp_path, device=device, max_steps=4, save_strategy="steps", save_steps=2)
    Trainer(tiny_gpt2(VOCAB), run_args, train_dataset=lm_data, callbacks=[monitor]).train()
    store = SnapshotStore(tmp_path / "run")
    for step in (2, 4):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / f"checkpoint-{step}")
        assert_same_numbers(store.read(step), model.to(device).eval(), store)
