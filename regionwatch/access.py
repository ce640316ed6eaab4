"""Where the decoder blocks of a causal LM live; reading and overwriting the residual stream.

One table keyed by `config.model_type` says where each supported Hugging Face architecture keeps
its block list; another HF model is reached through a user-given dotted `block_path`, and any other
decoder through a `Decoder` naming its blocks, final norm and head. Both resolve into one
`ResidualSite`. The write site is the
raw output of block `write_layer` (method.md §2: `hidden_states[write_layer + 1]`); the readout is
the base model's last hidden state, which every supported architecture takes after its final norm
(`hidden_states[-1]`). Decoder blocks return a tuple in transformers 4.x and a bare tensor in 5.x;
`_hidden` and `_replace_hidden` are the only places that know.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from regionwatch.decoder import Decoder
from regionwatch.errors import ConfigError, UnsupportedModelError, check_int

BLOCK_PATHS: Mapping[str, str] = MappingProxyType(
    {
        "gpt2": "transformer.h",
        "gpt_neox": "gpt_neox.layers",
        "llama": "model.layers",
        "qwen2": "model.layers",
        "mistral": "model.layers",
        "olmo": "model.layers",
        "olmo2": "model.layers",
        "gemma": "model.layers",
        "gemma2": "model.layers",
        "phi": "model.layers",
        "phi3": "model.layers",
    }
)
# The engine hands transformers a custom 4D additive mask; these implementations honour one.
MASKED_ATTENTION = ("eager", "sdpa")
# Architectures the probe cannot measure, whatever block_path says, and why. ALiBi models build
# their position biases from a 2D padding mask and cannot take the engine's 4D one (Falcon
# only with `alibi=True`, checked through the config's flag); state-space and recurrent models
# have no attention for the engine's KV cache and masks to drive.
_ALIBI = "ALiBi attention, whose position biases cannot take the probe's 4D attention mask"
_NO_ATTENTION = "no attention layers (a state-space or recurrent model) for the probe to drive"
REFUSED_MODELS: Mapping[str, str] = MappingProxyType(
    {
        "bloom": _ALIBI,
        "mpt": _ALIBI,
        "mamba": _NO_ATTENTION,
        "mamba2": _NO_ATTENTION,
        "falcon_mamba": _NO_ATTENTION,
        "rwkv": _NO_ATTENTION,
    }
)
# Unembedding rows upcast at a time for fp32 logits of a half-precision head: 8192 x 4096 fp32
# is 128 MiB, a fraction of one block of such a model.
VOCAB_CHUNK = 8192


@dataclass(frozen=True)
class ResidualSite:
    """A causal LM resolved for probing: its blocks, the write site, the readout and the head.

    Hugging Face models (through `BLOCK_PATHS` or `block_path`) and any other decoder (through a
    `Decoder`) resolve into this one object; the engine, `measure` and the probe checks see
    nothing else of the model.

    Attributes:
        model: the causal LM (with its unembedding).
        blocks: the decoder blocks, in order (a ModuleDict's in key order).
        write_layer: 0-based block whose output is patched (docs/method.md's L_w).
        block_path: dotted path of `blocks` inside `model`.
        head: the unembedding, [vocab, d_model] `weight` and optional `bias`.
        vocab_size: token ids a prompt may hold.
        d_model: width of the residual stream.
        max_positions: longest prompt the model takes; None when it does not say.
        sliding_window: attention window of sliding-window layers; None when all see everything.
        softcap: Gemma-2-style final logit soft-capping; None for none.
        base: a Hugging Face model's decoder stack, whose `last_hidden_state` is the readout:
            the fast engine drives it with a KV cache, positions and a 4D mask. None for a
            `Decoder` model, run as a whole by the generic full-row path (`rows`).
        embed: the input embedding, when known (a plain lookup is widened, not upcast).
        decoder: how to call a `Decoder` model; None for a Hugging Face one.
        final_norm: the module whose output is a `Decoder` model's readout.
        numerics: dtype the forward computes in when it differs from the weights' (see
            `upcasting`); None: the weights' own.
    """

    model: nn.Module
    blocks: tuple[nn.Module, ...]
    write_layer: int
    block_path: str
    head: nn.Module
    vocab_size: int
    d_model: int
    max_positions: int | None = None
    sliding_window: int | None = None
    softcap: float | None = None
    base: nn.Module | None = None
    embed: nn.Module | None = None
    decoder: Decoder | None = None
    final_norm: nn.Module | None = None
    numerics: torch.dtype | None = None

    @property
    def fast(self) -> bool:
        """Whether the KV-cached engine can drive the model (else the generic full-row path)."""
        return self.base is not None

    @property
    def num_blocks(self) -> int:
        """Number of decoder blocks N."""
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the residual stream (`numerics`, else the embedding's or head's)."""
        return self.numerics or (self.embed if self.embed is not None else self.head).weight.dtype


def resolve(
    model: nn.Module,
    *,
    write_layer: int = 0,
    block_path: str | None = None,
    decoder: Decoder | None = None,
) -> ResidualSite:
    """Find the blocks, readout and head of `model` and check that `write_layer` can be patched.

    Args:
        model: a Hugging Face causal LM (`...ForCausalLM`), or any decoder named by `decoder`.
        write_layer: block whose output is patched; 0..N-2, because the last block's output
            only reaches the readout through the final norm (docs/method.md §2).
        block_path: dotted path to the block list of a Hugging Face model whose architecture
            `BLOCK_PATHS` does not know (a ModuleList, or a ModuleDict in key order).
        decoder: where a non-Hugging-Face model keeps its blocks, final norm and head.

    Returns:
        The resolved site.

    Raises:
        UnsupportedModelError: an architecture the probe cannot drive (`REFUSED_MODELS`, ALiBi),
            unknown architecture without `block_path` or `decoder`, no LM head, a path that does
            not exist or does not lead to a block list, a head without a [vocab, d_model]
            weight, an attention implementation that ignores custom masks, weights on the meta
            device, or `write_layer` out of range. Raised before any forward pass.
        ConfigError: both `block_path` and `decoder` given.
    """
    check_materialized(model)
    if decoder is None:
        site = _hf_site(model, write_layer, block_path)
    elif block_path is not None:
        raise ConfigError(
            f"block_path={block_path!r} and decoder={decoder!r} both given: a Decoder names "
            "its blocks itself; pass only decoder= (or block_path= for a Hugging Face model)"
        )
    else:
        site = _decoder_site(model, write_layer, decoder)
    check_int(
        "write_layer",
        write_layer,
        maximum=site.num_blocks - 2,
        hint=f"the model has {site.num_blocks} blocks; the last block's output is only read "
        "after the final norm",
        error=UnsupportedModelError,
    )
    return site


def check_materialized(model: nn.Module) -> None:
    """Refuse a model with parameters on the meta device: they hold no values to measure.

    Raises:
        UnsupportedModelError: naming a meta parameter and how to load the weights.
    """
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has parameters on the meta device (e.g. {meta}): they hold "
            "no values to measure; load the weights first (from_pretrained without "
            "device_map='meta', or model.to_empty(...) then load_state_dict)"
        )


