"""The fast engine against the slow reference, analytic cases, and the model left as found."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from regionwatch import metrics, reference
from regionwatch.access import resolve
from regionwatch.errors import ConfigError, UnsupportedModelError
from regionwatch.measurement import (
    Curves,
    ProbeConfig,
    interpolate,
    measure,
    merge_shards,
    region_maps,
)
from regionwatch.probes import ProbeSet
from regionwatch.results import DEFAULT_GRID
from regionwatch.sampling import NamedPair
from tests.conftest import random_prompts, tiny_model
from tests.support.factories import make_probes

# A KV-cached last-token pass agrees with a full forward to ~4e-7 in fp32; these leave room for
# honest float noise only (the bounds).
REL_ATOL = 1e-5
SLOPE_RTOL = 1e-4
RGB_ATOL = 1e-5


def mixed_length_pairs(seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Six pairs whose prompts have 4 to 8 tokens, A and B of different lengths."""
    ids = random_prompts(12, 8, seed=seed).tolist()
    return [row[: 4 + i % 5] for i, row in enumerate(ids[:6])], [
        row[: 8 - i % 3] for i, row in enumerate(ids[6:])
    ]


def assert_curves_close(fast: Curves, slow: Curves) -> None:
    torch.testing.assert_close(fast.relative, slow.relative, atol=REL_ATOL, rtol=0, equal_nan=True)
    torch.testing.assert_close(
        fast.max_slope, slow.max_slope, rtol=SLOPE_RTOL, atol=0, equal_nan=True
    )
    torch.testing.assert_close(fast.distance, slow.distance, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        fast.logit_diff, slow.logit_diff, atol=1e-4, rtol=1e-4, equal_nan=True
    )
    assert torch.equal(fast.top_a, slow.top_a)
    assert torch.equal(fast.top_b, slow.top_b)


def test_interpolate_matches_reference(arch: str) -> None:
    """The KV-cached batched probe equals one full forward per point, prompts of mixed lengths."""
    model = tiny_model(arch)
    ids_a, ids_b = mixed_length_pairs()
    fast = interpolate(model, ids_a, ids_b, num_alphas=11, write_layer=1)
    slow = reference.interpolate(model, ids_a, ids_b, num_alphas=11, write_layer=1)
    assert_curves_close(fast, slow)
    assert fast.max_slope.min() >= 1.0 - 1e-4  # telescoping bound (docs/method.md §4)


def test_region_maps_match_reference(arch: str) -> None:
    """Region-map colours equal the full-forward reference; a small budget forces chunking."""
    model = tiny_model(arch)
    ids = random_prompts(4, 6, seed=3)
    fast = region_maps(model, ids[:2], ids[1:3], ids[2:4], grid=7, max_batch_tokens=40)
    slow = reference.region_maps(model, ids[:2], ids[1:3], ids[2:4], grid=7)
    torch.testing.assert_close(fast.rgb, slow.rgb, atol=RGB_ATOL, rtol=0)
    torch.testing.assert_close(fast.distance, slow.distance, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.anchors, slow.anchors)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_float64_matches_reference_tightly(arch: str) -> None:
    """In float64 the two paths agree to ~1e-12: the engine computes the same function."""
    model = tiny_model(arch, dtype=torch.float64)
    ids_a, ids_b = mixed_length_pairs(seed=5)
    fast = interpolate(model, ids_a, ids_b, num_alphas=9)
    slow = reference.interpolate(model, ids_a, ids_b, num_alphas=9)
    torch.testing.assert_close(
        fast.distance.double(), slow.distance.double(), atol=1e-10, rtol=1e-10
    )


@given(
    pairs=st.integers(1, 5),
    length=st.integers(2, 9),
    alphas=st.integers(3, 12),
    write_layer=st.integers(0, 1),
    budget=st.one_of(st.none(), st.integers(1, 64)),
    seed=st.integers(0, 1000),
)
def test_interpolate_matches_reference_for_any_shape(
    pairs: int, length: int, alphas: int, write_layer: int, budget: int | None, seed: int
) -> None:
    """Over P, S, K, write layer and memory budget, fast equals reference (chained pairs)."""
    model = tiny_model("gpt2" if seed % 2 else "qwen2")
    ids = random_prompts(pairs + 1, length, seed=seed)
    kwargs = {"num_alphas": alphas, "write_layer": write_layer}
    fast = interpolate(model, ids[:-1], ids[1:], max_batch_tokens=budget, **kwargs)
    assert_curves_close(fast, reference.interpolate(model, ids[:-1], ids[1:], **kwargs))


