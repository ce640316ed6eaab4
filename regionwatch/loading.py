"""Paths into models and tokenizers: `save_pretrained` directories, configs, the built-in BPE.

Everything loads from local files (or a local Hugging Face cache): regionwatch never needs the
network to measure a model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from regionwatch.corpus import DEFAULT_VOCAB_SIZE, builtin_text, train_tokenizer
from regionwatch.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

BUILTIN_TOKENIZER = "builtin"  # --tokenizer value: byte-level BPE trained on the built-in corpus
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    """A dtype from its name (`float32`, `bfloat16`, ...); ConfigError listing the choices."""
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    revision: str | None = None,
) -> PreTrainedModel:
    """Load a causal LM from a `save_pretrained` directory (or a hub id found in the local cache).

    Raises:
        CheckpointError: nothing loadable there, with the loader's reason.
    """
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), revision=revision)
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot load a causal LM from {path}: {err}") from err
    return model.to(device=device, dtype=dtype).eval()


def init_model(
    config_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> PreTrainedModel:
    """A freshly initialised model from a `config.json`: the paper's "random init" baseline.

    The weights come from transformers' own init under a private seed; the caller's global RNG is
    saved and restored, so measuring never reseeds anyone's run.

    Raises:
        CheckpointError: no readable config there.
    """
    try:
        config = AutoConfig.from_pretrained(str(config_dir))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read a model config from {config_dir}: {err}") from err
    with torch.random.fork_rng(devices=[]):
        torch.random.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer from a directory, or `builtin`: BPE trained on the built-in corpus (~1 s).

    Raises:
        CheckpointError: no tokenizer files there.
    """
    if str(path) == BUILTIN_TOKENIZER:
        logger.info("training the built-in BPE tokenizer (vocab %d)", DEFAULT_VOCAB_SIZE)
        return train_tokenizer([builtin_text()], vocab_size=DEFAULT_VOCAB_SIZE)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"no tokenizer in {path}: {err}; "
            f"pass --tokenizer DIR (or --tokenizer {BUILTIN_TOKENIZER})"
        ) from err
