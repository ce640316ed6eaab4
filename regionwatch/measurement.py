"""The measurement core: 1-D interpolation curves and 2-D region maps of a causal LM.

`interpolate` and `region_maps` validate their input, describe their patched points as query
slots on context prompts, run them all in one pass of the KV-cached engine, and turn the readouts
into the numbers of docs/method.md §4-§5 with `metrics`. The model is measured in eval mode without
gradients and left exactly as found.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace

import torch
from torch import Tensor, nn

from regionwatch import distributed, engine, metrics
from regionwatch.access import ResidualSite, check_readout, resolve, upcasting
from regionwatch.decoder import Decoder
from regionwatch.errors import ConfigError, check_int
from regionwatch.plan import MapPart, PairPart, Plan, measuring
from regionwatch.probes import ProbeSet, PromptIds, prompt_list
from regionwatch.results import (
    DEFAULT_GRID,
    DEFAULT_SPAN,
    PAIR_PARTS,
    PARTS,
    Curves,
    Measurement,
    ProbeConfig,
    RegionMaps,
    check_alphas,
    check_budget,
    check_grid,
)


def interpolate(
    model: nn.Module,
    ids_a: PromptIds,
    ids_b: PromptIds,
    *,
    num_alphas: int = 21,
    write_layer: int = 0,
    max_batch_tokens: int | None = None,
    block_path: str | None = None,
    decoder: Decoder | None = None,
) -> Curves:
    """Patch (1 - a) x_A + a x_B into each A's forward pass and measure how far the output moves.

    Args:
        model: a causal LM (see `regionwatch.access.BLOCK_PATHS`); measured in eval mode without
            grad, in its own dtype and device, and left exactly as found.
        ids_a: context prompts, a LongTensor [P, S] or P token-id lists (lengths may differ).
        ids_b: partner prompts, same count as `ids_a`.
        num_alphas: grid points K in [0, 1], at least 3.
        write_layer: block whose output is patched (0 = after the first block).
        max_batch_tokens: most tokens per forward pass (memory budget); None for the default.
        block_path: dotted path to the block list, for architectures without a table entry.
        decoder: where a model that is not a Hugging Face one keeps its blocks, final norm
            and head (measured on the generic full-row path).

    Returns:
        The curves of every pair.

    Raises:
        ConfigError: bad prompts or settings. UnsupportedModelError: see `access.resolve`.

    Example:
        >>> curves = interpolate(model, [[5, 6, 7], [8, 9]], [[1, 2, 3], [4, 4]])
        >>> curves.max_slope  # tensor([...]) one value per pair
    """
    site = resolve(model, write_layer=write_layer, block_path=block_path, decoder=decoder)
    pairs_a, pairs_b = prompt_list(ids_a, "ids_a"), prompt_list(ids_b, "ids_b")
    _same_count(("ids_a", pairs_a), ("ids_b", pairs_b))
    check_prompts(site, pairs_a + pairs_b)
    check_alphas(num_alphas)
    check_budget(max_batch_tokens)
    plan = Plan()
    part = PairPart(plan, pairs_a, pairs_b, num_alphas)
    with measuring(model):
        result = plan.execute(site, max_batch_tokens)
        return part.curves(site, result)


def region_maps(
    model: nn.Module,
    ids_a: PromptIds,
    ids_b: PromptIds,
    ids_c: PromptIds,
    *,
    grid: int = DEFAULT_GRID,
    span: tuple[float, float] = DEFAULT_SPAN,
    write_layer: int = 0,
    max_batch_tokens: int | None = None,
    block_path: str | None = None,
    decoder: Decoder | None = None,
) -> RegionMaps:
    """Colour the plane through three prompts' write vectors by where each context's output moves.

    Every grid point p(alpha, beta) of the plane through x_A, x_B, x_C (method.md §5) is patched
    into each of the three contexts; the map's channels are 1 - D/max of the output distances.

    Args:
        model: a causal LM, as for `interpolate`.
        ids_a: the triples' first prompts, T of them (LongTensor [T, S] or token-id lists).
        ids_b: the second prompts, T of them.
        ids_c: the third prompts, T of them.
        grid: grid points G per axis, at least 3 (25 and 37 put A and B on pixel centres).
        span: axis range for alpha and beta, low < high.
        write_layer: block whose output is patched.
        max_batch_tokens: most tokens per forward pass; None for the default.
        block_path: dotted path to the block list, for architectures without a table entry.
        decoder: where a model that is not a Hugging Face one keeps its modules.

    Returns:
        The maps of every triple.

    Raises:
        ConfigError: bad prompts or settings. UnsupportedModelError: see `access.resolve`.
    """
    site = resolve(model, write_layer=write_layer, block_path=block_path, decoder=decoder)
    lists = [
        prompt_list(ids, name)
        for ids, name in ((ids_a, "ids_a"), (ids_b, "ids_b"), (ids_c, "ids_c"))
    ]
    _same_count(*zip(("ids_a", "ids_b", "ids_c"), lists, strict=True))
    check_prompts(site, [p for ps in lists for p in ps])
    check_grid(grid, span)
    check_budget(max_batch_tokens)
    plan = Plan()
    part = MapPart(plan, list(zip(*lists, strict=True)), grid, span)
    with measuring(model):
        return part.maps(plan.execute(site, max_batch_tokens))


def check_prompts(site: ResidualSite, prompts: Sequence[engine.Prompt]) -> None:
    """Refuse token ids the model cannot embed and prompts longer than it can attend over.

    A `Decoder` model also runs the first prompt once (`access.check_readout`): its modules are
    named by hand, and a wrong name must fail here, before the first step.
    """
    vocab = site.vocab_size
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ConfigError(
                f"prompt {i} holds token id {bad[0]}, outside the model's vocabulary "
                f"0..{vocab - 1}: was it tokenized with another tokenizer?"
            )
    longest = max(len(p) for p in prompts)
    limit = site.max_positions
    if limit is not None and longest > limit:
        raise ConfigError(
            f"a prompt has {longest} tokens; the model takes at most {limit}: build the probe "
            "set with a shorter seq_len"
        )
    window = site.sliding_window
    if window is not None and longest > window:
        raise ConfigError(
            f"a prompt has {longest} tokens, more than the model's sliding attention "
            f"window of {window}; use prompts of at most {window} tokens"
        )
    if site.decoder is not None:
        with measuring(site.model):
            check_readout(site, torch.tensor([prompts[0]], device=site.device))


def _same_count(*named: tuple[str, list[engine.Prompt]]) -> None:
    counts = {name: len(ps) for name, ps in named}
    if len(set(counts.values())) > 1:
        raise ConfigError(
            f"prompt lists differ in length: {counts}; give one prompt of each per pair"
        )


def measure(
    model: nn.Module,
    probes: ProbeSet,
    config: ProbeConfig | None = None,
    *,
    maps: bool = True,
    site: ResidualSite | None = None,
    shard: tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    root: nn.Module | None = None,
    decoder: Decoder | None = None,
) -> Measurement:
    """Measure every part of a probe set in one engine run; contexts shared by parts run once.

    A model sharded with FSDP2 (`fully_shard`) or FSDP1 (`FullyShardedDataParallel`) is measured
    in place and is a collective: every rank must call this, and every rank gets the whole
    measurement (or its `shard`).

    Args:
        model: a causal LM, as for `interpolate`, or the FSDP1 module wrapping one; left exactly
            as found.
        probes: the run's fixed prompts.
        config: what the run measures; default `ProbeConfig()`.
        maps: draw the region maps at this call, when `config.parts` holds them (a run draws
            them at fewer snapshots than the curves); what was measured is in the result.
        site: `model` resolved with `config`'s write layer and block path, its probe prompts
            checked against it (as `Monitor.setup` does once per run); None resolves and
            checks here.
        shard: (rank, world): measure only every world-th pair and triple, starting at rank,
            so that the ranks of a distributed run split the work; `merge_shards` of all ranks'
            results equals the unsharded measurement.
        dtype: compute in this dtype (e.g. float32 numerics of a bf16 model), upcasting module
            by module in place (`access.upcasting`): never a copy of the model; None: the
            weights' own dtype.
        root: the FSDP1 module that wraps `model` from further out (Lightning's FSDPStrategy
            wraps the LightningModule: `trainer.strategy.model`); the measurement runs inside
            its forward, where FSDP1 gathers the parameters outside the blocks.
        decoder: where a model that is not a Hugging Face one keeps its blocks, final norm and
            head; it is measured on the generic full-row path (`rows`).

    Returns:
        The measurement (of the shard).

    Raises:
        ConfigError, UnsupportedModelError: before any forward pass (a layout that cannot be
            measured: see `distributed.layout`).
    """
    config = config or ProbeConfig()
    rank, world = _check_shard(shard)
    started = time.perf_counter()
    model, root = distributed.unwrap(model, root)
    kind = distributed.layout(model, root)
    split = None
    sharded = kind != "local"
    if sharded:
        # FSDP: every rank must make the same forward calls, so every rank plans the whole probe
        # set and the engine splits the queries evenly (`engine.run`'s `split`); the rank's
        # `shard` is cut from the whole afterwards, for the monitor to merge as for DDP.
        group_rank, group_world, group = distributed.group_of()
        split = (group_rank, group_world, group) if group_world > 1 else None
        rank, world = 0, 1
    plan = Plan()
    prompts = probes.prompts()
    pair_parts: dict[str, PairPart] = {}
    for name in PAIR_PARTS:
        pairs = prompts[name][rank::world]
        if name in config.parts and pairs:
            pairs_a, pairs_b = (list(side) for side in zip(*pairs, strict=True))
            pair_parts[name] = PairPart(plan, pairs_a, pairs_b, config.num_alphas)
    map_part = None
    triples = prompts["maps"][rank::world]
    if maps and "maps" in config.parts and triples:
        map_part = MapPart(plan, triples, config.grid, config.span)
    if site is None:
        site = resolve(
            model, write_layer=config.write_layer, block_path=config.block_path, decoder=decoder
        )
        check_prompts(site, plan.prompts or [a for a, _ in prompts["random"]])

    def run(site: ResidualSite) -> tuple[engine.EngineResult | None, dict[str, Curves], Maps]:
        result = plan.execute(site, config.max_batch_tokens, split) if plan.prompts else None
        curves = {name: part.curves(site, result) for name, part in pair_parts.items()}
        return result, curves, map_part.maps(result) if map_part else None

    with contextlib.ExitStack() as stack:
        stack.enter_context(measuring(model))
        if kind == "fsdp2":
            stack.enter_context(distributed.unsharded_outside(model, site.blocks))
        if dtype is not None:
            if sharded:
                stack.enter_context(distributed.keeping_input_dtype(model))
            site = stack.enter_context(upcasting(site, dtype, gathered=sharded))
        if root is None:
            result, curves, maps = run(site)
        else:
            result, curves, maps = distributed.within_forward(root, functools.partial(run, site))
    timing = {"total": time.perf_counter() - started}
    if result is not None:
        timing |= {"clean": result.clean_s, "queries": result.queries_s}
        parts = {**pair_parts, **({"maps": map_part} if map_part else {})}
        timing |= _part_shares(plan, parts, result)
    whole = Measurement(
        config=config, curves=curves, maps=maps, summary=_summarize(curves, maps), timing=timing
    )
    return whole if not sharded or shard is None else _cut(whole, *_check_shard(shard))


Maps = RegionMaps | None


def _cut(whole: Measurement, rank: int, world: int) -> Measurement:
    """Rank `rank`'s shard of a whole measurement: what `measure(shard=(rank, world))` plans."""
    curves = {
        name: replace(
            c,
            **{
                f.name: getattr(c, f.name)[rank::world]
                for f in fields(Curves)
                if f.name != "alphas"
            },
        )
        for name, c in whole.curves.items()
        if len(c.distance[rank::world])
    }
    maps = whole.maps
    if maps is not None:
        maps = replace(
            maps,
            distance=maps.distance[rank::world],
            rgb=maps.rgb[rank::world],
            anchors=maps.anchors[rank::world],
        )
        maps = maps if len(maps.distance) else None
    return replace(whole, curves=curves, maps=maps, summary=_summarize(curves, maps))