@given(budget=st.integers(1, 200), grid=st.integers(3, 6), seed=st.integers(0, 100))
def test_chunking_never_changes_a_number(budget: int, grid: int, seed: int) -> None:
    """Any memory budget gives the numbers of the default budget (to float round-off)."""
    model = tiny_model("llama")
    ids = random_prompts(5, 7, seed=seed)
    base = interpolate(model, ids[:-1], ids[1:], num_alphas=7)
    small = interpolate(model, ids[:-1], ids[1:], num_alphas=7, max_batch_tokens=budget)
    torch.testing.assert_close(small.distance, base.distance, atol=1e-6, rtol=1e-6)
    maps = region_maps(model, ids[:2], ids[1:3], ids[2:4], grid=grid)
    small_maps = region_maps(model, ids[:2], ids[1:3], ids[2:4], grid=grid, max_batch_tokens=budget)
    torch.testing.assert_close(small_maps.distance, maps.distance, atol=1e-6, rtol=1e-6)


def _identity_after(model: nn.Module, write_layer: int) -> None:
    """Zero every residual branch of the blocks after the write site: they become identities."""
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    for block in blocks[write_layer + 1 :]:
        for name, param in block.named_parameters():
            if any(k in name for k in ("o_proj", "down_proj", "c_proj")):
                nn.init.zeros_(param)


# In float32, r carries ~1e-7 of rounding per point, which max slope multiplies by S - 1: the
# straight line then holds to ~(S - 1) * 4 * eps32 (observed 1.9e-6 at S = 17). In float64 the
# only error left is the float32 alpha grid, which is exact when S - 1 is a power of two.
LINE_BOUND = {torch.float64: 1e-9, torch.float32: 20 * 4 * 1.2e-7}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_identity_network_gives_a_straight_line(arch: str, dtype: torch.dtype) -> None:
    """Identity blocks after the write site and no final norm: r(a) = a and s = 1 (method.md §4)."""
    model = tiny_model(arch, dtype=dtype)
    _identity_after(model, 0)
    if arch == "llama":
        model.model.norm = nn.Identity()
    else:
        model.transformer.ln_f = nn.Identity()
    ids = random_prompts(6, 6, seed=7)
    num_alphas = 17 if dtype == torch.float64 else 21
    curves = interpolate(model, ids[:-1], ids[1:], num_alphas=num_alphas)
    line = curves.alphas.to(curves.relative.dtype).expand(5, -1)
    torch.testing.assert_close(curves.relative, line, atol=1e-6, rtol=0)
    ones = torch.ones(5, dtype=curves.max_slope.dtype)
    torch.testing.assert_close(curves.max_slope, ones, atol=LINE_BOUND[dtype], rtol=0)
    # d(0) is round-off of the patched pass against the clean one, not a computed distance
    assert curves.distance[:, 0].max() < 1e-5 * curves.distance[:, -1].min()


def test_final_norm_alone_gives_the_closed_form() -> None:
    """With identity blocks and only an RMS norm, orthogonal equal-norm x_A, x_B give
    r(a) = sin(theta/2) / sin(pi/4), tan(theta) = a / (1 - a) (docs/method.md §7.2 claim 1)."""
    model = tiny_model("llama")
    _identity_after(model, -1)  # block 0 too: x is the last token's embedding
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[5] = 0.0
        emb[5, 0] = 3.0
        emb[7] = 0.0
        emb[7, 1] = 3.0
    curves = interpolate(model, [[1, 5]], [[2, 7]], num_alphas=21)
    theta = torch.atan2(curves.alphas.double(), 1 - curves.alphas.double())
    expected = torch.sin(theta / 2) / math.sin(math.pi / 4)
    torch.testing.assert_close(curves.relative[0].double(), expected, atol=1e-5, rtol=0)
    assert curves.max_slope.item() == pytest.approx(1.315, abs=5e-4)
    assert curves.relative[0, 10].item() == pytest.approx(0.541, abs=5e-4)


def test_identical_prompts_are_counted_not_divided() -> None:
    """A == B gives d ~ 0: the pair is excluded (NaN curve), the others are unaffected."""
    model = tiny_model("gpt2")
    ids = random_prompts(3, 6, seed=2)
    partners = torch.stack([ids[1], ids[1], ids[0]])  # pair 1 is (ids[1], ids[1])
    curves = interpolate(model, ids, partners, num_alphas=5)
    assert curves.excluded.tolist() == [False, True, False]
    assert curves.distance[1].max() < 1e-4
    assert torch.isnan(curves.relative[1]).all()
    assert torch.isfinite(curves.relative[[0, 2]]).all()