def _hf_site(model: nn.Module, write_layer: int, block_path: str | None) -> ResidualSite:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(BLOCK_PATHS)
    refused = REFUSED_MODELS.get(model_type)
    if refused is None and getattr(config, "alibi", False) is True:
        refused = _ALIBI
    if refused is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model_type!r}) cannot be probed: {refused}; "
            f"supported: {supported}"
        )
    get_head = getattr(model, "get_output_embeddings", None)
    if not callable(get_head) or get_head() is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no LM head (get_output_embeddings() gives none): the "
            "probe reads next-token outputs; pass the causal LM, e.g. load it with "
            "AutoModelForCausalLM (GPT2LMHeadModel, not GPT2Model); for a model that is not a "
            "Hugging Face one, pass decoder=Decoder(blocks=..., final_norm=..., head=...)"
        )
    if block_path is None:
        if model_type not in BLOCK_PATHS:
            raise UnsupportedModelError(
                f"model_type {model_type!r} has no known block path; supported: {supported}; "
                'for another causal LM pass block_path="<dotted path to its block list>", '
                'e.g. block_path="model.layers"; for a model that is not a Hugging Face one, '
                "pass decoder=Decoder(blocks=..., final_norm=..., head=...)"
            )
        block_path = BLOCK_PATHS[model_type]
    blocks = _block_list(
        model, "block_path", block_path, f"supported model types need no path: {supported}"
    )
    base = getattr(model, "base_model", model)
    if base is model:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a causal LM with a separate decoder stack and "
            "unembedding; load it with AutoModelForCausalLM"
        )
    attention = getattr(config, "_attn_implementation", "eager")
    if attention not in MASKED_ATTENTION:
        raise UnsupportedModelError(
            f"attention implementation {attention!r} ignores the custom attention masks the probe "
            f"needs; supported: {', '.join(MASKED_ATTENTION)}; load the model with "
            'attn_implementation="sdpa"'
        )
    embed = model.get_input_embeddings()
    max_positions = None
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            max_positions = value
            break
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False or not isinstance(window, int):
        window = None
    return ResidualSite(
        model,
        blocks,
        write_layer,
        block_path,
        head=get_head(),
        vocab_size=int(embed.num_embeddings),
        d_model=int(embed.embedding_dim),
        max_positions=max_positions,
        sliding_window=window,
        softcap=getattr(config, "final_logit_softcapping", None),
        base=base,
        embed=embed,
    )