def merge_shards(shards: Sequence[Measurement]) -> Measurement:
    """Reassemble the measurements of `measure(..., shard=(r, len(shards)))` for every rank r.

    Pairs and triples go back to their probe-set order, the summary is recomputed from the whole,
    and each timing is the slowest rank's (the ranks run at the same time).

    Raises:
        ConfigError: no shards, or shards measured with different settings.
    """
    if not shards:
        raise ConfigError("merge_shards: no measurements given")
    config = shards[0].config
    if any(m.config != config for m in shards):
        raise ConfigError("merge_shards: the shards were measured with different ProbeConfigs")
    names = [p for p in PARTS if any(p in m.curves for m in shards)]
    curves = {}
    for name in names:
        present = [m.curves[name] for m in shards if name in m.curves]
        fields_ = {f.name: [getattr(c, f.name) for c in present] for f in fields(Curves)}
        merged = {k: _interleave(v) for k, v in fields_.items() if k != "alphas"}
        curves[name] = Curves(alphas=present[0].alphas, **merged)
    map_shards = [m.maps for m in shards if m.maps is not None]
    maps = None
    if map_shards:
        maps = RegionMaps(
            axis=map_shards[0].axis,
            **{
                k: _interleave([getattr(m, k) for m in map_shards])
                for k in ("distance", "rgb", "anchors")
            },
        )
    keys = {k for m in shards for k in m.timing}
    timing = {k: max(m.timing.get(k, 0.0) for m in shards) for k in sorted(keys)}
    return Measurement(
        config=config, curves=curves, maps=maps, summary=_summarize(curves, maps), timing=timing
    )


