"""Zero observer effect: training with the monitor ends bitwise equal to training without it.

On CUDA too: two runs of the same computation on one GPU repeat bitwise, so any difference is
the probe's (a draw from the training's CUDA generator, a mode or grad flag left changed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer

from regionwatch import SnapshotStore
from tests.support.factories import make_monitor
from tests.support.lm import TinyLM, Windows, hf_args, loader, tiny_gpt2, trainer
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            assert_same_tensors(value, b[key])
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def lightning_run(tmp: Path, lm_data: Windows, callbacks: list, device: str) -> tuple[dict, dict]:
    module = TinyLM(VOCAB)  # GPT-2 has dropout: any RNG the probe drew would change the weights
    fit = trainer(tmp, callbacks, max_steps=7, device=device)
    fit.fit(module, loader(lm_data))
    return module.state_dict(), fit.optimizers[0].state_dict()


def test_lightning_run_is_bitwise_unchanged(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """Weights and optimizer state after 7 steps are identical with and without RegionMonitor."""
    torch.random.manual_seed(123)  # the CPU's generator and CUDA's: dropout draws from the device's
    plain = lightning_run(tmp_path / "plain", lm_data, [], device)
    torch.random.manual_seed(123)
    callback = make_monitor("lightning", lm_probes, tmp_path / "run")
    watched = lightning_run(tmp_path / "watched", lm_data, [callback], device)
    assert SnapshotStore(tmp_path / "run").steps() == [0, 2, 4, 6, 7]  # it really measured
    assert_same_tensors(plain[0], watched[0])
    assert_same_tensors(plain[1], watched[1])


def hf_run(tmp: Path, lm_data: Windows, callbacks: list, device: str) -> tuple[dict, dict]:
    args = hf_args(tmp, max_steps=5, device=device)  # the Trainer seeds every generator itself
    trainer_ = Trainer(tiny_gpt2(VOCAB), args, train_dataset=lm_data, callbacks=callbacks)
    trainer_.train()
    return trainer_.model.state_dict(), trainer_.optimizer.state_dict()


def test_hf_run_is_bitwise_unchanged(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """Weights and optimizer state after 5 Trainer steps equal a run without the callback."""
    plain = hf_run(tmp_path / "plain", lm_data, [], device)
    callback = make_monitor("hf", lm_probes, tmp_path / "run")
    watched = hf_run(tmp_path / "watched", lm_data, [callback], device)
    assert SnapshotStore(tmp_path / "run").steps() == [0, 2, 4, 5]
    assert_same_tensors(plain[0], watched[0])
    assert_same_tensors(plain[1], watched[1])