def _state(model: nn.Module) -> dict:
    return {
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "rng": torch.random.get_rng_state().clone(),
        "grad": torch.is_grad_enabled(),
        "use_cache": model.config.use_cache,
    }


def test_model_is_left_exactly_as_found() -> None:
    """Weights, per-module modes, grad flags, hooks, RNG and grad mode are untouched."""
    model = tiny_model("llama").train()
    model.model.layers[1].eval()  # a mixed-mode model
    model.lm_head.weight.requires_grad_(False)
    ids = random_prompts(4, 6)
    before = _state(model)
    interpolate(model, ids[:-1], ids[1:], num_alphas=5)
    region_maps(model, ids[:1], ids[1:2], ids[2:3], grid=3)
    after = _state(model)
    for key, value in before.items():
        if key == "params":
            assert all(torch.equal(value[k], after[key][k]) for k in value)
        elif key == "rng":
            assert torch.equal(value, after[key])
        else:
            assert value == after[key], key


def test_model_is_restored_after_an_error() -> None:
    """A failure inside a patched pass still restores modes and removes the probe's hooks."""
    model = tiny_model("gpt2").train()
    ids = random_prompts(3, 5)
    passes = []

    def fail_in_query_pass(*_: object) -> None:
        passes.append(1)
        if len(passes) == 2:  # the first pass is the clean one; fail inside the patched one
            raise RuntimeError("boom")

    handle = model.transformer.h[2].register_forward_hook(fail_in_query_pass)
    with pytest.raises(RuntimeError, match="boom"):
        interpolate(model, ids[:-1], ids[1:], num_alphas=5)
    handle.remove()
    assert len(passes) == 2
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())


def test_dtype_and_device_follow_the_model() -> None:
    """A bfloat16 model is measured in bfloat16 and gives float32 curves near the fp32 ones."""
    model = tiny_model("llama")
    ids = random_prompts(5, 6, seed=4)
    fp32 = interpolate(model, ids[:-1], ids[1:], num_alphas=5)
    bf16 = interpolate(model.to(torch.bfloat16), ids[:-1], ids[1:], num_alphas=5)
    assert bf16.relative.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(bf16.relative, fp32.relative, atol=0.1, rtol=0)


@pytest.mark.parametrize("grid", [DEFAULT_GRID, 37])
def test_region_map_anchors_are_saturated(grid: int) -> None:
    """At the default grid (and at 37) over [-0.25, 1.25] A and B fall on pixels of their own
    colour."""
    model = tiny_model("gpt2")
    ids = random_prompts(3, 5, seed=9)
    maps = region_maps(model, ids[:1], ids[1:2], ids[2:3], grid=grid)
    zero, one = int(maps.axis.abs().argmin()), int((maps.axis - 1).abs().argmin())
    assert abs(maps.axis[zero]) < 1e-6  # A and B sit on pixel centres
    assert abs(maps.axis[one] - 1) < 1e-6
    assert maps.rgb[0, zero, zero, 0] > 0.999  # A's context at a: output = h_A
    assert maps.rgb[0, zero, one, 1] > 0.999  # B's context at b
    assert maps.anchors[0, :2].tolist() == [[0.0, 0.0], [1.0, 0.0]]


BAD_INPUT = [
    ({"ids_a": [], "ids_b": []}, ConfigError, r"ids_a: no prompts"),
    ({"ids_a": [[]], "ids_b": [[1, 2]]}, ConfigError, r"ids_a\[0\] has 0 token"),
    ({"ids_a": [[5]], "ids_b": [[1, 2]]}, ConfigError, r"ids_a\[0\] has 1 token.*at least 2"),
    ({"ids_a": [[1, 500]], "ids_b": [[1, 2]]}, ConfigError, r"token id 500, outside .*0\.\.127"),
    ({"ids_a": [[1, -3]], "ids_b": [[1, 2]]}, ConfigError, r"token id -3"),
    ({"ids_a": [[1, 2], [3, 4]], "ids_b": [[1, 2]]}, ConfigError, r"differ in length"),
    ({"ids_a": [[1.5, 2]], "ids_b": [[1, 2]]}, ConfigError, r"ids_a"),
    ({"ids_a": torch.ones(2, 3), "ids_b": [[1, 2]] * 2}, ConfigError, r"integer tensor"),
    ({"num_alphas": 2}, ConfigError, r"num_alphas=2: need an int >= 3"),
    ({"write_layer": 2}, UnsupportedModelError, r"write_layer=2"),
    ({"max_batch_tokens": 0}, ConfigError, r"max_batch_tokens=0"),
    (
        {"ids_a": [list(range(2, 100)) * 3], "ids_b": [[1, 2]]},
        ConfigError,
        r"294 tokens; the model takes at most 256",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_INPUT)
def test_interpolate_refuses_bad_input(kwargs: dict, error: type, match: str) -> None:
    """Bad prompts or settings are refused before any forward pass, naming what is wrong."""
    model = tiny_model("gpt2")
    args = {"ids_a": [[1, 2, 3]], "ids_b": [[4, 5, 6]], **kwargs}
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(error, match=match):
        interpolate(model, args.pop("ids_a"), args.pop("ids_b"), **args)
    handle.remove()
    assert not calls


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"grid": 2}, r"grid=2: need an int >= 3"), ({"span": (1.0, 0.0)}, r"span=.*low < high")],
)
def test_region_maps_refuse_bad_grids(kwargs: dict, match: str) -> None:
    """Region maps refuse grids smaller than 3 and empty spans."""
    ids = random_prompts(3, 4)
    with pytest.raises(ConfigError, match=match):
        region_maps(tiny_model("gpt2"), ids[:1], ids[1:2], ids[2:3], **kwargs)


