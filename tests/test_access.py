"""Residual access: the block table, write site, readout and unembedding of every architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from regionwatch import access
from regionwatch.errors import UnsupportedModelError
from tests.conftest import TINY_ARCHS, random_prompts, tiny_model


def test_table_covers_the_supported_architectures() -> None:
    """Every architecture the README promises has one row in the table."""
    assert set(access.BLOCK_PATHS) == set(TINY_ARCHS)


@pytest.mark.parametrize("write_layer", [0, 1])
def test_write_site_and_readout_match_hidden_states(arch: str, write_layer: int) -> None:
    """Captured x is hidden_states[L_w + 1]; the base readout is hidden_states[-1] (normed)."""
    model = tiny_model(arch)
    site = access.resolve(model, write_layer=write_layer)
    ids = random_prompts(3, 6)
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True)
        with access.capturing(site) as captured:
            readout = access.final_hidden(site, ids)
    torch.testing.assert_close(captured.vectors[0], states.hidden_states[write_layer + 1][:, -1])
    torch.testing.assert_close(readout, states.hidden_states[-1])
    torch.testing.assert_close(access.logits(site, readout), states.logits, atol=1e-5, rtol=1e-5)


def test_write_vectors_stops_after_the_write_block(arch: str) -> None:
    """The cut-short pass gives the same x and never runs the blocks after the write site."""
    model = tiny_model(arch)
    site = access.resolve(model, write_layer=0)
    ids = random_prompts(2, 5)
    later = []
    handle = site.blocks[1].register_forward_hook(lambda *_: later.append(1))
    try:
        with torch.no_grad():
            x = access.write_vectors(site, ids)
            full = model(input_ids=ids, output_hidden_states=True).hidden_states[1][:, -1]
    finally:
        handle.remove()
    torch.testing.assert_close(x, full)
    assert len(later) == 1  # only the full forward reached block 1


def test_token_logits_equal_full_logits(arch: str) -> None:
    """Chosen-token logits (with bias and soft-capping where present) equal the head's."""
    model = tiny_model(arch)
    site = access.resolve(model)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 5, 32, generator=g) * 3
    tokens = torch.randint(0, 128, (4, 2), generator=g)
    with torch.no_grad():
        full = access.logits(site, hidden)
        chosen = access.token_logits(site, hidden, tokens)
    torch.testing.assert_close(chosen, torch.gather(full, 2, tokens[:, None, :].expand(-1, 5, -1)))


def test_softcapping_is_applied_for_gemma2() -> None:
    """Gemma-2's final logit soft-capping bounds the logits by the cap."""
    model = tiny_model("gemma2", final_logit_softcapping=0.5)
    site = access.resolve(model)
    with torch.no_grad():
        out = access.logits(site, torch.randn(2, 32) * 100)
    assert out.abs().max() <= 0.5


class _TupleBlock(nn.Module):
    """A block returning (hidden, extra) like transformers 4.x decoder layers."""

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, None]:
        return hidden * 2, None


def test_patching_a_tuple_block_patches_every_row() -> None:
    """With a 4.x-style tuple output, the patch writes every batch row, not row 0 of output[0]."""
    block = _TupleBlock()
    site = access.ResidualSite(
        block, (block,), 0, "x", head=nn.Linear(2, 4), vocab_size=4, d_model=2
    )
    hidden = torch.zeros(3, 4, 2)
    vectors = torch.arange(6.0).reshape(3, 2)
    written = torch.zeros(3, 4, 2)
    written[:, -1] = vectors
    with access.patching(site, written):
        out, extra = block(hidden)
    assert extra is None
    assert torch.equal(out[:, -1], vectors)
    assert torch.equal(out[:, :-1], torch.zeros(3, 3, 2))
    with access.patching(site, vectors[:, None, :].expand(3, 4, 2)):
        out, _ = block(hidden)
    assert torch.equal(out, vectors[:, None, :].expand(3, 4, 2))
    assert not block._forward_hooks  # the hook is gone


def test_unknown_architecture_names_the_supported_ones() -> None:
    """An architecture outside the table fails before any forward, listing what is supported."""
    model = tiny_model("opt", ffn_dim=64, word_embed_proj_dim=32)
    with pytest.raises(UnsupportedModelError, match=r"'opt'.*gpt2, gpt_neox, llama.*block_path="):
        access.resolve(model)


def test_block_path_reaches_other_architectures() -> None:
    """A user-given block path makes an unlisted causal LM probe-able."""
    model = tiny_model("opt", ffn_dim=64, word_embed_proj_dim=32)
    site = access.resolve(model, block_path="model.decoder.layers")
    assert site.num_blocks == 3
    ids = random_prompts(2, 5)
    with torch.no_grad(), access.capturing(site) as captured:
        states = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(captured.vectors[0], states.hidden_states[1][:, -1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_path": "model.nothing"}, r"does not exist.*'nothing'"),
        ({"block_path": "model.embed_tokens"}, r"not a non-empty nn.ModuleList"),
        ({"write_layer": -1}, r"write_layer=-1: need an int in 0\.\.1"),
        ({"write_layer": 2}, r"write_layer=2: need an int in 0\.\.1 \(the model has 3 blocks"),
        ({"write_layer": "0"}, r"write_layer='0'"),
    ],
)
def test_resolve_refuses_bad_settings(kwargs: dict, match: str) -> None:
    """A wrong path or a write layer outside 0..N-2 is refused with a message saying why."""
    with pytest.raises(UnsupportedModelError, match=match):
        access.resolve(tiny_model("llama"), **kwargs)


def test_attention_without_custom_masks_is_refused() -> None:
    """Attention implementations that ignore 4D masks are refused, naming the fix."""
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(
        UnsupportedModelError, match=r"flash_attention_2.*attn_implementation=\"sdpa\""
    ):
        access.resolve(model)


def test_a_base_model_without_head_is_refused() -> None:
    """A decoder stack without an unembedding (AutoModel, not ForCausalLM) is refused."""
    model = tiny_model("llama").model
    with pytest.raises(UnsupportedModelError):
        access.resolve(model, block_path="layers")
