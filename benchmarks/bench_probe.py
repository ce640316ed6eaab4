"""Time the KV-cached probe against its physical floors and the slow reference, side by side.

The physical floor of any probe implementation is one batched clean forward of every probe prompt
(it builds the prefix cache, x_B and h_A; nothing can skip it). Two floors are timed:

- `floor_forward`: `model(input_ids)` with default outputs (logits at every position, a KV cache)
  over all P + 1 chained prompts: what "one batched clean forward" literally is.
- `floor_min`: `model.base_model(input_ids)` plus the unembedding at the last position only: the
  least any probe can do, since it needs each prompt's last-position readout and logits only.

Against them, in the same process and on the same model and prompts: `regionwatch.interpolate`
(chained pairs i, i + 1 of random token ids), `regionwatch.reference.interpolate`, and
`regionwatch.region_maps` on consecutive triples. Variants run interleaved, one call each per
round, so that a load change on a shared machine hits all of them alike. `paths` sets the fast
engine against the generic full-row path (the same model named by a `Decoder`, as a model that is
not a Hugging Face one is measured) at `--paths-pairs` pairs (`probe_paths.py`).

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
    python benchmarks/bench_probe.py --smollm2 only --repeats 3   # the real model, ~15 min
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from harness import (
    MIN_ROUNDS,
    RESULTS,
    Clock,
    PeakMemory,
    Setup,
    device_tag,
    environment,
    matmul_rate,
    write,
)
from probe_models import GPT2_VOCAB, build_model, parse_size
from probe_paths import bench_paths
from probe_precision import bench_precision
from probe_report import markdown, print_tables, targets
from probe_speed import bench_maps, bench_pairs, bench_snapshot

from regionwatch.engine import DEFAULT_MAX_BATCH_TOKENS
from regionwatch.loading import load_smollm2
from regionwatch.measurement import ProbeConfig
from regionwatch.probes import ProbeSet

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
    "paths_pairs": 3,
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
    "paths_pairs": 16,
}


def csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


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
        "--paths-pairs",
        type=int,
        help="chained pairs at which the fast and the generic (Decoder) paths meet; 0: skip",
    )
    parser.add_argument(
        "--precision-sizes",
        type=csv(parse_size),
        help="GPT-2 sizes at which fp32 and bf16 models are measured with fp32 numerics",
    )
    parser.add_argument(
        "--only-precision", action="store_true", help="run the precision section only"
    )
    parser.add_argument(
        "--smollm2",
        choices=["off", "also", "only"],
        default="off",
        help="the real model (SmolLM2-135M from its GGUF file, the built-in probe set): seconds "
        "per snapshot without and with maps, against one batched clean forward of its prompts",
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
        "paths": [],
    }
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M")
    case = "-smollm2" if args.smollm2 == "only" else ""
    out = args.out or RESULTS / f"bench_probe{case}-{device_tag(device)}-{stamp}.json"
    gen = torch.Generator().manual_seed(args.seed)
    rows = max(max(args.pairs) + 1, args.triples + 2, args.paths_pairs + 1)
    if args.smollm2 != "off":
        result["smollm2"] = bench_smollm2(setup, dtype, device)
        progress(result, setup, started, out, "smollm2")
    only = args.only_precision or args.smollm2 == "only"
    if args.smollm2 != "only":
        result["precision"] = bench_precision(setup, device, gen)
        progress(result, setup, started, out, "precision")
    for arch in [] if only else args.arch:
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
                if args.paths_pairs:
                    result["paths"].append(bench_paths(setup, model, shape, ids, args.paths_pairs))
                    progress(result, setup, started, out, f"paths {arch} {layers}x{d_model}")
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
    for record in result["paths"]:
        print(
            f"paths {record['arch']} {record['size']} T={record['length']} "
            f"P={record['pairs']}: generic / fast = {record['ratios']['generic_vs_fast']:.1f}x"
        )
    print(f"\nwrote {out} ({result['wall_s']:.0f} s)")
    return result


def bench_smollm2(setup: Setup, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """The real model: SmolLM2-135M dequantized from its GGUF file, the built-in probe set."""
    model, tokenizer = load_smollm2(dtype=dtype, device=str(device))
    probes = ProbeSet.build(tokenizer, seed=0)
    config = ProbeConfig(num_alphas=setup.args.alphas, grid=setup.args.grid)
    record = bench_snapshot(setup, model, probes, config)
    record["model"] = {
        "name": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
        "params": sum(p.numel() for p in model.parameters()),
        "layers": model.config.num_hidden_layers,
        "d_model": model.config.hidden_size,
        "bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    return record


def progress(result: dict[str, Any], setup: Setup, started: float, out: Path, done: str) -> None:
    """Bring the summary fields up to date and rewrite the JSON: a cut-short run keeps its data."""
    result["targets"] = targets(result["interpolate"])
    result["env"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["wall_s"] = time.perf_counter() - started
    result["quiet_waited_s"] = setup.waited["s"]
    write(result, out)
    print(f"done {done} ({result['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