def test_unsupported_architecture_fails_before_forward() -> None:
    """An architecture outside the table is refused by interpolate itself."""
    model = tiny_model("opt", ffn_dim=64, word_embed_proj_dim=32)
    with pytest.raises(UnsupportedModelError, match="supported"):
        interpolate(model, [[1, 2]], [[3, 4]])


def _probe_set() -> ProbeSet:
    named = (NamedPair("U1", "user", (1, 2, 3, 4), (1, 2, 3, 9), "a", "b"),)
    return make_probes(prompts=8, pairs=3, seed=11, named=named, triples=((0, 1, 2), (1, 2, 3)))


def test_measure_equals_the_parts_measured_alone() -> None:
    """One shared engine run gives each part's numbers as separate calls do."""
    model = tiny_model("qwen2")
    probes = _probe_set()
    config = ProbeConfig(num_alphas=7, grid=5)
    result = measure(model, probes, config)
    alone = interpolate(model, *probes.random_pairs, num_alphas=7)
    torch.testing.assert_close(result.curves["random"].relative, alone.relative, atol=1e-6, rtol=0)
    sim = interpolate(model, probes.similar[:, 0], probes.similar[:, 1], num_alphas=7)
    torch.testing.assert_close(result.curves["similar"].max_slope, sim.max_slope, rtol=1e-5, atol=0)
    r = probes.random
    maps = region_maps(model, r[[0, 1]], r[[1, 2]], r[[2, 3]], grid=5)
    torch.testing.assert_close(result.maps.rgb, maps.rgb, atol=1e-6, rtol=0)
    q25, med, _ = metrics.quartiles(alone.max_slope)
    assert result.summary["max_slope/median"] == pytest.approx(med)
    assert result.summary["max_slope/q25"] == pytest.approx(q25)
    assert result.curves["named"].max_slope.shape == (1,)
    assert result.timing["total"] >= result.timing["clean"] + result.timing["queries"]
    parts = sum(v for k, v in result.timing.items() if k.startswith("part/"))
    assert parts == pytest.approx(result.timing["clean"] + result.timing["queries"])


def test_measure_runs_only_the_parts_asked_for() -> None:
    """ProbeConfig.parts selects the parts; the rest are absent, not empty."""
    result = measure(
        tiny_model("gpt2"), _probe_set(), ProbeConfig(num_alphas=5, parts=("similar", "dissimilar"))
    )
    assert set(result.curves) == {"similar", "dissimilar"}
    assert result.maps is None
    assert "max_slope/median" not in result.summary
    assert "max_slope/dissimilar_over_similar" in result.summary


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"write_layer": -1}, r"ProbeConfig.write_layer=-1"),
        ({"write_layer": True}, r"ProbeConfig.write_layer=True"),
        ({"num_alphas": 1}, r"ProbeConfig.num_alphas: num_alphas=1"),
        ({"grid": 1}, r"ProbeConfig.grid: grid=1"),
        ({"span": (0.5, 0.5)}, r"ProbeConfig.span: span=\(0.5, 0.5\)"),
        ({"parts": ("random", "maps", "maps")}, r"ProbeConfig.parts"),
        ({"parts": ("everything",)}, r"ProbeConfig.parts"),
        ({"parts": ()}, r"ProbeConfig.parts"),
        ({"max_batch_tokens": -5}, r"ProbeConfig.max_batch_tokens"),
        ({"block_path": ""}, r"ProbeConfig.block_path"),
    ],
)
def test_probe_config_refuses_bad_values(kwargs: dict, match: str) -> None:
    """Each bad ProbeConfig value is refused at construction, naming the field."""
    with pytest.raises(ConfigError, match=match):
        ProbeConfig(**kwargs)


