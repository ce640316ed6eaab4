"""What the plain loop pays between snapshots, and what a bounded logger copy costs.

    python benchmarks/bench_loop.py           # 200,000 calls, 5,000 copies
    python benchmarks/bench_loop.py --quick   # seconds (the smoke test)

- `step_not_due_us`: one `Monitor.step` call when no snapshot is due (its checks, the schedule's
  decision), per call, over `--calls` calls of an open run. This is what `monitor.step` costs
  at every optimizer step but the few it measures.
- `bounded_copy_us`: the overhead of writing one snapshot to a "bounded" sink (a logger copy):
  a helper thread started and joined while the training thread waits, for a write that does
  nothing; per copy, over `--copies` copies. Paid once per logger per snapshot.
Both are medians of `--repeats` rounds, taken in one process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import RESULTS, environment, write
from transformers import GPT2Config, GPT2LMHeadModel

from regionwatch import Monitor, ProbeConfig, ProbeSet, Schedule, WatchConfig
from regionwatch.background import BackgroundWriter
from regionwatch.corpus import builtin_text, train_tokenizer
from regionwatch.sinks import Fanout
from regionwatch.snapshot import Snapshot


class NullSink:
    """A logger copy that does nothing: what remains is the fan-out's own cost."""

    name = "null"
    placement = "bounded"

    def write(self, snapshot: Snapshot, rendered: object) -> None:
        pass

    def close(self) -> None:
        pass


def time_steps(calls: int, run_dir: Path) -> float:
    """Seconds per `Monitor.step` call in an open run where nothing is due."""
    tokenizer = train_tokenizer([builtin_text()[:200_000]], vocab_size=512)
    probes = ProbeSet.build(tokenizer, n_prompts=13, n_similar=4, n_dissimilar=4, n_triples=2)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4))
    never = Schedule.every_steps(10 * calls)  # only the baseline and the final snapshot
    watch = WatchConfig(probe=ProbeConfig(num_alphas=5, grid=5), schedule=never, tensorboard=False)
    with Monitor(watch, model, probes=probes, run_dir=run_dir) as monitor:
        started = time.perf_counter()
        for step in range(1, calls + 1):
            monitor.step(step, tokens=step * 1024)
        return (time.perf_counter() - started) / calls


def time_copies(copies: int) -> float:
    """Seconds of fan-out overhead per bounded copy (helper thread started, waited for)."""
    sink = NullSink()
    fanout = Fanout(BackgroundWriter("bench"), [sink], timeout_s=60.0)
    started = time.perf_counter()
    for _ in range(copies):
        fanout._run(sink, "null", lambda: None)  # the write itself does nothing
    return (time.perf_counter() - started) / copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--copies", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "loop.json")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.copies, args.repeats = 2_000, 200, 1
    steps, copies = [], []
    for round_ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            steps.append(time_steps(args.calls, Path(tmp) / f"run{round_}"))
        copies.append(time_copies(args.copies))
    result = {
        "env": environment(torch.device("cpu"), torch.float32),
        "params": vars(args) | {"out": str(args.out)},
        "step_not_due_us": [s * 1e6 for s in steps],
        "bounded_copy_us": [c * 1e6 for c in copies],
        "median": {
            "step_not_due_us": statistics.median(steps) * 1e6,
            "bounded_copy_us": statistics.median(copies) * 1e6,
        },
    }
    write(result, args.out)
    print(result["median"])


if __name__ == "__main__":
    main()
