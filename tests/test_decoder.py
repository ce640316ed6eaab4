"""`Decoder`: models that are not Hugging Face ones, measured on the generic full-row path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from regionwatch import reference
from regionwatch.access import resolve
from regionwatch.decoder import Decoder
from regionwatch.errors import ConfigError, UnsupportedModelError
from regionwatch.measurement import ProbeConfig, interpolate, measure, region_maps
from regionwatch.results import Measurement
from regionwatch.stacks import OLMO_CORE_DECODER
from tests.conftest import random_prompts, tiny_model
from tests.support.factories import make_probes
from tests.support.nanogpt import NANOGPT, nanogpt
from tests.test_measure import assert_curves_close, mixed_length_pairs

GPT2 = Decoder(blocks="transformer.h", final_norm="transformer.ln_f", head="lm_head")


def test_decoder_site_reads_sizes_from_the_modules() -> None:
    """Vocabulary, width and context length come from the head and the model's config."""
    site = resolve(nanogpt(vocab_size=96, n_embd=16, block_size=40), decoder=NANOGPT)
    assert (site.vocab_size, site.d_model, site.max_positions) == (96, 16, 40)
    assert not site.fast
    assert site.num_blocks == 3


def test_decoder_arguments_supply_what_the_model_does_not_say() -> None:
    """max_positions given wins over the model's; a smaller vocabulary than the head is allowed."""
    decoder = Decoder(
        "transformer.h", "transformer.ln_f", "lm_head", max_positions=8, vocab_size=50
    )
    site = resolve(nanogpt(), decoder=decoder)
    assert (site.vocab_size, site.max_positions) == (50, 8)


def test_nanogpt_interpolate_matches_reference() -> None:
    """A model whose attention takes no mask equals one full forward per point, mixed lengths."""
    model = nanogpt(dtype=torch.float64)
    ids_a, ids_b = mixed_length_pairs()
    fast = interpolate(model, ids_a, ids_b, num_alphas=7, write_layer=1, decoder=NANOGPT)
    slow = reference.interpolate(model, ids_a, ids_b, num_alphas=7, write_layer=1, decoder=NANOGPT)
    assert_curves_close(fast, slow)
    torch.testing.assert_close(fast.distance, slow.distance, atol=1e-10, rtol=1e-10)
    assert model.training  # left in train mode, as found


def test_nanogpt_region_maps_match_reference() -> None:
    """Region maps of a Decoder model equal the reference; a small budget forces chunking."""
    model = nanogpt(dtype=torch.float64)
    ids = random_prompts(4, 6, seed=3)
    fast = region_maps(
        model, ids[:2], ids[1:3], ids[2:4], grid=5, max_batch_tokens=40, decoder=NANOGPT
    )
    slow = reference.region_maps(model, ids[:2], ids[1:3], ids[2:4], grid=5, decoder=NANOGPT)
    torch.testing.assert_close(fast.distance, slow.distance, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fast.anchors, slow.anchors)


@pytest.mark.parametrize("budget", [None, pytest.param(20, marks=pytest.mark.slow)])
def test_generic_path_equals_fast_path_on_a_hf_model(budget: int | None) -> None:
    """The same GPT-2 through a Decoder (full rows) and through the table (KV cache) agree."""
    model = tiny_model("gpt2", dtype=torch.float64)
    probes = make_probes(prompts=6, pairs=2, seed=4, triples=((0, 1, 2), (2, 3, 4)))
    config = ProbeConfig(num_alphas=5, grid=4, max_batch_tokens=budget)
    fast = measure(model, probes, config)
    generic = measure(model, probes, config, decoder=GPT2)
    assert fast.curves.keys() == generic.curves.keys()
    for name, curves in fast.curves.items():
        torch.testing.assert_close(generic.curves[name].distance, curves.distance)
        torch.testing.assert_close(
            generic.curves[name].logit_diff, curves.logit_diff, equal_nan=True
        )
        assert torch.equal(generic.curves[name].top_a, curves.top_a)
    torch.testing.assert_close(generic.maps.distance, fast.maps.distance)
    assert generic.summary.keys() == fast.summary.keys()


