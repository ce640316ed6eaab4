"""The store's cost as a run grows: per-write time and `report` time at 100 ... 10,000 snapshots.

    python benchmarks/bench_store.py                 # 100, 500, 2,000, 10,000 snapshots
    python benchmarks/bench_store.py --quick         # 20 and 40 snapshots, seconds (smoke test)
    python benchmarks/bench_store.py --report-max 2000   # skip the report above 2,000 snapshots

One real snapshot (a seeded tiny GPT-2 measured on random prompts, with region maps) is stamped
at step i, tokens 1000 * i for every i and written through `SnapshotStore.write`, as a run's
background writer does. Every write is timed, in wall seconds and in this process's CPU seconds
(on a shared machine the wall time carries other processes' load; the CPU time does not). The
result holds the median write at the start (writes 10..19) and at the end (the last ten) of each
run, and their ratio, which is 1 when a write costs the same at the 2,000th snapshot as at the
10th. Region maps are kept on a log schedule, as a live run's default (`MAPS_PER_DECADE` per
decade of tokens, plus the first and last snapshot). Then `write_report` reads the run and draws
every figure; its CPU time over the snapshot count is the report's cost per snapshot, flat (or
falling, as fixed costs spread) when the report is linear.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from harness import RESULTS, environment, write
from transformers import GPT2Config, GPT2LMHeadModel

from regionwatch import SnapshotStore
from regionwatch.measurement import measure
from regionwatch.monitor import DEFAULT_MAPS_SCHEDULE
from regionwatch.probes import ProbeSet
from regionwatch.report import write_report
from regionwatch.results import ProbeConfig
from regionwatch.schedule import Mark
from regionwatch.snapshot import Snapshot

SIZES = (100, 500, 2_000, 10_000)
QUICK_SIZES = (20, 40)
EDGE = 10  # writes timed at each end of a run
TOKENS_PER_STEP = 1_000
VOCAB, SEQ_LEN, PROMPTS = 512, 8, 33  # 32 chained random pairs, the paper's probe shape in small


def probe_set(seed: int = 0) -> ProbeSet:
    """Random prompts, chained into pairs, three triples for the region maps; no tokenizer."""
    rng = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB, (PROMPTS, SEQ_LEN), generator=rng)
    empty = torch.zeros((0, 2, SEQ_LEN), dtype=torch.long)
    return ProbeSet(ids, empty, empty, (), torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]]), {})


def base_snapshots(probes: ProbeSet, config: ProbeConfig) -> tuple[Snapshot, Snapshot]:
    """One measurement of a seeded tiny GPT-2, stamped with and without its region maps."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB)).eval()
    with_maps = measure(model, probes, config, maps=True)
    stamped = Snapshot.stamp(
        with_maps, run_id="bench", step=0, tokens=0, probes=probes, model=model
    )
    without = dataclasses.replace(stamped.measurement, maps=None)
    return stamped, dataclasses.replace(stamped, measurement=without)


def maps_due(count: int) -> set[int]:
    """Indices whose snapshot carries maps under the live default schedule."""
    due, last = set(), None
    for i in range(count):
        final = i == count - 1
        if DEFAULT_MAPS_SCHEDULE.due(i, i * TOKENS_PER_STEP, last, final=final):
            due.add(i)
            last = Mark(i, i * TOKENS_PER_STEP)
    return due


def run_size(count: int, bases: tuple[Snapshot, Snapshot], report: bool, tmp: Path) -> dict:
    probes = probe_set()
    with_maps, without = bases
    run_dir = tmp / f"run-{count}"
    mapped = maps_due(count)
    writes, cpu = [], []
    with SnapshotStore.create(
        run_dir, probes=probes, config=with_maps.measurement.config, run_id="bench"
    ) as store:
        for i in range(count):
            base = with_maps if i in mapped else without
            snapshot = dataclasses.replace(
                base, step=i, tokens=i * TOKENS_PER_STEP, wall_time=base.wall_time + i
            )
            start, own = time.perf_counter(), time.process_time()
            store.write(snapshot)
            writes.append(time.perf_counter() - start)
            cpu.append(time.process_time() - own)
    first = statistics.median(writes[EDGE : 2 * EDGE])
    last = statistics.median(writes[-EDGE:])
    cpu_first, cpu_last = statistics.median(cpu[EDGE : 2 * EDGE]), statistics.median(cpu[-EDGE:])
    result: dict[str, Any] = {
        "snapshots": count,
        "with_maps": len(mapped),
        "write_s": writes,
        "write_first_median_s": first,
        "write_last_median_s": last,
        "last_over_first": last / first,
        "write_cpu_s": cpu,
        "write_cpu_first_median_s": cpu_first,
        "write_cpu_last_median_s": cpu_last,
        "cpu_last_over_first": cpu_last / cpu_first,
        "index_bytes": (run_dir / "index.jsonl").stat().st_size,
    }
    if report:
        start, own = time.perf_counter(), time.process_time()
        write_report([run_dir], tmp / f"report-{count}", progress=False)
        seconds, cpu_s = time.perf_counter() - start, time.process_time() - own
        result |= {
            "report_s": seconds,
            "report_cpu_s": cpu_s,
            "report_cpu_s_per_snapshot": cpu_s / count,
        }
    print(
        f"{count:>6} snapshots: write {1e3 * first:.2f} ms at the start, {1e3 * last:.2f} ms at "
        f"the end (x{last / first:.2f}); CPU {1e3 * cpu_first:.2f} -> {1e3 * cpu_last:.2f} ms"
        + (
            f"; report {result['report_s']:.1f} s, CPU {result['report_cpu_s']:.1f} s"
            if report
            else ""
        )
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--report-max", type=int, default=max(SIZES), help="no report above")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, for tests")
    parser.add_argument("--out", type=Path, default=None, help="result JSON")
    args = parser.parse_args()
    sizes = list(QUICK_SIZES) if args.quick else args.sizes
    if min(sizes) < 2 * EDGE:
        parser.error(f"--sizes: need at least {2 * EDGE} snapshots per run")
    probes = probe_set()
    config = ProbeConfig(num_alphas=21, grid=37, parts=("random", "maps"))
    bases = base_snapshots(probes, config)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_store-") as tmp:
        for count in sizes:
            runs.append(run_size(count, bases, count <= args.report_max, Path(tmp)))
            out = args.out or RESULTS / "bench_store-cpu.json"
            result = {
                "env": environment(torch.device("cpu"), torch.float32),
                "params": {**vars(args), "sizes": sizes, "out": str(out)},
                "config": config.to_dict(),
                "runs": runs,
            }
            write(result, out)  # after each size: a run cut short keeps the sizes done


if __name__ == "__main__":
    main()
