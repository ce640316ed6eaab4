"""Where the decoder blocks of a causal LM live; reading and overwriting the residual stream.

One table keyed by `config.model_type` says where each supported architecture keeps its block
list; anything else is reached through a user-given dotted `block_path`. The write site is the
raw output of block `write_layer` (PAPER.md §2: `hidden_states[write_layer + 1]`); the readout is
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

from regionwatch.errors import UnsupportedModelError, check_int

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
    """A causal LM resolved for probing: its blocks, the write site and the readout.

    Attributes:
        model: the causal LM (with its unembedding).
        base: the decoder stack whose `last_hidden_state` is the readout (after the final norm).
        blocks: the decoder blocks, in order.
        write_layer: 0-based block whose output is patched (PAPER.md's L_w).
        block_path: dotted path of `blocks` inside `model`.
        numerics: dtype the forward computes in when it differs from the weights' (see
            `upcasting`); None: the weights' own.
    """

    model: nn.Module
    base: nn.Module
    blocks: nn.ModuleList
    write_layer: int
    block_path: str
    numerics: torch.dtype | None = None

    @property
    def config(self) -> Any:
        """The model's `PretrainedConfig`."""
        return self.model.config

    @property
    def num_blocks(self) -> int:
        """Number of decoder blocks N."""
        return len(self.blocks)

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the largest token id a prompt may hold, plus one."""
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def max_positions(self) -> int | None:
        """Longest prompt the position embeddings allow, or None when the config does not say."""
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(self.config, name, None)
            if isinstance(value, int):
                return value
        return None

    @property
    def sliding_window(self) -> int | None:
        """Attention window of sliding-window layers, or None when every layer sees everything."""
        if getattr(self.config, "use_sliding_window", True) is False:
            return None
        window = getattr(self.config, "sliding_window", None)
        return window if isinstance(window, int) else None

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the residual stream (`numerics`, else the input embedding's)."""
        return self.numerics or self.model.get_input_embeddings().weight.dtype


def resolve(
    model: nn.Module, *, write_layer: int = 0, block_path: str | None = None
) -> ResidualSite:
    """Find the blocks of `model` and check that `write_layer` can be patched.

    Args:
        model: a Hugging Face causal LM (`...ForCausalLM`).
        write_layer: block whose output is patched; 0..N-2, because the last block's output
            only reaches the readout through the final norm (PAPER.md §2).
        block_path: dotted path to the block list, for architectures not in `BLOCK_PATHS`.

    Returns:
        The resolved site.

    Raises:
        UnsupportedModelError: an architecture the probe cannot drive (`REFUSED_MODELS`, ALiBi),
            unknown architecture without `block_path`, no LM head, a path that does not lead to a
            block list, an attention implementation that ignores custom masks, weights on the
            meta device, or `write_layer` out of range. Raised before any forward pass.
    """
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
            "AutoModelForCausalLM (GPT2LMHeadModel, not GPT2Model)"
        )
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has parameters on the meta device (e.g. {meta}): they hold "
            "no values to measure; load the weights first (from_pretrained without "
            "device_map='meta', or model.to_empty(...) then load_state_dict)"
        )
    if block_path is None:
        if model_type not in BLOCK_PATHS:
            raise UnsupportedModelError(
                f"model_type {model_type!r} has no known block path; supported: {supported}; "
                'for another causal LM pass block_path="<dotted path to its block list>", '
                'e.g. block_path="model.layers"'
            )
        block_path = BLOCK_PATHS[model_type]
    blocks = _follow(model, block_path)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise UnsupportedModelError(
            f"block_path={block_path!r} leads to {type(blocks).__name__} in "
            f"{type(model).__name__}, not a non-empty nn.ModuleList of decoder blocks"
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
    last = len(blocks) - 2
    check_int(
        "write_layer",
        write_layer,
        maximum=last,
        hint=f"the model has {len(blocks)} blocks; the last block's output is only read after "
        "the final norm",
        error=UnsupportedModelError,
    )
    return ResidualSite(model, base, blocks, write_layer, block_path)


def _follow(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for name in path.split("."):
        if not hasattr(obj, name):
            raise UnsupportedModelError(
                f"block_path={path!r} does not exist in {type(model).__name__}: no attribute "
                f"{name!r}; supported model types need no path: {', '.join(BLOCK_PATHS)}"
            )
        obj = getattr(obj, name)
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
    head = site.model.get_output_embeddings()
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
    head = site.model.get_output_embeddings()
    weight = head.weight[tokens].to(hidden.dtype)  # [rows, k, d_model]; exact upcast if any
    out = torch.einsum("rpd,rkd->rpk", hidden, weight)
    if head.bias is not None:
        out = out + head.bias[tokens][:, None, :].to(hidden.dtype)
    return _softcap(site, out)


def _softcap(site: ResidualSite, values: Tensor) -> Tensor:
    cap = getattr(site.config, "final_logit_softcapping", None)
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
    embed, head = site.model.get_input_embeddings(), site.model.get_output_embeddings()
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
    plain = type(embed) is nn.Embedding
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