def test_measuring_a_decoder_leaves_rng_and_weights_alone() -> None:
    """Dropout's RNG stream and every weight are as before: zero observer effect."""
    model = nanogpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    measure(model, make_probes(), ProbeConfig(num_alphas=3, grid=3), decoder=NANOGPT)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("decoder", "match"),
    [
        (Decoder("transformer.blocks", "transformer.ln_f", "lm_head"), "no attribute 'blocks'.*h"),
        (
            Decoder("transformer.ln_f", "transformer.ln_f", "lm_head"),
            "not a non-empty nn.ModuleList",
        ),
        (Decoder("transformer.h", "transformer.norm", "lm_head"), "final_norm.*does not exist"),
        (Decoder("transformer.h", "transformer.ln_f", "head"), "head='head' does not exist"),
        (
            Decoder("transformer.h", "transformer.ln_f", "transformer.h.0"),
            "no \\[vocab, d_model\\]",
        ),
        (
            Decoder("transformer.h", "transformer.ln_f", "lm_head", d_model=8),
            "does not fit the head",
        ),
        (Decoder("transformer.h", "transformer.ln_f", "lm_head", vocab_size=999), "does not fit"),
        (Decoder("transformer.h", "lm_head", "lm_head"), "not \\[batch, tokens, d_model\\]"),
        (Decoder("transformer.h", "transformer.h.2.attn.c_attn", "lm_head"), "width 96"),
    ],
)
def test_bad_decoder_is_refused_before_any_measurement(decoder: Decoder, match: str) -> None:
    """A wrong path, a non-block list, a misshapen readout or head fails in setup, with the fix."""
    model = nanogpt()
    with pytest.raises(UnsupportedModelError, match=match):
        measure(model, make_probes(), ProbeConfig(num_alphas=3, grid=3), decoder=decoder)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blocks": "transformer..h"}, "dotted module path"),
        ({"final_norm": 3}, "dotted module path"),
        ({"head": ""}, "dotted module path"),
        ({"forward": "model"}, "callable"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"max_positions": True}, "max_positions"),
    ],
)
def test_decoder_refuses_bad_values(kwargs: dict, match: str) -> None:
    """Decoder checks each field at construction."""
    fields = {"blocks": "h", "final_norm": "ln_f", "head": "lm_head", **kwargs}
    with pytest.raises(ConfigError, match=match):
        Decoder(**fields)


def test_block_path_and_decoder_are_exclusive() -> None:
    """Both naming the blocks is a contradiction, refused."""
    with pytest.raises(ConfigError, match="both given"):
        resolve(tiny_model("gpt2"), block_path="transformer.h", decoder=GPT2)


def test_module_dict_blocks_resolve_in_key_order() -> None:
    """A ModuleDict of blocks works as the HF shortcut too: same numbers as the table's list."""
    model = tiny_model("llama", dtype=torch.float64)
    layers = model.model.layers
    model.by_name = nn.ModuleDict({str(i): layers[i] for i in range(len(layers))})
    site = resolve(model, block_path="by_name", write_layer=1)
    assert site.blocks == tuple(layers)
    ids = random_prompts(4, 5, seed=2)
    table = interpolate(model, ids[:2], ids[2:], num_alphas=5, write_layer=1)
    named = interpolate(model, ids[:2], ids[2:], num_alphas=5, write_layer=1, block_path="by_name")
    torch.testing.assert_close(named.distance, table.distance, atol=0, rtol=0)


def _assert_same_measurement(got: Measurement, want: Measurement) -> None:
    """Every curve, top token and map of two float64 measurements agree to round-off."""
    assert got.curves.keys() == want.curves.keys()
    for name, curves in want.curves.items():
        for field in ("distance", "relative", "max_slope", "logit_diff"):
            torch.testing.assert_close(
                getattr(got.curves[name], field), getattr(curves, field), equal_nan=True
            )
        assert torch.equal(got.curves[name].top_a, curves.top_a)
        assert torch.equal(got.curves[name].top_b, curves.top_b)
    torch.testing.assert_close(got.maps.distance, want.maps.distance)


