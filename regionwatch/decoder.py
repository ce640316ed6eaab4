"""Where a non-Hugging-Face decoder keeps its blocks, final norm and unembedding.

Hugging Face causal LMs are found through `access.BLOCK_PATHS`. Any other decoder (litgpt's `GPT`,
torchtitan's and OLMo-core's `Transformer`, a nanoGPT-style model) is named by a `Decoder`: dotted
module paths inside the model plus how to call it. `access.resolve` turns either into the same
`ResidualSite`; nothing downstream of it sees a model class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any

from torch import Tensor, nn

from regionwatch.errors import ConfigError, check_int

# What calls a decoder with a batch of token ids, [batch, tokens] -> anything (its output is not
# read: the readout is taken from `final_norm` by a hook).
Forward = Callable[[nn.Module, Tensor], Any]


@dataclass(frozen=True)
class Decoder:
    """A decoder named by module paths, for models that `access.BLOCK_PATHS` does not know.

    The probe patches the output of block `write_layer` at the last position and reads the output
    of `final_norm` at the last position (docs/method.md §2); `head` gives the logits of the readout
    (top tokens, logit differences). Vocabulary size, width and context length are read from the
    modules where they can be; the arguments supply them where they cannot (a sharded head) or
    set the context length of a model that does not record it.

    Attributes:
        blocks: dotted path of the decoder blocks: an `nn.ModuleList`, or an `nn.ModuleDict`
            whose blocks run in key order (OLMo-core, torchtitan).
        final_norm: dotted path of the module whose output [batch, tokens, d_model] is the
            readout (the final norm; OLMo-core: "lm_head.norm").
        head: dotted path of the unembedding, a module with a [vocab, d_model] `weight` (and
            optionally a `bias`).
        forward: `forward(model, input_ids)` runs the model on [batch, tokens] token ids; None
            calls `model(input_ids)`.
        vocab_size: token ids a prompt may hold (default: the head's rows).
        d_model: residual width (default: the head's columns).
        max_positions: longest prompt the model takes (default: read from the model where it
            records one, e.g. litgpt's `max_seq_length` or nanoGPT's `config.block_size`).

    Example:
        >>> decoder = Decoder(blocks="transformer.h", final_norm="transformer.ln_f", head="lm_head")
        >>> measure(model, probes, ProbeConfig(), decoder=decoder)
    """

    blocks: str
    final_norm: str
    head: str
    _: KW_ONLY
    forward: Forward | None = None
    vocab_size: int | None = None
    d_model: int | None = None
    max_positions: int | None = None

    def __post_init__(self) -> None:
        for name in ("blocks", "final_norm", "head"):
            path = getattr(self, name)
            parts = path.split(".") if isinstance(path, str) else [""]
            if not all(p.isidentifier() or p.isdigit() for p in parts):
                raise ConfigError(
                    f"Decoder.{name}={path!r}: need a dotted module path inside the model, e.g. "
                    f'{name}="{_EXAMPLES[name]}"'
                )
        if self.forward is not None and not callable(self.forward):
            raise ConfigError(
                f"Decoder.forward={self.forward!r}: need a callable forward(model, input_ids), "
                "or None to call model(input_ids)"
            )
        for name in ("vocab_size", "d_model", "max_positions"):
            value = getattr(self, name)
            if value is not None:
                check_int(f"Decoder.{name}", value, minimum=1, hint="or None to read it")

    def call(self, model: nn.Module, input_ids: Tensor) -> Any:
        """Run `model` on token ids [batch, tokens] as `forward` says."""
        return model(input_ids) if self.forward is None else self.forward(model, input_ids)


_EXAMPLES = {"blocks": "transformer.h", "final_norm": "transformer.ln_f", "head": "lm_head"}