def _interleave(rows: Sequence[Tensor]) -> Tensor:
    """Shard r holds items r, r + w, r + 2w, ... (w shards): put them back in order.

    Shards without any item are absent from `rows`: they are the trailing ranks, because rank r
    has an item whenever any rank after it has one.
    """
    world, total = len(rows), sum(len(r) for r in rows)
    out = rows[0].new_empty((total, *rows[0].shape[1:]))
    for rank, part in enumerate(rows):
        out[rank::world] = part
    return out


def _summarize(curves: Mapping[str, Curves], maps: RegionMaps | None) -> dict[str, float]:
    random = curves.get("random")
    return metrics.summary(
        (random.distance, random.relative, random.top_a, random.top_b) if random else None,
        curves["similar"].max_slope if "similar" in curves else None,
        curves["dissimilar"].max_slope if "dissimilar" in curves else None,
        (maps.rgb, maps.anchors, maps.axis) if maps else None,
    )


def _check_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    rank, world = shard
    world = check_int(f"shard={shard!r}: world", world, minimum=1)
    return check_int(f"shard={shard!r}: rank", rank, maximum=world - 1), world


def _part_shares(
    plan: Plan, parts: Mapping[str, PairPart | MapPart], result: engine.EngineResult
) -> dict[str, float]:
    points = {name: part.points for name, part in parts.items()}
    prompts = {name: len(part.prompt_ids) for name, part in parts.items()}
    total_points = sum(points.values()) or 1
    total_prompts = sum(prompts.values()) or 1
    return {
        f"part/{name}": result.queries_s * points[name] / total_points
        + result.clean_s * prompts[name] / total_prompts
        for name in parts
    }