# Where a model that is not a Hugging Face one records its context length: litgpt's `GPT`
# (`max_seq_length`, which sizes its RoPE cache), nanoGPT-style configs (`config.block_size`)
# and torchtitan's (`config.max_seq_len` in 0.3, `model_args.max_seq_len` before). Anything
# else (OLMo-core records none): `Decoder(max_positions=...)`.
CONTEXT_LENGTHS = (
    "max_seq_length",
    "config.block_size",
    "config.max_seq_len",
    "model_args.max_seq_len",
)


HEAD_DIMS = 2  # an unembedding's weight is [vocab, d_model]


def _decoder_site(model: nn.Module, write_layer: int, decoder: Decoder) -> ResidualSite:
    blocks = _block_list(model, "Decoder.blocks", decoder.blocks)
    norm = _follow(model, "Decoder.final_norm", decoder.final_norm)
    head = _follow(model, "Decoder.head", decoder.head)
    for name, module in (("final_norm", norm), ("head", head)):
        if not isinstance(module, nn.Module):
            raise UnsupportedModelError(
                f"Decoder.{name}={getattr(decoder, name)!r} leads to {type(module).__name__} in "
                f"{type(model).__name__}, not a module; name the {_ROLES[name]}"
            )
    weight = getattr(head, "weight", None)
    shape = (
        tuple(weight.shape) if isinstance(weight, Tensor) and weight.dim() == HEAD_DIMS else None
    )
    vocab = decoder.vocab_size or (shape[0] if shape else None)
    width = decoder.d_model or (shape[1] if shape else None)
    if vocab is None or width is None:
        raise UnsupportedModelError(
            f"Decoder.head={decoder.head!r} ({type(head).__name__}) has no [vocab, d_model] "
            "weight to read the vocabulary size and width from: name the unembedding (the "
            "linear layer from the residual stream to the vocabulary), or pass "
            "Decoder(vocab_size=..., d_model=...) for a head whose weight is sharded"
        )
    if shape is not None and (vocab > shape[0] or width != shape[1]):
        raise UnsupportedModelError(
            f"Decoder(vocab_size={decoder.vocab_size}, d_model={decoder.d_model}) does not "
            f"fit the head {decoder.head!r}, whose weight is [vocab, d_model] = {list(shape)}: "
            "a token id needs a row, and the width must be the residual stream's; leave them "
            "None to read them from the head"
        )
    max_positions = decoder.max_positions
    for path in CONTEXT_LENGTHS if max_positions is None else ():
        value = _attribute(model, path)
        if isinstance(value, int) and not isinstance(value, bool):
            max_positions = value
            break
    return ResidualSite(
        model,
        blocks,
        write_layer,
        decoder.blocks,
        head=head,
        vocab_size=vocab,
        d_model=width,
        max_positions=max_positions,
        softcap=_attribute(model, "config.final_logit_softcapping"),
        decoder=decoder,
        final_norm=norm,
    )