def test_probe_config_round_trips_and_rejects_unknown_keys() -> None:
    """to_dict/from_dict round-trips; an unknown key is an error, not silently dropped."""
    config = ProbeConfig(num_alphas=11, parts=("random",), span=(-0.5, 1.5))
    again = ProbeConfig.from_dict(config.to_dict())
    assert again == config
    assert again.fingerprint == config.fingerprint
    assert ProbeConfig(max_batch_tokens=64).fingerprint == ProbeConfig().fingerprint
    assert ProbeConfig(parts=("random",)).fingerprint == ProbeConfig().fingerprint
    assert ProbeConfig(num_alphas=11).fingerprint != ProbeConfig().fingerprint
    with pytest.raises(ConfigError, match=r"unknown keys \['num_alpha'\]"):
        ProbeConfig.from_dict({"num_alpha": 11})


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_merged_shards_equal_the_whole(world: int) -> None:
    """Every rank measuring its shard, merged, gives the unsharded numbers in probe-set order."""
    model = tiny_model("llama")
    probes, config = _probe_set(), ProbeConfig(num_alphas=5, grid=5)
    whole = measure(model, probes, config)
    merged = merge_shards([measure(model, probes, config, shard=(r, world)) for r in range(world)])
    assert set(merged.curves) == set(whole.curves)
    for part, curves in whole.curves.items():
        torch.testing.assert_close(merged.curves[part].distance, curves.distance, atol=1e-6, rtol=0)
        assert torch.equal(merged.curves[part].top_a, curves.top_a)
    torch.testing.assert_close(merged.maps.rgb, whole.maps.rgb, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged.maps.anchors, whole.maps.anchors)
    assert merged.summary.keys() == whole.summary.keys()
    for key, value in whole.summary.items():
        assert merged.summary[key] == pytest.approx(value, rel=1e-5, nan_ok=True), key


def test_bad_shards_are_refused() -> None:
    """A rank outside 0..world-1 is refused before measuring."""
    with pytest.raises(ConfigError, match=r"shard=\(2, 2\)"):
        measure(tiny_model("gpt2"), _probe_set(), shard=(2, 2))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_region_maps_never_change_the_pair_curves(arch: str) -> None:
    """Pair curves are bitwise the same with and without region maps beside them, so a live
    snapshot measured without maps equals its replay with maps."""
    model, probes = tiny_model(arch), _probe_set()
    with_maps = measure(model, probes, ProbeConfig(num_alphas=5, grid=5))
    without = measure(
        model, probes, ProbeConfig(num_alphas=5, parts=("random", "similar", "dissimilar", "named"))
    )
    for part, curves in without.curves.items():
        assert torch.equal(with_maps.curves[part].distance, curves.distance), part
        assert torch.equal(
            with_maps.curves[part].logit_diff.nan_to_num(7), curves.logit_diff.nan_to_num(7)
        ), part


def test_maps_false_measures_the_curves_of_a_config_with_maps() -> None:
    """`maps=False` skips the region maps of a run that has them, and only them: the result keeps
    the run's config and equals the curves of a config without maps."""
    model, probes = tiny_model("gpt2"), _probe_set()
    config = ProbeConfig(num_alphas=5, grid=5)
    skipped = measure(model, probes, config, maps=False)
    assert skipped.maps is None
    assert skipped.config == config
    assert "part/maps" not in skipped.timing
    pairs_only = measure(
        model, probes, ProbeConfig(num_alphas=5, parts=("random", "similar", "dissimilar", "named"))
    )
    assert (
        set(skipped.curves)
        == set(pairs_only.curves)
        == {"random", "similar", "dissimilar", "named"}
    )
    for part, curves in pairs_only.curves.items():
        assert torch.equal(skipped.curves[part].distance, curves.distance), part


def test_a_given_site_measures_as_a_resolved_one() -> None:
    """`site=` (resolved once per run, as Monitor.setup does) gives the numbers `measure` gets
    resolving the model itself."""
    model, probes = tiny_model("llama"), _probe_set()
    config = ProbeConfig(num_alphas=5, grid=5, write_layer=1)
    site = resolve(model, write_layer=1)
    given_site = measure(model, probes, config, site=site)
    own = measure(model, probes, config)
    for part, curves in own.curves.items():
        assert torch.equal(given_site.curves[part].distance, curves.distance), part
    assert torch.equal(given_site.maps.distance, own.maps.distance)
