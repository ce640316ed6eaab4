"""bench_probe's models: random-weight GPT-2 and Llama at a size, and their FLOP estimates."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

ARCHS = ("gpt2", "llama")
HEAD_DIM = 64  # GPT-2 small's head width; heads = d_model / 64 (at least 1)
GPT2_VOCAB = 50257
MAX_POSITIONS = 1024
GIGA = 1e9


@dataclass(frozen=True)
class Shape:
    """A decoder-only LM's size: what the FLOP estimates need."""

    arch: str
    layers: int
    d_model: int
    heads: int
    d_ff: int
    vocab: int

    @property
    def block_params(self) -> int:
        """Weights of one block's matmuls (attention 4 d^2; MLP 2 d d_ff, or 3 for gated)."""
        mlp = (3 if self.arch == "llama" else 2) * self.d_model * self.d_ff
        return 4 * self.d_model**2 + mlp

    def token_flops(self, context: float, layers: int | None = None) -> float:
        """FLOPs of one token through `layers` blocks, attending over `context` keys."""
        n = self.layers if layers is None else layers
        return n * (2 * self.block_params + 4 * context * self.d_model)

    @property
    def head_flops(self) -> float:
        """FLOPs of the unembedding at one position."""
        return 2 * self.d_model * self.vocab


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match:
        raise SystemExit(f"--sizes: {text!r} is not LAYERSxD_MODEL, e.g. 12x768")
    return int(match[1]), int(match[2])


def build_model(
    arch: str, layers: int, d_model: int, vocab: int, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, Shape]:
    """A seeded, randomly initialised causal LM of GPT-2 (absolute) or Llama (rotary) shape.

    Llama gets d_ff = 8 d / 3 (rounded to 32), so that its gated MLP has GPT-2's 8 d^2 weights;
    both use GPT-2's vocabulary size by default, so the two differ only in architecture.
    """
    torch.manual_seed(0)  # a benchmark process owns its RNG
    heads = max(1, d_model // HEAD_DIM)
    special = {"bos_token_id": vocab - 1, "eos_token_id": vocab - 1}
    if arch == "gpt2":
        d_ff = 4 * d_model
        config = GPT2Config(
            n_layer=layers,
            n_embd=d_model,
            n_head=heads,
            n_inner=d_ff,
            vocab_size=vocab,
            n_positions=MAX_POSITIONS,
            attn_implementation="sdpa",
            **special,
        )
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        d_ff = max(32, round(8 * d_model / 3 / 32) * 32)
        config = LlamaConfig(
            hidden_size=d_model,
            intermediate_size=d_ff,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            vocab_size=vocab,
            max_position_embeddings=MAX_POSITIONS,
            attn_implementation="sdpa",
            **special,
        )
        model = LlamaForCausalLM(config)
    else:
        raise SystemExit(f"--arch: unknown {arch!r}; choose from {', '.join(ARCHS)}")
    model = model.to(device=device, dtype=dtype).eval()
    return model, Shape(arch, layers, d_model, heads, d_ff, vocab)


def interpolate_flops(shape: Shape, prompts: int, length: int, points: int) -> float:
    """Useful FLOPs of the probe: the clean pass of every prompt (last-position logits) plus each
    point as one token through blocks 1..N-1 attending over its prefix (write_layer 0)."""
    clean = prompts * (length * shape.token_flops(length / 2) + shape.head_flops)
    queries = points * shape.token_flops(length, shape.layers - 1)
    return clean + queries


def floor_flops(shape: Shape, prompts: int, length: int, *, all_logits: bool) -> float:
    heads = prompts * (length if all_logits else 1) * shape.head_flops
    return prompts * length * shape.token_flops(length / 2) + heads


def reference_flops(shape: Shape, forwards: int, length: int) -> float:
    """Full forwards of `length` tokens with logits at every position, as the reference runs."""
    return forwards * length * (shape.token_flops(length / 2) + shape.head_flops)
