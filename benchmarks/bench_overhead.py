"""Overhead of live monitoring: the demo-sized run with and without RegionMonitor, side by side.

    python benchmarks/bench_overhead.py           # the demo (configs/demo.yaml): ~25 min, 2 cores
    python benchmarks/bench_overhead.py --quick   # toy size, seconds (the smoke test)

Both runs train the same model on the same batches in one process (the order alternates over
repeats so that drift hits both); only `fit` is timed. The result JSON holds the wall times, the
overhead ratio, the snapshots taken and the probe's own seconds per snapshot (which every
snapshot also logs to TensorBoard as regionwatch/probe/seconds).

On a shared 2-core machine two identical runs can differ by more than the whole probe cost, so
the wall-time ratio alone cannot resolve a 3% target. The benchmark also times every call of
`Monitor.measure_now` in the monitored run (probe, store write, TensorBoard events and figures:
all the work a snapshot adds) and reports its share of that run's wall time, `in_monitor_share`,
which noise on the unmonitored run cannot move.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import transformers

from regionwatch import SnapshotStore
from regionwatch.demo import DemoConfig, demo_tokenizer, run_demo, train, training_data
from regionwatch.monitor import Monitor

ROOT = Path(__file__).resolve().parents[1]
QUICK = {
    "layers": 2,
    "width": 64,
    "heads": 2,
    "vocab_size": 512,
    "seq_len": 64,
    "batch_size": 8,
    "steps": 20,
}


def environment() -> dict:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "commit": commit.stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def time_monitor_calls(spent: list[float]) -> None:
    """Append the wall time of every `Monitor.measure_now` call (this process only) to `spent`."""
    measure_now = Monitor.measure_now

    def timed(self: Monitor, *args: object, **kwargs: object) -> object:
        started = time.perf_counter()
        try:
            return measure_now(self, *args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    Monitor.measure_now = timed


def unmonitored_seconds(config: DemoConfig, out: Path, trainer: str) -> float:
    """Wall time of the demo's training without regionwatch: its tokenizer, data and trainer."""
    out.mkdir(parents=True)
    data = training_data(config, demo_tokenizer(config))
    _, seconds = train(config, out, data, [], trainer=trainer, progress=False)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--steps", type=int, help="override the config's steps")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs (order alternates)")
    parser.add_argument("--trainer", choices=["lightning", "hf"], default="lightning")
    parser.add_argument(
        "--quick", action="store_true", help="toy size: seconds, for the smoke test"
    )
    parser.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/...)")
    args = parser.parse_args()

    config = DemoConfig.from_dict(QUICK) if args.quick else DemoConfig.from_yaml(args.config)
    if args.steps:
        config = dataclasses.replace(config, steps=args.steps)
    times: dict[str, list[float]] = {"without": [], "with": []}
    probe_s: list[float] = []
    in_monitor: list[float] = []  # per monitored run: seconds inside Monitor.measure_now
    spent: list[float] = []
    time_monitor_calls(spent)
    snapshots = 0
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = ("without", "with") if repeat % 2 == 0 else ("with", "without")
            for variant in order:
                out = Path(tmp) / f"{variant}-{repeat}"
                spent.clear()
                if variant == "without":
                    seconds = unmonitored_seconds(config, out, args.trainer)
                else:
                    result = run_demo(config, out, trainer=args.trainer, progress=False)
                    seconds = result.seconds
                times[variant].append(seconds)
                print(f"{variant:>7} monitor: {seconds:7.1f} s", flush=True)
                if variant == "with":
                    in_monitor.append(sum(spent))
                    records = SnapshotStore(result.run_dir).records()
                    snapshots = len(records)
                    probe_s = [r["probe_seconds"] for r in records]
    without, with_ = statistics.median(times["without"]), statistics.median(times["with"])
    result = {
        "env": environment(),
        "params": {**vars(args), "config": config.to_dict()}
        | {"config_path": str(args.config), "out": str(args.out)},
        "wall_s": times,
        "median_without_s": without,
        "median_with_s": with_,
        "overhead": with_ / without - 1,
        "in_monitor_s": in_monitor,
        "in_monitor_share": statistics.median(
            s / w for s, w in zip(in_monitor, times["with"], strict=True)
        ),
        "snapshots": snapshots,
        "probe_s_per_snapshot": statistics.mean(probe_s) if probe_s else None,
        "probe_s_total": sum(probe_s),
        "target": 0.03,
    }
    out = (
        args.out
        or ROOT
        / "benchmarks"
        / "results"
        / f"bench_overhead-{'quick' if args.quick else 'demo'}-{result['env']['device']}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"overhead {100 * result['overhead']:.1f}% by wall time, "
        f"{100 * result['in_monitor_share']:.1f}% inside the monitor ({snapshots} snapshots, "
        f"{result['probe_s_total']:.1f} s of probes) -> {out}"
    )


if __name__ == "__main__":
    main()
