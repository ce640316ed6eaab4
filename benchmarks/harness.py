"""The benchmarks' shared timing harness: clocks, quiet-gated rounds, peak memory, the record.

Both benches (bench_probe.py, bench_overhead.py) record the environment they ran in
(`environment`) and write their result JSON the same way (`write`: atomic, so that a reader never
sees half a file). bench_probe's micro-benchmarks also time with it:

- `Clock`: wall time of one call, synchronising the accelerator on both sides, and the share of
  the machine's CPU time other processes used meanwhile (a shared 2-core machine can slow a call
  tenfold); `Samples` keeps both, and its medians are over the quiet samples.
- `run_rounds`: a warm-up round (each variant's first call is its memory run), then rounds, each
  after waiting for a quiet machine (`wait_quiet`), one call of every variant per round.
- `PeakMemory`: the extra memory a call needs above what is resident before it: on CUDA
  `torch.cuda.max_memory_allocated` minus the allocated bytes before; on Linux CPUs the
  resident-set high-water mark (`VmHWM`, reset through `/proc/self/clear_refs` after
  `malloc_trim` has returned freed heap pages to the kernel) minus the resident set before.
  Torch's CPU allocations are invisible to `tracemalloc`, so RSS is the honest CPU measure.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

import regionwatch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MIN_ROUNDS = 3  # a median needs at least three samples before the round budget may cut repeats
QUIET = 0.1  # other processes' CPU share below which the machine counts as quiet
QUIET_WINDOW_S = 0.5
MIN_SHARE_S = 0.2  # /proc/stat counts in 10 ms ticks: shorter calls get no contention figure


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
    # On a GPU, 4096^3 in bf16 takes ~0.2 ms on an H100, where the synchronise-and-clock
    # overhead around each call is a sizeable share; 8192^3 (1.4 ms in bf16) measures the kernel.
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds = statistics.median(clock(lambda: a @ b)[0] for _ in range(10))
    return 2 * n**3 / seconds


@dataclass(frozen=True)
class Setup:
    """What the timed runs share: the CLI arguments, the clock, the memory meter, the yardstick."""

    args: argparse.Namespace
    clock: Clock
    memory: PeakMemory
    matmul_flops: float
    waited: dict[str, float] = field(default_factory=lambda: {"s": 0.0})


def paired_ratio(top: Samples, bottom: Samples) -> float:
    """Median of per-round ratios (quiet rounds if any): robust to load drifting between rounds."""
    rounds = range(len(top.seconds))
    quiet = [i for i in rounds if top.quiet(i) and bottom.quiet(i)] or list(rounds)
    return statistics.median(top.seconds[i] / bottom.seconds[i] for i in quiet)


def git_commit() -> dict[str, Any]:
    """The checked-out commit and whether the tree has uncommitted changes.

    Both None where there is no repository or no git: a device machine gets a copy of the
    working tree without `.git` (gpu_checks.sh's log says which commit was sent).
    """

    def git(*cmd: str) -> str:
        try:
            out = subprocess.run(
                ["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False
            )
        except OSError:  # no git installed
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain"))}


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if match:
            return match[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What a result depends on beyond its parameters: versions, machine, device, dtype, commit."""
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
    """The device as a file-name part: the GPU's name, or `cpu-<N>core`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()


def write(result: dict[str, Any], out: Path) -> None:
    """Write a result as indented JSON, atomically: a reader never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(out)  # atomic: a reader never sees half a file