@pytest.mark.slow
def test_litgpt_equals_its_own_conversion_to_hf(tmp_path: Path) -> None:
    """litgpt's GPT through a Decoder (full rows) equals the same weights converted to HF by
    litgpt's `convert_lit_checkpoint` and loaded by transformers (KV-cached engine)."""
    litgpt = pytest.importorskip("litgpt")
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint
    from litgpt.utils import save_config
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = litgpt.Config.from_name(
        "pythia-14m", n_layer=3, n_embd=32, n_head=4, block_size=64, padded_vocab_size=128
    )
    state = torch.random.get_rng_state()
    try:
        torch.default_generator.manual_seed(0)
        lit = litgpt.GPT(config).double()
    finally:
        torch.random.set_rng_state(state)
    torch.save(lit.state_dict(), tmp_path / "lit_model.pth")
    save_config(config, tmp_path)
    convert_lit_checkpoint(tmp_path, tmp_path / "hf")
    converted = torch.load(tmp_path / "hf" / "model.pth")
    save_file({k: v.contiguous() for k, v in converted.items()}, tmp_path / "hf/model.safetensors")
    GPTNeoXConfig(
        vocab_size=config.padded_vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        intermediate_size=config.intermediate_size,
        rotary_pct=config.rotary_percentage,
        rotary_emb_base=config.rope_base,
        max_position_embeddings=config.block_size,
        use_parallel_residual=config.parallel_residual,
        layer_norm_eps=config.norm_eps,
        tie_word_embeddings=False,
    ).save_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float64, attn_implementation="sdpa"
    )
    decoder = Decoder(blocks="transformer.h", final_norm="transformer.ln_f", head="lm_head")
    assert resolve(lit, decoder=decoder).max_positions == config.block_size
    probes = make_probes(prompts=6, pairs=2, seed=4, triples=((0, 1, 2), (3, 4, 5)))
    for write_layer in (0, 1):
        probe = ProbeConfig(num_alphas=5, grid=4, write_layer=write_layer)
        got, want = measure(lit, probes, probe, decoder=decoder), measure(hf, probes, probe)
        _assert_same_measurement(got, want)
    assert want.curves["random"].distance.max() > 0.1  # a model whose patch moves the output


def _olmo_core_model() -> nn.Module:
    """OLMo-core's olmo2_1M Transformer (blocks in a ModuleDict), seeded, in float64."""
    transformer = pytest.importorskip("olmo_core.nn.transformer")
    state = torch.random.get_rng_state()
    try:
        torch.default_generator.manual_seed(0)
        model = transformer.TransformerConfig.olmo2_1M(vocab_size=128).build(init_device="cpu")
    finally:
        torch.random.set_rng_state(state)
    return model.double().train()


@pytest.mark.slow
def test_olmo_core_transformer_matches_reference() -> None:
    """OLMo-core's Transformer (ModuleDict blocks, final norm inside its LM head) through a
    Decoder equals one full forward per point, curves and maps."""
    model = _olmo_core_model()
    site = resolve(model, decoder=OLMO_CORE_DECODER, write_layer=1)
    assert site.blocks == tuple(model.blocks.values())
    assert (site.vocab_size, site.d_model) == tuple(model.lm_head.w_out.weight.shape)
    ids_a, ids_b = mixed_length_pairs(seed=2)
    kwargs = {"num_alphas": 5, "write_layer": 1, "decoder": OLMO_CORE_DECODER}
    fast, slow = (
        interpolate(model, ids_a, ids_b, **kwargs),
        reference.interpolate(model, ids_a, ids_b, **kwargs),
    )
    assert_curves_close(fast, slow)
    torch.testing.assert_close(fast.distance, slow.distance, atol=1e-10, rtol=1e-10)
    ids = random_prompts(4, 6, seed=3)
    maps = region_maps(model, ids[:2], ids[1:3], ids[2:4], grid=4, decoder=OLMO_CORE_DECODER)
    ref = reference.region_maps(
        model, ids[:2], ids[1:3], ids[2:4], grid=4, decoder=OLMO_CORE_DECODER
    )
    torch.testing.assert_close(maps.distance, ref.distance, atol=1e-10, rtol=1e-10)
    assert model.training


