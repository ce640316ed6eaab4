"""What a model config implies in memory, checked before a single weight is allocated.

A config.json is only text: `n_embd=1048576, n_layer=4096` asks for tens of terabytes, and a
loader that trusts it dies mid-allocation in a traceback (or swaps the machine to a halt).
`check_model_memory` is the one refusal every loader path calls first (save_pretrained folders,
state dicts, `--init-from`, replay, the demo's own config): the parameter count the config
implies, the memory that count needs, the memory available, in one message.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from regionwatch.errors import ConfigError

logger = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")
GATED_MLP = frozenset({"llama", "qwen2", "mistral", "olmo", "olmo2", "gemma", "gemma2", "phi3"})
LEARNED_POSITIONS = frozenset({"gpt2"})  # absolute position embeddings [positions, d_model]
MLP_RATIO = 4  # GPT-2's d_ff when `n_inner` is None (and the usual default elsewhere)
GIB = 2**30


def implied_parameters(config: PretrainedConfig) -> int:
    """The parameter count a model config implies, without building the model.

    From the sizes every causal LM config exposes (transformers maps GPT-2's `n_embd`, `n_layer`
    to `hidden_size`, `num_hidden_layers`): embeddings V·d (and learned positions for GPT-2),
    per block the attention's q and o (d·d each) and k and v (d·d_kv each, grouped-query heads
    counted), the MLP (3·d·d_ff gated, 2·d·d_ff otherwise), and the unembedding V·d unless tied.
    Norms and biases (a few d per block) are left out, so this is a slight under-count for the
    architectures of `access.BLOCK_PATHS`, never an over-count. A config without these sizes is
    instantiated on the meta device (no memory) and its parameters counted.

    Args:
        config: a transformers model config.

    Returns:
        The parameter count (tied weights once).
    """
    sizes = [getattr(config, name, None) for name in ("hidden_size", "num_hidden_layers")]
    vocab = getattr(config, "vocab_size", None)
    if not all(isinstance(v, int) and v > 0 for v in (*sizes, vocab)):
        return _meta_count(config)
    d, layers = sizes
    heads = getattr(config, "num_attention_heads", None) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    d_ff = (
        getattr(config, "intermediate_size", None)
        or getattr(config, "n_inner", None)
        or MLP_RATIO * d
    )
    mlp = (3 if config.model_type in GATED_MLP else 2) * d * d_ff
    attention = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim
    embeddings = vocab * d * (1 if getattr(config, "tie_word_embeddings", True) else 2)
    if config.model_type in LEARNED_POSITIONS:
        embeddings += (getattr(config, "max_position_embeddings", None) or 0) * d
    return embeddings + layers * (attention + mlp)


def available_bytes(device: str | torch.device) -> int | None:
    """Memory free for a new model on `device`: MemAvailable on CPUs, free memory on CUDA.

    None where it cannot be known (another platform, another accelerator): then nothing is
    refused.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    if device.type != "cpu":
        return None
    if MEMINFO.is_file():
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_model_memory(
    config: PretrainedConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    where: str,
) -> int:
    """Refuse a config whose weights cannot fit, before any allocation; else its parameter count.

    The weights are built on the CPU first (every loader does), then moved to `device`, so both
    must hold them.

    Args:
        config: the model config about to be instantiated.
        dtype: the dtype the weights will be held in.
        device: the device they will be measured on.
        where: names the config in the message (a path, "--init-from DIR", "the demo config").

    Returns:
        `implied_parameters(config)`.

    Raises:
        ConfigError: the weights alone need more memory than is available; the message gives
            the count, the config's sizes, the bytes needed and the bytes available.
    """
    params = implied_parameters(config)
    needed = params * dtype.itemsize
    for place in dict.fromkeys(["cpu", str(torch.device(device))]):
        free = available_bytes(place)
        if free is not None and needed > free:
            raise ConfigError(
                f"{where}: its config implies {params:,} parameters ({_sizes(config)}), whose "
                f"weights alone need {needed / GIB:,.1f} GiB in {str(dtype).removeprefix('torch.')}"
                f"; {place} has {free / GIB:,.1f} GiB available. Check the config's sizes (a "
                "damaged or hand-edited config.json?), or measure on a machine with more memory"
            )
    return params


def _sizes(config: PretrainedConfig) -> str:
    names = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")
    given = [f"{name}={getattr(config, name)}" for name in names if getattr(config, name, None)]
    return f"{config.model_type}: " + ", ".join(given)


def _meta_count(config: PretrainedConfig) -> int:
    """Parameters of the model built on the meta device: shapes only, no memory."""
    logger.debug("counting the parameters of a %s config on the meta device", config.model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return sum(p.numel() for p in model.parameters())