_ROLES = {
    "final_norm": "final norm, whose output [batch, tokens, d_model] is the readout",
    "head": "unembedding, a module with a [vocab, d_model] weight",
}


def _block_list(model: nn.Module, name: str, path: str, hint: str = "") -> tuple[nn.Module, ...]:
    """The blocks at `path`: a ModuleList in order, or a ModuleDict in key order."""
    blocks = _follow(model, name, path, hint)
    if not isinstance(blocks, nn.ModuleList | nn.ModuleDict) or len(blocks) == 0:
        raise UnsupportedModelError(
            f"{name}={path!r} leads to {type(blocks).__name__} in {type(model).__name__}, not a "
            "non-empty nn.ModuleList or nn.ModuleDict of decoder blocks; name the block list"
        )
    return tuple(blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks)


def _follow(model: nn.Module, name: str, path: str, hint: str = "") -> Any:
    obj: Any = model
    for depth, part in enumerate(path.split(".")):
        if not hasattr(obj, part):
            where = ".".join(path.split(".")[:depth]) or type(model).__name__
            children = [n for n, _ in obj.named_children()] if isinstance(obj, nn.Module) else []
            raise UnsupportedModelError(
                f"{name}={path!r} does not exist in {type(model).__name__}: no attribute "
                f"{part!r} in {where}, whose modules are: {', '.join(children) or 'none'}"
                + (f"; {hint}" if hint else "")
            )
        obj = getattr(obj, part)
    return obj


