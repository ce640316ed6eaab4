"""Tiny language-model training setups for the driver tests (Lightning and the HF Trainer).

A 2-layer width-32 GPT-2 trained on windows of the built-in corpus, tokenized with the locally
trained BPE tokenizer; batches can carry padding so that token counting is tested on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase, TrainingArguments

from regionwatch.corpus import token_stream
from regionwatch.measurement import ProbeConfig
from regionwatch.probes import ProbeSet

SEQ = 16  # training sequence length
BATCH = 4
SMALL_PROBE = ProbeConfig(num_alphas=5, grid=5)  # fast, but every part runs


def tiny_gpt2(
    vocab: int, *, seed: int = 0, positions: int = 64, layers: int = 2
) -> GPT2LMHeadModel:
    """A seeded random GPT-2, built on the CPU (the global RNG is restored)."""
    config = GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=layers, n_head=4
    )
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: `torch.random.manual_seed` would reseed CUDA's as well, which
        # fork_rng(devices=[]) does not restore, and the init draws from the CPU one alone.
        torch.default_generator.manual_seed(seed)
        return GPT2LMHeadModel(config)


def small_probes(tokenizer: PreTrainedTokenizerBase) -> ProbeSet:
    """A small probe set of the built-in corpus: 13 prompts, 4 + 4 pairs, 2 triples."""
    return ProbeSet.build(
        tokenizer, n_prompts=13, n_similar=4, n_dissimilar=4, n_triples=2, max_tokens=60_000
    )


class Windows(Dataset):
    """Consecutive SEQ-token windows of the built-in corpus; every third one padded at the end."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, count: int = 64, *, pad: bool = True
    ) -> None:
        ids = torch.from_numpy(
            token_stream(tokenizer, max_tokens=SEQ * count + SEQ).ids.astype("int64")
        )
        self.ids = ids[: SEQ * count].reshape(count, SEQ)
        self.mask = torch.ones_like(self.ids)
        if pad:
            self.mask[::3, -5:] = 0  # 5 padding tokens in every third window
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.where(self.mask[i].bool(), self.ids[i], self.pad_id)
        labels = torch.where(self.mask[i].bool(), self.ids[i], -100)
        return {"input_ids": ids, "attention_mask": self.mask[i], "labels": labels}

    def non_padding(self, indices: range) -> int:
        return int(self.mask[list(indices)].sum())


class TinyLM(L.LightningModule):
    """A LightningModule holding a GPT-2 as `self.lm` (found by the callback automatically)."""

    def __init__(self, vocab: int, *, lr: float = 3e-3, seed: int = 0, positions: int = 64) -> None:
        super().__init__()
        self.lm = tiny_gpt2(vocab, seed=seed, positions=positions)
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.lm(**batch).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def loader(data: Windows) -> DataLoader:
    """Fixed order (no shuffling): runs with and without the callback see the same batches."""
    return DataLoader(data, batch_size=BATCH, shuffle=False)


def trainer(tmp: Any, callbacks: list, *, device: str = "cpu", **kwargs: Any) -> L.Trainer:
    """A quiet, deterministic Lightning trainer on `device` ("cpu" or "cuda") writing under `tmp`.

    `deterministic=True` makes CUDA runs repeatable too (conftest sets the cuBLAS workspace it
    needs); `kwargs` override any default.
    """
    defaults = {
        "accelerator": device,
        "devices": 1,
        "max_steps": 8,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(tmp),
        "deterministic": True,
    }
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def hf_args(tmp: Path, *, device: str = "cpu", **overrides) -> TrainingArguments:
    """Quiet training arguments on `device` ("cpu" or "cuda") that count non-padding tokens.

    The Trainer takes its device from `use_cpu`: off, it trains on `cuda:0`, and on every visible
    GPU at once (nn.DataParallel, a bigger batch per step) where there are several: the `cuda`
    cases expect one (CUDA_VISIBLE_DEVICES=0 on a multi-GPU machine).
    """
    values = {
        "output_dir": str(tmp / "out"),
        "per_device_train_batch_size": BATCH,
        "max_steps": 6,
        "learning_rate": 3e-3,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "use_cpu": device == "cpu",
        "disable_tqdm": True,
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_drop_last": True,
        "seed": 0,
    }
    return TrainingArguments(**{**values, **overrides})


def assert_same_numbers(got: Any, want: Any) -> None:
    """Two measurements agree: relative curves within 1e-5 where they are not round-off (at
    alpha = 0, d(0) is round-off of a differently batched pass; the distances there agree within
    1e-5 absolute), the same top tokens, region maps within 1e-5."""
    for part, curves in want.curves.items():
        torch.testing.assert_close(
            got.curves[part].relative[:, 1:], curves.relative[:, 1:], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(got.curves[part].distance, curves.distance, atol=1e-5, rtol=1e-5)
        assert torch.equal(got.curves[part].top_a, curves.top_a), part
    torch.testing.assert_close(got.maps.rgb, want.maps.rgb, atol=1e-5, rtol=0)
