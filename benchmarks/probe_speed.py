"""bench_probe's speed runs: the probe against its floors and the reference, and their agreement."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from harness import Samples, Setup, paired_ratio, run_rounds, wait_quiet
from probe_models import GIGA, Shape, floor_flops, interpolate_flops, reference_flops
from torch import Tensor, nn

from regionwatch import reference
from regionwatch.engine import DEFAULT_MAX_BATCH_TOKENS
from regionwatch.measurement import (
    Curves,
    ProbeConfig,
    RegionMaps,
    interpolate,
    measure,
    region_maps,
)
from regionwatch.probes import ProbeSet


def max_abs_diff(fast: Tensor, slow: Tensor) -> float:
    """Largest |fast - slow|; NaN where both are NaN counts as agreement, elsewhere as inf."""
    fast, slow = fast.double().cpu(), slow.double().cpu()
    both = fast.isnan() & slow.isnan()
    diff = (fast - slow).abs().masked_fill(both, 0.0).nan_to_num(nan=math.inf)
    return float(diff.max()) if diff.numel() else 0.0


def curve_agreement(fast: Curves, slow: Curves) -> dict[str, float]:
    k = len(slow.max_slope)
    scale = slow.distance.double().amax(dim=1, keepdim=True)  # each pair's largest d
    return {
        "relative_max_abs_diff": max_abs_diff(fast.relative[:k], slow.relative),
        "max_slope_max_rel_diff": max_abs_diff(
            fast.max_slope[:k] / slow.max_slope, torch.ones_like(slow.max_slope)
        ),
        "distance_max_rel_diff": max_abs_diff(
            fast.distance[:k].double() / scale, slow.distance.double() / scale
        ),
    }


def map_agreement(fast: RegionMaps, slow: RegionMaps) -> dict[str, float]:
    k = len(slow.distance)
    scale = slow.distance.double().amax(dim=(2, 3), keepdim=True)  # each map channel's max
    return {
        "distance_max_rel_diff": max_abs_diff(
            fast.distance[:k].double() / scale, slow.distance.double() / scale
        ),
        "rgb_max_abs_diff": max_abs_diff(fast.rgb[:k], slow.rgb),
    }


def batches(ids: Tensor, budget: int) -> list[Tensor]:
    """The engine's batching: equal-length prompts, at most `budget` tokens per pass."""
    rows = max(1, budget // ids.shape[1])
    return list(ids.split(rows))


def reference_subset(count: int, per_item_flops: float, budget_gflop: float) -> int:
    """How many pairs (or triples) of the reference fit the budget; at least one."""
    return max(1, min(count, int(budget_gflop * GIGA // per_item_flops)))


def time_reference(setup: Setup, fn: Callable[[], Any]) -> tuple[Samples, int | None, Any]:
    """Timed calls of the slow reference, each after a quiet wait, until `--reference-repeats`
    were quiet or `--reference-retries` extra calls are spent.

    The first call is also the memory run (the model is already warm from the other variants;
    the reference's peak is one pair's or triple's, whatever the count).

    Returns:
        The samples, the peak extra bytes, and the last output.
    """
    args = setup.args
    samples, peak, out = Samples(), None, None
    for call in range(args.reference_repeats + args.reference_retries):
        if samples.quiet_count >= args.reference_repeats:
            break
        setup.waited["s"] += wait_quiet(args.quiet_wait_s)
        if call == 0:
            peak, (seconds, others, out) = setup.memory(lambda: setup.clock(fn))
        else:
            seconds, others, out = setup.clock(fn)
        samples.add(seconds, others)
    return samples, peak, out


def bench_pairs(
    setup: Setup, model: nn.Module, shape: Shape, ids: Tensor, pairs: int
) -> dict[str, Any]:
    """Floors, interpolate and reference for `pairs` chained pairs of prompts `ids[:pairs + 1]`."""
    args = setup.args
    prompts = ids[: pairs + 1]
    ids_a, ids_b = prompts[:-1], prompts[1:]
    length, alphas = prompts.shape[1], args.alphas
    chunks = batches(prompts, DEFAULT_MAX_BATCH_TOKENS)
    head = model.get_output_embeddings()

    def floor_forward() -> None:
        with torch.no_grad():
            for chunk in chunks:
                model(input_ids=chunk)

    def floor_min() -> None:
        with torch.no_grad():
            for chunk in chunks:
                head(model.base_model(input_ids=chunk).last_hidden_state[:, -1])

    def fast() -> Curves:
        return interpolate(model, ids_a, ids_b, num_alphas=alphas)

    variants = {"floor_forward": floor_forward, "floor_min": floor_min, "interpolate": fast}
    samples, peaks, last = run_rounds(setup, variants)
    med = {name: s.median for name, s in samples.items()}
    flops = {
        "floor_forward": floor_flops(shape, pairs + 1, length, all_logits=True),
        "floor_min": floor_flops(shape, pairs + 1, length, all_logits=False),
        "interpolate": interpolate_flops(shape, pairs + 1, length, pairs * (alphas - 1)),
    }
    record: dict[str, Any] = {
        "arch": shape.arch,
        "size": f"{shape.layers}x{shape.d_model}",
        "vocab": shape.vocab,
        "pairs": pairs,
        "length": length,
        "alphas": alphas,
        "rounds": len(samples["interpolate"].seconds),
        "variants": {
            name: {
                **samples[name].summary(),
                "peak_extra_bytes": peaks[name],
                "prompt_tokens_per_s": (pairs + 1) * length / med[name],
                "est_gflop": flops[name] / GIGA,
                "pct_of_matmul_rate": 100 * flops[name] / med[name] / setup.matmul_flops,
            }
            for name in variants
        },
        "ratios": {
            "interpolate_vs_floor_forward": med["interpolate"] / med["floor_forward"],
            "interpolate_vs_floor_min": med["interpolate"] / med["floor_min"],
            "floor_forward_vs_floor_min": med["floor_forward"] / med["floor_min"],
            "interpolate_vs_floor_forward_paired": paired_ratio(
                samples["interpolate"], samples["floor_forward"]
            ),
            "interpolate_vs_floor_min_paired": paired_ratio(
                samples["interpolate"], samples["floor_min"]
            ),
            # the S - 1 query tokens per pair (alpha = 0 is the clean readout) are work the
            # floor does not have, through the blocks after the write site only
            "expected_vs_floor_min": 1
            + (alphas - 1) / length * (shape.layers - 1) / shape.layers,  # write layer 0
        },
    }
    record["variants"]["interpolate"]["points_per_s"] = pairs * alphas / med["interpolate"]
    if args.no_reference:
        record["reference"] = {"skipped": "--no-reference"}
        return record

    per_pair = reference_flops(shape, alphas + 2, length)
    timed = reference_subset(pairs, per_pair, args.reference_max_gflop)
    ref, peak, slow = time_reference(
        setup,
        lambda: reference.interpolate(model, ids_a[:timed], ids_b[:timed], num_alphas=alphas),
    )
    ref_s = ref.median * pairs / timed  # the reference runs pair after pair: linear in pairs
    record["reference"] = {
        **ref.summary(),
        "pairs_timed": timed,
        "extrapolated": timed < pairs,
        "full_s": ref_s,
        "est_gflop": per_pair * pairs / GIGA,
        "peak_extra_bytes": peak,
        "peak_note": "first timed call; the reference holds one pair at a time",
        "prompt_tokens_per_s": (pairs + 1) * length / ref_s,
        "points_per_s": pairs * alphas / ref_s,
    }
    record["ratios"]["speedup_vs_reference"] = ref_s / med["interpolate"]
    # the reference runs S + 2 forwards of T tokens per pair; the probe ~ T + S tokens
    record["ratios"]["expected_speedup_vs_reference"] = (alphas + 2) * length / (length + alphas)
    record["agreement"] = {"pairs_checked": timed, **curve_agreement(last["interpolate"], slow)}
    return record


def bench_maps(setup: Setup, model: nn.Module, shape: Shape, ids: Tensor) -> dict[str, Any]:
    """Region maps on triples (i, i + 1, i + 2) at `--grid`, and against the reference at
    `--reference-grid` (fast and reference both at that grid)."""
    args = setup.args
    n, length = args.triples, ids.shape[1]
    abc = [ids[k : k + n] for k in range(3)]

    def fast(grid: int, count: int = n) -> Callable[[], RegionMaps]:
        return lambda: region_maps(model, *(p[:count] for p in abc), grid=grid)

    samples, peaks, _ = run_rounds(setup, {"region_maps": fast(args.grid)}, args.maps_repeats)
    maps = samples["region_maps"]
    points = n * 3 * args.grid**2
    flops = interpolate_flops(shape, n + 2, length, points)
    record: dict[str, Any] = {
        "arch": shape.arch,
        "size": f"{shape.layers}x{shape.d_model}",
        "length": length,
        "triples": n,
        "grid": args.grid,
        "points": points,
        "region_maps": {
            **maps.summary(),
            "peak_extra_bytes": peaks["region_maps"],
            "points_per_s": points / maps.median,
            "est_gflop": flops / GIGA,
            "pct_of_matmul_rate": 100 * flops / maps.median / setup.matmul_flops,
        },
    }
    if args.no_reference:
        record["reference"] = {"skipped": "--no-reference"}
        return record

    grid = args.reference_grid
    per_triple = reference_flops(shape, 3 + 3 * grid**2, length)
    timed = reference_subset(n, per_triple, args.reference_max_gflop)
    small, _, last = run_rounds(setup, {"region_maps": fast(grid)}, args.maps_repeats)
    ref, peak, slow = time_reference(
        setup, lambda: reference.region_maps(model, *(p[:timed] for p in abc), grid=grid)
    )
    ref_s = ref.median * n / timed  # the reference runs triple after triple
    record["reference"] = {
        "grid": grid,
        "note": f"fast and reference both at grid {grid}: the reference at --grid is too slow",
        "region_maps": small["region_maps"].summary(),
        **ref.summary(),
        "triples_timed": timed,
        "extrapolated": timed < n,
        "full_s": ref_s,
        "est_gflop": per_triple * n / GIGA,
        "peak_extra_bytes": peak,
        "peak_note": "first timed call; the reference holds one triple at a time",
        "speedup_vs_reference": ref_s / small["region_maps"].median,
    }
    record["agreement"] = {
        "grid": grid,
        "triples_checked": timed,
        **map_agreement(last["region_maps"], slow),
    }
    return record


def bench_snapshot(
    setup: Setup, model: nn.Module, probes: ProbeSet, config: ProbeConfig
) -> dict[str, Any]:
    """Seconds per snapshot of a whole probe set, without and with maps, against the floor.

    The floor is one batched clean forward of every distinct probe prompt (chunked to the
    engine's token budget): no probe can do less. Peak memory is beyond the resident model.
    """
    rows = sorted({p for part in probes.prompts().values() for group in part for p in group})
    chunks = [torch.tensor(list(c)) for c in _equal_length_chunks(rows, DEFAULT_MAX_BATCH_TOKENS)]

    def floor() -> None:
        with torch.no_grad():
            for chunk in chunks:
                model(input_ids=chunk)

    variants = {
        "floor_forward": floor,
        "snapshot": lambda: measure(model, probes, config, maps=False),
        "snapshot_maps": lambda: measure(model, probes, config, maps=True),
    }
    samples, peaks, last = run_rounds(setup, variants)
    med = {name: s.median for name, s in samples.items()}
    return {
        "prompts": len(rows),
        "alphas": config.num_alphas,
        "grid": config.grid,
        "rounds": len(samples["snapshot"].seconds),
        "variants": {
            name: {**samples[name].summary(), "peak_extra_bytes": peaks[name]} for name in variants
        },
        "ratios": {
            "snapshot_vs_floor_forward": med["snapshot"] / med["floor_forward"],
            "snapshot_maps_vs_floor_forward": med["snapshot_maps"] / med["floor_forward"],
            "snapshot_vs_floor_forward_paired": paired_ratio(
                samples["snapshot"], samples["floor_forward"]
            ),
        },
        "summary": dict(last["snapshot_maps"].summary),
    }


def _equal_length_chunks(rows: list[tuple[int, ...]], budget: int) -> list[list[tuple[int, ...]]]:
    """Prompts grouped by length, each group cut to at most `budget` tokens per batch."""
    chunks: list[list[tuple[int, ...]]] = []
    for length in sorted({len(r) for r in rows}):
        same = [r for r in rows if len(r) == length]
        step = max(1, budget // length)
        chunks += [same[i : i + step] for i in range(0, len(same), step)]
    return chunks