def _attribute(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _hidden(output: Any) -> Tensor:
    """A block's hidden states: the output itself (transformers 5.x) or its first item (4.x)."""
    return output if isinstance(output, Tensor) else output[0]


def _replace_hidden(output: Any, hidden: Tensor) -> Any:
    return hidden if isinstance(output, Tensor) else (hidden, *output[1:])


@dataclass
class Capture:
    """What `capturing` saw of the write block.

    Attributes:
        vectors: the write-site residual at the last position, one [batch, d_model] per forward.
        tuples: the block returned a tuple with the hidden states first, not a bare tensor
            (transformers 4.x for most architectures, 5.x for none); a block that `skipping`
            replaces must answer in the same form.
    """

    vectors: list[Tensor] = field(default_factory=list)
    tuples: bool = False


@contextmanager
def capturing(site: ResidualSite) -> Iterator[Capture]:
    """Collect the write-site residual at the last position of every forward while active."""
    captured = Capture()

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.vectors.append(_hidden(output)[:, -1].detach().clone())
        captured.tuples = not isinstance(output, Tensor)

    handle = site.blocks[site.write_layer].register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def patching(site: ResidualSite, vectors: Tensor) -> Iterator[None]:
    """Overwrite the write-site residual while active.

    Args:
        site: the resolved model.
        vectors: [batch, positions, d_model] (or broadcastable to the block output) replacing
            every position: in a query pass all inputs are patched last tokens.
    """

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        hidden = _hidden(output)
        return _replace_hidden(output, vectors.to(hidden.dtype).expand_as(hidden))

    handle = site.blocks[site.write_layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def skipping(site: ResidualSite, vectors: Tensor, *, tuples: bool) -> Iterator[None]:
    """Skip blocks 0..write_layer: the write site's output is `vectors`, whatever the inputs.

    A query pass replaces the whole write-site output, so nothing the blocks up to it compute
    for the queries reaches the readout: they are not run at all (their children's hooks, an
    upcast's included, do not fire). The model's own forward still builds the positions and the
    mask for the blocks after it. Those blocks' KV cache grows by the queries; the skipped blocks'
    cache is left as it was (`drop_queries`). A block wrapped by FSDP1 keeps its wrapper's
    forward, so every rank still gathers and frees each unit as it would in a full pass.

    Args:
        site: the resolved model.
        vectors: [batch, positions, d_model], the write-site output of every input position.
        tuples: answer as `(vectors,)`, the form of the blocks' output (`Capture.tuples`).
    """
    skipped = [getattr(b, "_fsdp_wrapped_module", b) for b in site.blocks[: site.write_layer + 1]]
    own = [vars(block).get("forward") for block in skipped]  # a forward patched onto an instance
    vectors = vectors.to(site.dtype)  # built in float32; the stream's dtype from here on
    output: Any = (vectors,) if tuples else vectors

    def answer(*_args: Any, **_kwargs: Any) -> Any:
        return output

    for block in skipped:
        block.forward = answer
    try:
        yield
    finally:
        for block, forward in zip(skipped, own, strict=True):
            if forward is None:
                vars(block).pop("forward", None)
            else:
                block.forward = forward


def drop_queries(site: ResidualSite, cache: Any, width: int) -> None:
    """Remove the last `width` positions that a `skipping` pass added to the KV cache.

    Only the blocks after the write site saw the queries; the skipped blocks still hold the
    prefix alone, and the first of them keeps the cache's length (what the model reads as
    the past) at the prefix throughout.
    """
    first = site.write_layer + 1
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56: a layer object per block
        for layer in layers[first:]:
            layer.crop(-width)
        return
    for store in (cache.key_cache, cache.value_cache):  # 4.52-4.55: a tensor list per block
        for i in range(first, len(store)):
            store[i] = store[i][..., :-width, :]


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the write site has been read."""


def write_vectors(site: ResidualSite, input_ids: Tensor) -> Tensor:
    """The write-site residual at the last position, running only blocks 0..write_layer.

    The rest of the forward pass is cut short, so this costs (write_layer + 1) / N of a full one.

    Args:
        site: the resolved model.
        input_ids: equal-length prompts, shape [batch, tokens].

    Returns:
        Shape [batch, d_model], in the model's dtype.
    """
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(_hidden(output)[:, -1].detach().clone())
        raise _StopForward

    handle = site.blocks[site.write_layer].register_forward_hook(hook)
    try:
        site.base(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def decoder_readout(site: ResidualSite, input_ids: Tensor) -> Tensor:
    """A `Decoder` model's readout: its final norm's output, [batch, tokens, d_model].

    The model runs through `Decoder.forward` and stops once the final norm has run, so the head
    (a full-vocabulary product at every position) and whatever follows it never run.

    Raises:
        UnsupportedModelError: the forward never ran the final norm.
    """
    assert site.decoder is not None  # a Decoder site
    assert site.final_norm is not None
    captured: list[Any] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output)
        raise _StopForward

    handle = site.final_norm.register_forward_hook(hook)
    try:
        site.decoder.call(site.model, input_ids)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise UnsupportedModelError(
            f"Decoder.final_norm={site.decoder.final_norm!r} did not run in the forward of "
            f"{type(site.model).__name__}: name the module whose output is the final hidden "
            "state, or pass Decoder(forward=...) that runs it"
        )
    return captured[0]


@contextmanager
def patching_last(site: ResidualSite, vectors: Tensor) -> Iterator[None]:
    """Overwrite the write-site residual at the last position only while active.

    Args:
        site: the resolved model.
        vectors: [batch, d_model], one per row of the forward.
    """

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        hidden = _hidden(output).clone()
        hidden[:, -1] = vectors.to(hidden.dtype)
        return _replace_hidden(output, hidden)

    handle = site.blocks[site.write_layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def check_readout(site: ResidualSite, input_ids: Tensor) -> None:
    """Run a `Decoder` model once and check what its named modules give, before any measurement.

    The caller holds the model in eval mode without grad (`plan.measuring`).

    Args:
        site: the resolved model (a Hugging Face one needs no check: its layout is known).
        input_ids: one prompt, [1, tokens].

    Raises:
        UnsupportedModelError: the write block's output or the final norm's is not a
            [batch, tokens, d_model] tensor, or its width is not the head's.
    """
    if site.decoder is None:
        return
    written: list[Any] = []
    block = site.blocks[site.write_layer]
    handle = block.register_forward_hook(lambda _m, _a, output: written.append(_hidden(output)))
    try:
        final = decoder_readout(site, input_ids)
    finally:
        handle.remove()
    expected = [*input_ids.shape, site.d_model]
    named = site.decoder
    for name, path, value in (
        ("final_norm", named.final_norm, final),
        ("blocks", f"{named.blocks}[{site.write_layer}]", written[0] if written else None),
    ):
        shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
        if shape == expected:
            continue
        if isinstance(shape, list) and shape[:2] == expected[:2] and len(shape) == len(expected):
            raise UnsupportedModelError(
                f"Decoder.{name}: {path!r} gives width {shape[-1]} but the head "
                f"{named.head!r} takes d_model={site.d_model}: name the head that unembeds "
                "this residual stream (or the final norm that feeds it)"
            )
        raise UnsupportedModelError(
            f"Decoder.{name}: {path!r} gives {shape} for input_ids of shape "
            f"{list(input_ids.shape)}, not [batch, tokens, d_model] = {expected}: name the "
            + (
                "final norm, whose output is the final hidden state"
                if name == "final_norm"
                else "decoder block list, each block mapping [batch, tokens, d_model] to the same"
            )
        )


def cache_keyword(site: ResidualSite) -> str:
    """The base model's KV-cache argument: `cache` (transformers 5.x) or `past_key_values`."""
    params = inspect.signature(site.base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def final_hidden(site: ResidualSite, input_ids: Tensor, **kwargs: Any) -> Tensor:
    """Run the decoder stack and return the readout at every position, [batch, tokens, d_model]."""
    return site.base(input_ids=input_ids, **kwargs).last_hidden_state


def logits(site: ResidualSite, hidden: Tensor) -> Tensor:
    """Full next-token logits from readouts [..., d_model] (with Gemma-2-style soft-capping).

    Readouts in a wider dtype than the head (fp32 numerics of a bf16 model) meet the head's rows
    upcast `VOCAB_CHUNK` at a time: never a full fp32 copy of the unembedding.
    """
    head = site.head
    if head.weight.dtype == hidden.dtype:
        return _softcap(site, head(hidden))
    rows = [
        torch.nn.functional.linear(
            hidden,
            head.weight[start : start + VOCAB_CHUNK].to(hidden.dtype),
            None if head.bias is None else head.bias[start : start + VOCAB_CHUNK].to(hidden.dtype),
        )
        for start in range(0, head.weight.shape[0], VOCAB_CHUNK)
    ]
    return _softcap(site, torch.cat(rows, dim=-1))


def token_logits(site: ResidualSite, hidden: Tensor, tokens: Tensor) -> Tensor:
    """Logits of chosen tokens only, without the full unembedding.

    Args:
        site: the resolved model.
        hidden: readouts, shape [rows, points, d_model].
        tokens: token ids per row, shape [rows, k].

    Returns:
        Shape [rows, points, k]; equal to `logits(site, hidden)` gathered at `tokens`.
    """
    head = site.head
    weight = head.weight[tokens].to(hidden.dtype)  # [rows, k, d_model]; exact upcast if any
    out = torch.einsum("rpd,rkd->rpk", hidden, weight)
    if head.bias is not None:
        out = out + head.bias[tokens][:, None, :].to(hidden.dtype)
    return _softcap(site, out)


def _softcap(site: ResidualSite, values: Tensor) -> Tensor:
    cap = site.softcap
    return values if cap is None else cap * torch.tanh(values / cap)


@contextmanager
def upcasting(
    site: ResidualSite, dtype: torch.dtype, *, gathered: bool = False
) -> Iterator[ResidualSite]:
    """Compute the forward in `dtype` (e.g. fp32 numerics of a bf16 model) without copying it.

    Every module that owns parameters or floating buffers gets, for the duration of its own
    forward only, `dtype` copies of them (bf16/fp16 -> fp32 is exact); the originals are put back
    by its forward hook, or at exit if a forward fails. So at most one module's weights (a linear
    layer, never a whole model) exist twice at a time. A plain `nn.Embedding` is not upcast: its
    output is (a lookup commutes with the cast); the head is handled by `logits`.

    Args:
        site: the resolved model.
        dtype: the wider dtype to compute in.
        gathered: the parameters are gathered for each forward (FSDP), maybe narrower than they
            are stored (a mixed-precision `param_dtype`): only what a forward sees can tell, so
            the hooks are installed whatever the stored dtype. A module then upcasts what its
            block has just gathered, which FSDP1 sets as plain tensor attributes, not parameters.

    Yields:
        The site, marked as computing in `dtype` (its attention masks are built in it).
    """
    tensors = [*site.model.parameters(), *site.model.buffers()]
    if not gathered and not any(_narrower(t, dtype) for t in tensors):
        yield site  # already that wide: nothing to upcast, no hooks
        return
    embed, head = site.embed, site.head
    swapped: dict[int, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}

    def upcast(module: nn.Module, _args: Any) -> None:
        # Where the forward finds its tensors; FSDP1 sets what it gathered as plain attributes.
        slots = [module._parameters, module._buffers, *([vars(module)] if gathered else [])]
        held = [{k: v for k, v in slot.items() if _narrower(v, dtype)} for slot in slots]
        swapped[id(module)] = (slots, held)
        wide: dict[int, Tensor] = {}  # one copy of a tensor held in two slots
        for slot, tensors in zip(slots, held, strict=True):
            for k, v in tensors.items():
                if id(v) not in wide:
                    wide[id(v)] = v.to(dtype)
                slot[k] = wide[id(v)]

    def restore(module: nn.Module, _args: Any, _output: Any) -> None:
        _put_back(*swapped.pop(id(module)))

    def widen(_module: nn.Module, _args: Any, output: Tensor) -> Tensor:
        return output.to(dtype)

    # A plain lookup commutes with the cast: widen its output instead of copying the table. A
    # subclass may compute on the rows (Gemma scales them in the weights' dtype): upcast it.
    plain = embed is not None and type(embed) is nn.Embedding
    handles = [embed.register_forward_hook(widen)] if plain else []
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1  # 0.5 s: only if needed

    for module in site.model.modules():
        # An FSDP1 wrapper's own parameter is its sharded flat parameter, which its forward
        # gathers for the modules inside: they upcast what they see.
        if (module is embed and plain) or module is head or isinstance(module, FSDP1):
            continue
        attrs = gathered and any(isinstance(v, Tensor) for v in vars(module).values())
        if not (module._parameters or module._buffers or attrs):
            continue
        handles.append(module.register_forward_pre_hook(upcast))
        handles.append(module.register_forward_hook(restore, always_call=True))
    try:
        yield replace(site, numerics=dtype)
    finally:
        for handle in handles:
            handle.remove()
        for entry in swapped.values():
            _put_back(*entry)


def _narrower(value: Any, dtype: torch.dtype) -> bool:
    return (
        isinstance(value, Tensor)
        and value.is_floating_point()
        and torch.finfo(value.dtype).bits < torch.finfo(dtype).bits
    )


def _put_back(slots: list[dict[str, Any]], held: list[dict[str, Any]]) -> None:
    for slot, tensors in zip(slots, held, strict=True):
        slot.update(tensors)
