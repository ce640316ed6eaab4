"""Time the KV-cached probe against its physical floors and the slow reference, side by side.

The physical floor of any probe implementation is one batched clean forward of every probe prompt
(it builds the prefix cache, x_B and h_A; nothing can skip it). Two floors are timed:

- `floor_forward`: `model(input_ids)` with default outputs (logits at every position, a KV cache)
  over all P + 1 chained prompts: what "one batched clean forward" literally is.
- `floor_min`: `model.base_model(input_ids)` plus the unembedding at the last position only: the
  least any probe can do, since it needs each prompt's last-position readout and logits only.

Against them, in the same process and on the same model and prompts: `measure.interpolate`
(chained pairs i, i + 1 of random token ids), `regionwatch.reference.interpolate`, and
`measure.region_maps` on consecutive triples. Variants run interleaved, one call each per
round, so that a load change on a shared machine hits all of them alike.

The reference runs one full forward per point and pair after pair, so its time is linear in the
pair count; where its estimated cost exceeds `--reference-max-gflop`, only the first k pairs (or
triples) are timed and the time is scaled by P / k (marked `extrapolated`). Region maps are
compared with the reference at `--reference-grid`, since the reference at grid 37 takes hours.

Peak memory is the extra memory a call needs above what is resident before it: on CUDA
`torch.cuda.max_memory_allocated` minus the allocated bytes before; on Linux CPUs the resident-set
high-water mark (`VmHWM`, reset through `/proc/self/clear_refs` after `malloc_trim` has returned
freed heap pages to the kernel) minus the resident set before. Torch's CPU allocations are
invisible to `tracemalloc`, so RSS is the honest CPU measure. Each variant's memory run is its
first warm-up call (the reference's is one pair: it holds one pair at a time).

Usage:
    python benchmarks/bench_probe.py                      # full matrix, ~20 min on 2 CPU cores
    python benchmarks/bench_probe.py --quick --out /tmp/q.json   # smoke run, a few seconds
    python benchmarks/bench_probe.py --arch gpt2 --sizes 12x768 --pairs 16 --lengths 128
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import regionwatch
from regionwatch import reference
from regionwatch.engine import DEFAULT_MAX_BATCH_TOKENS
from regionwatch.measure import Curves, RegionMaps, interpolate, region_maps

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ARCHS = ("gpt2", "llama")
HEAD_DIM = 64  # GPT-2 small's head width; heads = d_model / 64 (at least 1)
GPT2_VOCAB = 50257
MAX_POSITIONS = 1024
# Targets from the issue, for the 12-layer model with 16 pairs: interpolate / floor at a length.
TARGETS = {10: 3.0, 128: 1.35}
TARGET_LAYERS, TARGET_PAIRS = 12, 16
MIN_ROUNDS = 3  # a median needs at least three samples before the round budget may cut repeats
QUIET = 0.1  # other processes' CPU share below which the machine counts as quiet
QUIET_WINDOW_S = 0.5
MIN_SHARE_S = 0.2  # /proc/stat counts in 10 ms ticks: shorter calls get no contention figure
GIGA = 1e9
MIB = 2**20

QUICK = {
    "arch": "gpt2,llama",
    "sizes": "2x64",
    "vocab": 512,
    "pairs": "3",
    "lengths": "6",
    "alphas": 5,
    "grid": 5,
    "reference_grid": 5,
    "triples": 2,
    "repeats": 2,
    "maps_repeats": 2,
    "warmup": 1,
    "quiet_wait_s": 0,
    "precision_sizes": "2x64,3x64",
}
FULL = {
    "arch": "gpt2,llama",
    "sizes": "12x768,4x256",
    "vocab": GPT2_VOCAB,
    "pairs": "16,64",
    "lengths": "10,128",
    "alphas": 21,
    "grid": 37,
    "reference_grid": 9,
    "triples": 4,
    "repeats": 5,
    "maps_repeats": 3,
    "warmup": 1,
    "quiet_wait_s": 60,
    "precision_sizes": "8x512,24x512",
}
# bf16 measured with fp32 numerics may cost at most this much beyond its fp32 twin's measurement,
# as a fraction of the bf16 model's parameter bytes (issue 13: a full fp32 copy cost 2.8x).
BF16_EXTRA_TARGET = 0.4


# --------------------------------------------------------------------------------------------
# Models and their cost


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


# --------------------------------------------------------------------------------------------
# Timing and memory


class Clock:
    """Wall time of one call, waiting for queued accelerator work on both sides.

    Also measures contention: the share of the machine's CPU time that other processes used
    during the call (from `/proc/stat`, minus this process's own CPU time). On a shared 2-core
    machine another process's test run can slow a call tenfold; such samples are counted.
    """

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, float | None, Any]:
        """Returns seconds, the other processes' CPU share during the call, and fn's output."""
        self.sync()
        busy, own = _busy_s(), time.process_time()
        start = time.perf_counter()
        out = fn()
        self.sync()
        seconds = time.perf_counter() - start
        return seconds, _others_share(busy, own, seconds), out


def _busy_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all cores), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _others_share(busy: float | None, own: float, seconds: float) -> float | None:
    now = _busy_s()
    if busy is None or now is None or seconds < MIN_SHARE_S:
        return None
    others = (now - busy) - (time.process_time() - own)
    return max(0.0, others) / (seconds * (os.cpu_count() or 1))


def wait_quiet(max_wait_s: float) -> float:
    """Sleep until other processes use under `QUIET` of the CPUs (or `max_wait_s` passes).

    Returns:
        Seconds waited.
    """
    waited = 0.0
    while waited < max_wait_s:
        busy, own = _busy_s(), time.process_time()
        time.sleep(QUIET_WINDOW_S)
        waited += QUIET_WINDOW_S
        share = _others_share(busy, own, QUIET_WINDOW_S)
        if share is None or share < QUIET:
            break
    return waited


class PeakMemory:
    """Extra memory one call needs above what is resident before it (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "none"
        if device.type == "cuda":
            self.method = "cuda max_memory_allocated - memory_allocated before"
        elif Path("/proc/self/clear_refs").exists():
            self.method = "linux VmHWM after clear_refs=5 and malloc_trim, minus VmRSS before"
        self._libc = _libc()

    def __call__(self, fn: Callable[[], Any]) -> tuple[int | None, Any]:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            out = fn()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before, out
        if self.method == "none":
            return None, fn()
        if self._libc is not None:
            self._libc.malloc_trim(0)  # freed heap pages would otherwise be reused unseen
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_kib("VmRSS")
        out = fn()
        return (_status_kib("VmHWM") - before) * 1024, out


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match[1]) if match else 0


@dataclass
class Samples:
    """Raw timings of one variant: seconds per call and other processes' CPU share meanwhile.

    A sample is quiet when other processes used under `QUIET` of the CPUs while it ran (or when
    that is unknown). Medians are over the quiet samples when there are any, else over all.
    """

    seconds: list[float] = field(default_factory=list)
    others: list[float | None] = field(default_factory=list)

    def add(self, seconds: float, others: float | None) -> None:
        self.seconds.append(seconds)
        self.others.append(others)

    def quiet(self, i: int) -> bool:
        share = self.others[i]
        return share is None or share < QUIET

    @property
    def quiet_count(self) -> int:
        return sum(self.quiet(i) for i in range(len(self.seconds)))

    @property
    def median(self) -> float:
        quiet = [s for i, s in enumerate(self.seconds) if self.quiet(i)]
        return statistics.median(quiet or self.seconds)

    def summary(self) -> dict[str, Any]:
        return {
            "raw_s": self.seconds,
            "others_cpu_share": self.others,
            "quiet_samples": self.quiet_count,
            "median_s": self.median,
            "median_all_s": statistics.median(self.seconds),
            "min_s": min(self.seconds),
        }


def run_rounds(
    setup: Setup, variants: dict[str, Callable[[], Any]], repeats: int | None = None
) -> tuple[dict[str, Samples], dict[str, int | None], dict[str, Any]]:
    """Warm up (the first warm-up call of each variant is its memory run), then time rounds.

    Each round waits for a quiet machine, then calls every variant once, in order. Rounds go on
    until `repeats` of them were quiet throughout, for at most twice `repeats` rounds; after
    `MIN_ROUNDS` rounds, no new round starts once `--round-budget-s` has passed.

    Returns:
        Samples per variant, peak extra bytes per variant, and each variant's last output.
    """
    args = setup.args
    repeats = args.repeats if repeats is None else repeats
    peaks: dict[str, int | None] = {}
    last: dict[str, Any] = {}
    for name, fn in variants.items():
        peaks[name], last[name] = setup.memory(fn)
    for _ in range(args.warmup - 1):
        for fn in variants.values():
            fn()
    samples = {name: Samples() for name in variants}
    started = time.perf_counter()
    quiet_rounds = 0
    for done in range(2 * repeats):
        if quiet_rounds >= repeats or (
            done >= MIN_ROUNDS and time.perf_counter() - started > args.round_budget_s
        ):
            break
        setup.waited["s"] += wait_quiet(args.quiet_wait_s)
        busy, own, round_start = _busy_s(), time.process_time(), time.perf_counter()
        shares = {}
        for name, fn in variants.items():
            seconds, shares[name], last[name] = setup.clock(fn)
            samples[name].seconds.append(seconds)
        # calls too short to measure alone take the whole round's share
        whole = _others_share(busy, own, time.perf_counter() - round_start)
        for name, share in shares.items():
            samples[name].others.append(whole if share is None else share)
        quiet_rounds += all(s.quiet(len(s.seconds) - 1) for s in samples.values())
    return samples, peaks, last


def matmul_rate(device: torch.device, dtype: torch.dtype, clock: Clock) -> float:
    """Measured FLOP/s of one large square matmul: the yardstick for "% of matmul rate"."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds = statistics.median(clock(lambda: a @ b)[0] for _ in range(10))
    return 2 * n**3 / seconds


# --------------------------------------------------------------------------------------------
# Agreement


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


# --------------------------------------------------------------------------------------------
# Benchmarks


@dataclass(frozen=True)
class Setup:
    args: argparse.Namespace
    clock: Clock
    memory: PeakMemory
    matmul_flops: float
    waited: dict[str, float] = field(default_factory=lambda: {"s": 0.0})


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


def paired_ratio(top: Samples, bottom: Samples) -> float:
    """Median of per-round ratios (quiet rounds if any): robust to load drifting between rounds."""
    rounds = range(len(top.seconds))
    quiet = [i for i in rounds if top.quiet(i) and bottom.quiet(i)] or list(rounds)
    return statistics.median(top.seconds[i] / bottom.seconds[i] for i in quiet)


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
        "interpolate": interpolate_flops(shape, pairs + 1, length, pairs * alphas),
    }
    record: dict[str, Any] = {
        "arch": shape.arch,
        "size": f"{shape.layers}x{shape.d_model}",
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
            # the S query tokens per pair are work the floor does not have
            "expected_vs_floor_min": (length + alphas) / length,
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


# --------------------------------------------------------------------------------------------
# Environment, output, table


def git_commit() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if match:
            return match[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "regionwatch": regionwatch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "dtype": str(dtype).removeprefix("torch."),
        "git": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for the 12-layer model with 16 pairs, against both floors."""
    rows = []
    for r in results:
        limit = TARGETS.get(r["length"])
        if limit is None or r["pairs"] != TARGET_PAIRS or not r["size"].startswith("12x"):
            continue
        ratios = r["ratios"]
        rows.append(
            {
                "arch": r["arch"],
                "size": r["size"],
                "length": r["length"],
                "limit": limit,
                "vs_floor_forward": ratios["interpolate_vs_floor_forward"],
                "met_vs_floor_forward": ratios["interpolate_vs_floor_forward"] <= limit,
                "vs_floor_min": ratios["interpolate_vs_floor_min"],
                "met_vs_floor_min": ratios["interpolate_vs_floor_min"] <= limit,
            }
        )
    return rows


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def print_tables(result: dict[str, Any]) -> None:
    head = (
        f"{'arch':5} {'size':6} {'P':>3} {'T':>4}| {'fwd s':>7} {'min s':>7} {'interp s':>8} "
        f"{'x fwd':>6} {'x min':>6} | {'ref s':>8} {'speedup':>8} | "
        f"{'MiB fwd':>7} {'min':>5} {'interp':>6} {'ref':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in result["interpolate"]:
        v, ratios, ref = r["variants"], r["ratios"], r["reference"]
        ref_s = "skipped" if "skipped" in ref else f"{ref['full_s']:.2f}{'*' * ref['extrapolated']}"
        speed = ratios.get("speedup_vs_reference")
        noisy = any(x["quiet_samples"] < len(x["raw_s"]) for x in v.values())
        print(
            f"{r['arch']:5} {r['size']:6} {r['pairs']:>3} {r['length']:>3}{'!' if noisy else ' '}| "
            f"{v['floor_forward']['median_s']:7.3f} {v['floor_min']['median_s']:7.3f} "
            f"{v['interpolate']['median_s']:8.3f} "
            f"{ratios['interpolate_vs_floor_forward']:6.2f} "
            f"{ratios['interpolate_vs_floor_min']:6.2f} | {ref_s:>8} "
            f"{'-' if speed is None else f'{speed:.1f}x':>8} | "
            f"{_mib(v['floor_forward']['peak_extra_bytes']):>7} "
            f"{_mib(v['floor_min']['peak_extra_bytes']):>5} "
            f"{_mib(v['interpolate']['peak_extra_bytes']):>6} "
            f"{_mib(ref.get('peak_extra_bytes')):>5}"
        )
    print("(* reference timed on a subset of pairs and scaled: see pairs_timed)")
    print(f"(! some samples ran while other processes used >= {QUIET:.0%} of the CPUs;")
    print(" medians are over the quiet samples)")
    if result["maps"]:
        print()
        head = (
            f"{'arch':5} {'size':6} {'T':>4} {'grid':>4} | {'maps s':>7} {'points/s':>9} "
            f"{'MiB':>5} | {'ref grid':>8} {'fast s':>7} {'ref s':>8} {'speedup':>8}"
        )
        print(head)
        print("-" * len(head))
        for m in result["maps"]:
            rm, ref = m["region_maps"], m["reference"]
            if "skipped" in ref:
                tail = f"{'skipped':>8}"
            else:
                tail = (
                    f"{ref['grid']:>8} {ref['region_maps']['median_s']:7.3f} "
                    f"{ref['full_s']:7.2f}{'*' * ref['extrapolated']:1} "
                    f"{ref['speedup_vs_reference']:7.1f}x"
                )
            print(
                f"{m['arch']:5} {m['size']:6} {m['length']:>4} {m['grid']:>4} | "
                f"{rm['median_s']:7.3f} {rm['points_per_s']:9.0f} "
                f"{_mib(rm['peak_extra_bytes']):>5} | {tail}"
            )
    for t in result["targets"]:
        print(
            f"target {t['arch']} {t['size']} T={t['length']}: <= {t['limit']}x -> "
            f"{t['vs_floor_forward']:.2f}x floor_forward "
            f"({'met' if t['met_vs_floor_forward'] else 'NOT met'}), "
            f"{t['vs_floor_min']:.2f}x floor_min "
            f"({'met' if t['met_vs_floor_min'] else 'NOT met'})"
        )


def markdown(result: dict[str, Any]) -> str:
    """The README's tables, from a result JSON (`--table PATH`)."""
    env = result["env"]
    lines = [
        f"{env['device_name']}, {env['threads']} threads, {env['dtype']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, commit {env['git']['commit'][:8]}"
        f"{' (dirty tree)' if env['git']['dirty'] else ''}, {env['date']}; "
        f"matmul rate {result['matmul_flops_per_s'] / GIGA:.0f} GFLOP/s.",
        "",
        "| arch | size | pairs | T | floor_forward s | floor_min s | interpolate s "
        "| x floor_forward | x floor_min | expected x min | reference s | speed-up "
        "| peak MiB fwd / min / interp / ref | quiet samples |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in result["interpolate"]:
        v, ratios, ref = r["variants"], r["ratios"], r["reference"]
        skipped = "skipped" in ref
        speed = ratios.get("speedup_vs_reference")
        quiet = min(x["quiet_samples"] for x in v.values())
        ref_s = "-" if skipped else f"{ref['full_s']:.1f}{'*' if ref['extrapolated'] else ''}"
        peaks = " / ".join(
            _mib(x) for x in [*(v[n]["peak_extra_bytes"] for n in v), ref.get("peak_extra_bytes")]
        )
        lines.append(
            f"| {r['arch']} | {r['size']} | {r['pairs']} | {r['length']} "
            f"| {v['floor_forward']['median_s']:.3f} | {v['floor_min']['median_s']:.3f} "
            f"| {v['interpolate']['median_s']:.3f} "
            f"| {ratios['interpolate_vs_floor_forward']:.2f} "
            f"| {ratios['interpolate_vs_floor_min']:.2f} | {ratios['expected_vs_floor_min']:.2f} "
            f"| {ref_s} "
            f"| {'-' if speed is None else f'{speed:.1f}x'} | {peaks} "
            f"| {quiet}/{r['rounds']} |"
        )
    if result["maps"]:
        lines += [
            "",
            "| arch | size | T | grid | triples | region_maps s | points/s | peak MiB "
            "| ref grid | maps s at ref grid | reference s | speed-up |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for m in result["maps"]:
            rm, ref = m["region_maps"], m["reference"]
            tail = (
                "| - | - | - | - |"
                if "skipped" in ref
                else f"| {ref['grid']} | {ref['region_maps']['median_s']:.3f} "
                f"| {ref['full_s']:.1f}{'*' if ref['extrapolated'] else ''} "
                f"| {ref['speedup_vs_reference']:.1f}x |"
            )
            lines.append(
                f"| {m['arch']} | {m['size']} | {m['length']} | {m['grid']} | {m['triples']} "
                f"| {rm['median_s']:.2f} | {rm['points_per_s']:.0f} "
                f"| {_mib(rm['peak_extra_bytes'])} {tail}"
            )
    return "\n".join(lines)


def csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


def bench_precision(setup: Setup, device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    """Peak extra memory and time of one measurement with fp32 numerics, fp32 vs bf16 weights.

    The bf16 model is upcast module by module in place (`measure(dtype=float32)`); beside it,
    the way it was measured before issue 13 (`copy.deepcopy(model).float()`) for contrast.
    Peaks are fractions of the measured model's own parameter bytes.
    """
    args = setup.args
    length, pairs = max(args.lengths), max(args.pairs)
    rows = []
    for layers, d_model in args.precision_sizes:
        ids = torch.randint(0, args.vocab, (2 * pairs, length), generator=gen)
        probes = regionwatch.ProbeSet(
            ids, ids[:0].reshape(0, 2, length), ids[:0].reshape(0, 2, length)
        )
        config = regionwatch.ProbeConfig(num_alphas=args.alphas, parts=("random",))
        record: dict[str, Any] = {"size": f"{layers}x{d_model}", "length": length, "pairs": pairs}
        for name in ("fp32", "bf16", "bf16_copy"):
            dtype = torch.float32 if name == "fp32" else torch.bfloat16
            model, _ = build_model("gpt2", layers, d_model, args.vocab, dtype, device)
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

            def call(
                model: nn.Module = model,
                name: str = name,
                probes: regionwatch.ProbeSet = probes,
                config: regionwatch.ProbeConfig = config,
            ) -> Any:
                target = copy.deepcopy(model).float() if name == "bf16_copy" else model
                return regionwatch.measure(target, probes, config, dtype=torch.float32)

            call()  # warm-up: the allocator's and the kernels' first-call costs
            peak, _ = setup.memory(call)
            samples = Samples()
            for _ in range(max(1, args.repeats // 2)):
                seconds, others, _ = setup.clock(call)
                samples.add(seconds, others)
            record[name] = {
                "param_bytes": weight_bytes,
                "peak_extra_bytes": peak,
                "peak_extra_fraction": None if peak is None else peak / weight_bytes,
                **samples.summary(),
            }
            del model
            gc.collect()
        fp32, bf16 = record["fp32"], record["bf16"]
        if fp32["peak_extra_bytes"] is not None and bf16["peak_extra_bytes"] is not None:
            beyond = (bf16["peak_extra_bytes"] - fp32["peak_extra_bytes"]) / bf16["param_bytes"]
            record["bf16_beyond_fp32_fraction"] = beyond
            if layers == 8:  # noqa: PLR2004 - the issue's target is stated at 8 blocks
                record["target"] = {"limit": BF16_EXTRA_TARGET, "met": beyond <= BF16_EXTRA_TARGET}
        record["bf16_time_vs_fp32"] = bf16["median_s"] / fp32["median_s"]
        rows.append(record)
        print(
            f"precision {record['size']}: extra memory x params fp32 "
            f"{_frac(fp32)} | bf16 in place {_frac(bf16)} | bf16 via copy "
            f"{_frac(record['bf16_copy'])} | bf16 beyond fp32 "
            f"{record.get('bf16_beyond_fp32_fraction', float('nan')):.2f} | time bf16/fp32 "
            f"{record['bf16_time_vs_fp32']:.2f}",
            flush=True,
        )
    return rows


def _frac(variant: dict[str, Any]) -> str:
    value = variant["peak_extra_fraction"]
    return "-" if value is None else f"{value:.2f}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=csv(str), help="gpt2 (absolute) and/or llama (rotary)")
    parser.add_argument("--sizes", type=csv(parse_size), help="LAYERSxD_MODEL, e.g. 12x768,4x256")
    parser.add_argument("--vocab", type=int, help="vocabulary size (default GPT-2's 50257)")
    parser.add_argument("--pairs", type=csv(int), help="chained pair counts, e.g. 16,64")
    parser.add_argument("--lengths", type=csv(int), help="prompt lengths in tokens, e.g. 10,128")
    parser.add_argument("--alphas", type=int, help="interpolation grid points")
    parser.add_argument("--grid", type=int, help="region-map grid points per axis")
    parser.add_argument(
        "--reference-grid", type=int, help="grid at which region maps meet the reference"
    )
    parser.add_argument("--triples", type=int, help="region-map triples (0,1,2), (1,2,3), ...")
    parser.add_argument("--repeats", type=int, help="timed rounds (each calls every variant)")
    parser.add_argument("--maps-repeats", type=int, help="timed rounds of region maps")
    parser.add_argument(
        "--warmup", type=int, help="untimed rounds first (the first measures memory)"
    )
    parser.add_argument(
        "--round-budget-s",
        type=float,
        default=60.0,
        help=f"no new round after this many seconds once {MIN_ROUNDS} are done",
    )
    parser.add_argument(
        "--quiet-wait-s",
        type=float,
        help="before each timed round, wait up to this long for other processes to go quiet",
    )
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument(
        "--reference-retries",
        type=int,
        default=1,
        help="extra reference calls allowed when a call ran while the machine was busy",
    )
    parser.add_argument(
        "--reference-max-gflop",
        type=float,
        default=12000.0,
        help="time the reference on the first pairs/triples within this estimated cost, then "
        "scale (the reference is linear in pairs); ~50 s at 250 GFLOP/s",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference")
    parser.add_argument(
        "--precision-sizes",
        type=csv(parse_size),
        help="GPT-2 sizes at which fp32 and bf16 models are measured with fp32 numerics",
    )
    parser.add_argument(
        "--only-precision", action="store_true", help="run the precision section only"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes: seconds")
    parser.add_argument(
        "--table", type=Path, help="print the markdown tables of a result JSON and exit"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = QUICK if "--quick" in argv else FULL
    # defaults go first, as options: later ones win, and every value goes through its type
    given = [f"--{key.replace('_', '-')}={value}" for key, value in defaults.items()]
    return parser.parse_args([*given, *argv])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.table:
        result = json.loads(args.table.read_text())
        print(markdown(result))
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    clock = Clock(device)
    setup = Setup(args, clock, PeakMemory(device), matmul_rate(device, dtype, clock))
    started = time.perf_counter()
    env = environment(device, dtype)
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    params["sizes"] = [f"{layers}x{d}" for layers, d in args.sizes]
    params["max_batch_tokens"] = DEFAULT_MAX_BATCH_TOKENS
    result: dict[str, Any] = {
        "benchmark": "bench_probe",
        "env": env,
        "params": params,
        "matmul_flops_per_s": setup.matmul_flops,
        "memory_method": setup.memory.method,
        "complete": False,
        "interpolate": [],
        "maps": [],
    }
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M")
    out = args.out or RESULTS / f"bench_probe-{device_tag(device)}-{stamp}.json"
    gen = torch.Generator().manual_seed(args.seed)
    rows = max(max(args.pairs) + 1, args.triples + 2)
    result["precision"] = bench_precision(setup, device, gen)
    progress(result, setup, started, out, "precision")
    for arch in [] if args.only_precision else args.arch:
        for layers, d_model in args.sizes:
            model, shape = build_model(arch, layers, d_model, args.vocab, dtype, device)
            result.setdefault("models", {})[f"{arch}-{layers}x{d_model}"] = {
                "params": sum(p.numel() for p in model.parameters()),
                "heads": shape.heads,
                "d_ff": shape.d_ff,
                "vocab": shape.vocab,
            }
            for length in args.lengths:
                ids = torch.randint(0, args.vocab, (rows, length), generator=gen).to(device)
                for pairs in args.pairs:
                    result["interpolate"].append(bench_pairs(setup, model, shape, ids, pairs))
                    progress(
                        result,
                        setup,
                        started,
                        out,
                        f"{arch} {layers}x{d_model} P={pairs} T={length}",
                    )
                if args.triples:
                    result["maps"].append(bench_maps(setup, model, shape, ids))
                    progress(
                        result, setup, started, out, f"maps {arch} {layers}x{d_model} T={length}"
                    )
            del model
            gc.collect()
    result["complete"] = True
    write(result, out)
    print()
    print_tables(result)
    print(f"\nwrote {out} ({result['wall_s']:.0f} s)")
    return result


def progress(result: dict[str, Any], setup: Setup, started: float, out: Path, done: str) -> None:
    """Bring the summary fields up to date and rewrite the JSON: a cut-short run keeps its data."""
    result["targets"] = targets(result["interpolate"])
    result["env"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["wall_s"] = time.perf_counter() - started
    result["quiet_waited_s"] = setup.waited["s"]
    write(result, out)
    print(f"done {done} ({result['wall_s']:.0f} s)", flush=True)


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(out)  # atomic: a reader never sees half a file


if __name__ == "__main__":
    main(sys.argv[1:])