TORCHTITAN = Decoder(blocks="layers", final_norm="norm", head="lm_head")


def _torchtitan_llama() -> nn.Module:
    """A tiny torchtitan Llama3Model, built by torchtitan's own layer builder, in float64.

    Its language-model attention is FlexAttention, which on the CPU compiles a kernel per input
    shape (about a minute each here); the forward-only test swaps in torchtitan's own SDPA
    attention, the same causal attention for prompts of one document.
    """
    llama3 = pytest.importorskip("torchtitan.models.llama3", reason="torchtitan needs triton")
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention

    dim, heads, vocab = 32, 4, 128
    config = llama3.Llama3Model.Config(
        dim=dim,
        vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim),
        norm=RMSNorm.Config(normalized_shape=dim),
        lm_head=Linear.Config(in_features=dim, out_features=vocab),
        layers=llama3._build_llama3_layers(
            n_layers=3,
            dim=dim,
            n_heads=heads,
            n_kv_heads=2,
            hidden_dim=2 * dim,
            rope=ComplexRoPE.Config(dim=dim // heads, max_seq_len=64, theta=10000.0),
            attn_backend="flex",
        ),
    )
    state = torch.random.get_rng_state()
    try:
        torch.default_generator.manual_seed(0)
        model = config.build()
        model.init_states(buffer_device=torch.device("cpu"))
    finally:
        torch.random.set_rng_state(state)
    for layer in model.layers.values():
        layer.attention.inner_attention = ScaledDotProductAttention(None)
    return model.double().train()


@pytest.mark.slow
def test_torchtitan_llama_matches_reference() -> None:
    """torchtitan's Llama3Model (ModuleDict layers, norm, lm_head) through a Decoder equals one
    full forward per point, forward-only on the CPU."""
    model = _torchtitan_llama()
    site = resolve(model, decoder=TORCHTITAN)
    assert site.blocks == tuple(model.layers.values())
    assert site.max_positions == model.config.max_seq_len == 64
    ids_a, ids_b = mixed_length_pairs(seed=4)
    kwargs = {"num_alphas": 5, "write_layer": 1, "decoder": TORCHTITAN}
    fast = interpolate(model, ids_a, ids_b, **kwargs)
    slow = reference.interpolate(model, ids_a, ids_b, **kwargs)
    assert_curves_close(fast, slow)
    torch.testing.assert_close(fast.distance, slow.distance, atol=1e-10, rtol=1e-10)
    assert slow.distance.max() > 0.01  # the patch moves the output


def test_half_precision_decoder_measured_in_fp32_equals_an_fp32_copy() -> None:
    """fp32 numerics of a bf16 Decoder model (upcast module by module, in place) equal measuring
    an fp32 copy of its bf16 weights; the bf16 weights stay as they were."""
    model = nanogpt(dtype=torch.bfloat16)
    copy = nanogpt(dtype=torch.bfloat16).float()
    probes, config = make_probes(), ProbeConfig(num_alphas=5, grid=3)
    got = measure(model, probes, config, dtype=torch.float32, decoder=NANOGPT)
    want = measure(copy, probes, config, decoder=NANOGPT)
    for name, curves in want.curves.items():
        torch.testing.assert_close(got.curves[name].distance, curves.distance)
        assert torch.equal(got.curves[name].top_a, curves.top_a)
    torch.testing.assert_close(got.maps.distance, want.maps.distance)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
