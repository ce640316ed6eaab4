"""A real OLMo-core training run on the CPU: an `olmo2_1M`-sized Transformer on the built-in corpus.

OLMo-core's own pieces throughout: `TransformerConfig.olmo2_1M` (2 blocks here), a numpy token
file read by `NumpyFSLDatasetConfig`, `TransformerTrainModuleConfig` with AdamW, and
`TrainerConfig` with its checkpointer, saving `step{N}` folders in torch.distributed.checkpoint
form. A run of a few steps takes seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from regionwatch.corpus import token_stream
from tests.support.stacks import require

SEQ = 32  # tokens per training sequence
BATCH = 4  # sequences per step (one rank, one micro-batch)
TOKENS_PER_STEP = SEQ * BATCH  # OLMo-core's global batch size is counted in tokens
LAYERS = 2
CORPUS_TOKENS = 64 * TOKENS_PER_STEP  # enough for 64 steps in the first epoch


def token_file(tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    """The built-in corpus as OLMo-core's numpy token file (uint16 ids, no header)."""
    path = folder / "tokens.npy"
    if not path.exists():
        ids = token_stream(tokenizer, max_tokens=CORPUS_TOKENS).ids.astype(np.uint16)
        folder.mkdir(parents=True, exist_ok=True)
        ids.tofile(path)
    return path


def olmo_config(vocab: int) -> Any:
    """An `olmo2_1M`-sized TransformerConfig: 2 blocks, width 12."""
    transformer = require("olmo_core.nn.transformer")
    return transformer.TransformerConfig.olmo2_1M(vocab_size=vocab, n_layers=LAYERS)


def olmo_model(vocab: int, *, seed: int = 0) -> Any:
    """A seeded `olmo_config` Transformer, the global RNG restored."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return olmo_config(vocab).build(init_device="cpu")


def olmo_trainer(
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    *,
    steps: int,
    callbacks: dict[str, Any],
    save_interval: int = 3,
    seed: int = 0,
) -> Any:
    """An OLMo-core `Trainer` on the CPU that saves to `folder/save` every `save_interval` steps.

    Each checkpoint holds the `config.json` of OLMo-core's `ConfigSaverCallback`, with the model's
    config under "model", as OLMo-core's training scripts record it. Built afresh from the same
    seed, it starts from the same weights; if `folder/save` holds checkpoints, `fit` resumes from
    the newest (OLMo-core's default load strategy).
    """
    data = require("olmo_core.data")
    train = require("olmo_core.train")
    callbacks_module = require("olmo_core.train.callbacks")
    optim = require("olmo_core.optim")
    train_module = require("olmo_core.train.train_module")
    vocab = len(tokenizer)
    tokens = data.TokenizerConfig(
        vocab_size=vocab, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id
    )
    work = folder / "work"
    dataset = data.NumpyFSLDatasetConfig(
        tokenizer=tokens,
        paths=[str(token_file(tokenizer, folder))],
        sequence_length=SEQ,
        work_dir=str(work),
    ).build()
    loader = data.NumpyDataLoaderConfig(
        global_batch_size=TOKENS_PER_STEP, seed=seed, num_workers=0, work_dir=str(work)
    ).build(dataset)
    module = train_module.TransformerTrainModuleConfig(
        rank_microbatch_size=TOKENS_PER_STEP,
        max_sequence_length=SEQ,
        optim=optim.AdamWConfig(lr=1e-2),
    ).build(olmo_model(vocab, seed=seed), device=torch.device("cpu"))
    checkpointer = callbacks_module.CheckpointerCallback(
        save_interval=save_interval, ephemeral_save_interval=None
    )
    trainer = train.TrainerConfig(
        save_folder=str(folder / "save"),
        work_dir=str(work),
        max_duration=train.Duration.steps(steps),
        device="cpu",
        metrics_collect_interval=1,
        callbacks={
            "checkpointer": checkpointer,
            "config_saver": callbacks_module.ConfigSaverCallback(),
            **callbacks,
        },
    ).build(module, loader)
    trainer.callbacks["config_saver"].config = {"model": olmo_config(vocab).as_config_dict()}
    return trainer
