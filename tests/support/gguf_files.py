"""GGUF files for the tests: tiny Llama models written with the gguf package's own writer, the
bundled SmolLM2 file (loaded once per session), and the rule for when it is absent.

The tiny files are what llama.cpp's converter writes for a Llama: its tensor names, its Q/K row
permutation, float32 tensors, and the byte-level BPE tokenizer in the header; so loading one back
through regionwatch must give the model it was written from, weight for weight.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from regionwatch.errors import CheckpointError
from regionwatch.gguf_file import INSTALL_GGUF, INSTALL_SMOLLM2, smollm2_path
from regionwatch.loading import load_smollm2
from tests.conftest import tiny_model

# llama.cpp's tensor names for a Llama block, from the HF names (convert_hf_to_gguf.py).
BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp's token types


def _permute(weight: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (rotary halves interleaved); transformers undoes it on load."""
    rows = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return rows.swapaxes(1, 2).reshape(weight.shape).numpy()


def write_llama_gguf(
    path: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    architecture: str = "llama",
    block_count: int | None = None,
) -> Path:
    """Write a HF Llama as llama.cpp would (float32 tensors), with `tokenizer` in the header.

    `architecture` and `block_count` may lie about the tensors, to make bad files.
    """
    import gguf

    config = model.config
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_block_count(config.num_hidden_layers if block_count is None else block_count)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    for block in range(config.num_hidden_layers):
        for hf, name in BLOCK_TENSORS.items():
            weight = state[f"model.layers.{block}.{hf}.weight"]
            if name == "attn_q":
                weight = _permute(weight, config.num_attention_heads)
            elif name == "attn_k":
                weight = _permute(weight, config.num_key_value_heads)
            writer.add_tensor(f"blk.{block}.{name}.weight", np.asarray(weight))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    if not config.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer: object, tokenizer: PreTrainedTokenizerBase) -> None:
    """A byte-level BPE tokenizer as llama.cpp stores it: tokens, merges, types, special ids."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([TOKEN_CONTROL if t in special else TOKEN_NORMAL for t in tokens])
    writer.add_token_merges(merges)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
        writer.add_bos_token_id(tokenizer.eos_token_id)


def tiny_llama_gguf(
    path: Path, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, **lies: object
) -> tuple[Path, PreTrainedModel]:
    """A 2-block Llama of `tokenizer`'s vocabulary, seeded, written to `path`; and the model."""
    model = tiny_model("llama", layers=2, seed=seed, vocab_size=len(tokenizer))
    return write_llama_gguf(path, model, tokenizer, **lies), model


def require_gguf() -> None:
    """Skip a test that writes GGUF files where the gguf package is absent (fail under CI)."""
    if importlib.util.find_spec("gguf") is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the gguf package: {INSTALL_GGUF}")
        pytest.skip(f"needs the gguf package: {INSTALL_GGUF}")


def require_smollm2() -> Path:
    """The bundled SmolLM2 file; absent, the test skips with the install line (fails under CI).

    CI installs the package (.ci/run), so there a missing file is a broken setup, never a skip.
    """
    try:
        return smollm2_path()
    except CheckpointError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the real model: {err}")
        pytest.skip(f"{err} ({'; '.join(INSTALL_SMOLLM2)})")


@pytest.fixture(scope="session")
def smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M dequantized to float32, and its tokenizer: loaded once per session."""
    require_smollm2()
    return load_smollm2()
