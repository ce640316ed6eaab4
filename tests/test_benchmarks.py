"""The benchmark scripts still run: each one's --quick mode, end to end, in a subprocess; and
benchmarks/gpu_checks.sh, the device's one-call script, at toy size on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
AGREEMENT_TOL = 1e-5  # docs/method.md §9: the fast path matches the reference to float32 round-off


def run_quick(script: str, out: Path) -> dict:
    """Run benchmarks/<script> --quick as a user would; its JSON result."""
    subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(out.read_text())


def test_bench_probe_quick_writes_its_json(tmp_path: Path) -> None:
    """bench_probe --quick times floors, probe, reference and maps and records their agreement."""
    result = run_quick("bench_probe.py", tmp_path / "probe.json")

    assert {"torch", "transformers", "device", "dtype", "threads", "git"} <= set(result["env"])
    assert result["params"]["quick"] is True
    assert {r["arch"] for r in result["interpolate"]} == {"gpt2", "llama"}
    for record in result["interpolate"]:
        variants = record["variants"]
        assert set(variants) == {"floor_forward", "floor_min", "interpolate"}
        for timing in variants.values():
            assert len(timing["raw_s"]) == record["rounds"] >= 1
            assert timing["median_s"] > 0
            assert "peak_extra_bytes" in timing
        assert {
            "interpolate_vs_floor_forward",
            "interpolate_vs_floor_min",
            "speedup_vs_reference",
        } <= set(record["ratios"])
        assert record["reference"]["full_s"] > 0
        agreement = record["agreement"]
        assert agreement["pairs_checked"] == record["pairs"]
        for key in ("relative_max_abs_diff", "max_slope_max_rel_diff", "distance_max_rel_diff"):
            assert agreement[key] < AGREEMENT_TOL, (record["arch"], key, agreement[key])
    assert len(result["maps"]) == len(result["interpolate"])
    for record in result["maps"]:
        assert record["region_maps"]["median_s"] > 0
        assert record["reference"]["speedup_vs_reference"] > 0
        assert record["agreement"]["distance_max_rel_diff"] < AGREEMENT_TOL
    assert [r["arch"] for r in result["paths"]] == ["gpt2", "llama"]
    for record in result["paths"]:
        assert record["variants"]["generic"]["median_s"] > 0
        assert record["ratios"]["generic_vs_fast"] > 0
        for key in ("relative_max_abs_diff", "max_slope_max_rel_diff", "distance_max_rel_diff"):
            assert record["agreement"][key] < AGREEMENT_TOL, (record["arch"], key)
    assert [r["size"] for r in result["precision"]] == ["2x64", "3x64"]
    for record in result["precision"]:
        for name in ("fp32", "bf16", "bf16_copy"):
            assert record[name]["median_s"] > 0
            assert "peak_extra_fraction" in record[name]
        assert record["bf16"]["param_bytes"] * 2 == record["fp32"]["param_bytes"]
        assert record["bf16_time_vs_fp32"] > 0


def test_bench_overhead_quick_writes_its_json(tmp_path: Path) -> None:
    """bench_overhead --quick: both runs, the training thread's blocked share, the writer's time."""
    result = run_quick("bench_overhead.py", tmp_path / "overhead.json")

    assert result["complete"] is True
    assert result["env"]["dtype"] == "float32"  # the demo's precision: 32-true
    assert len(result["wall_s"]["with"]) == len(result["wall_s"]["without"]) == 1
    assert result["snapshots"] >= 2  # step 0 and the end, at least
    (blocking,) = result["blocking_s"]
    # The probe blocks the training thread; the writes run beside it, on the background writer.
    assert 0 < result["probe_s_total"] <= blocking < result["median_with_s"]
    assert result["blocking_share"] == blocking / result["median_with_s"]
    (background,) = result["background_s"]
    assert 0 < background < result["median_with_s"]


def gpu_checks(*args: str, out: Path) -> subprocess.CompletedProcess:
    """benchmarks/gpu_checks.sh with this interpreter, its files to `out`."""
    return subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_checks.sh"), *args],
        env={**os.environ, "OUT": str(out), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.mark.slow
def test_gpu_checks_quick_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    """The device's one-call script at toy size: every step passes and leaves its file, and the
    overhead run trains the 100M config's precision (bf16-true) at toy size."""
    done = gpu_checks("--quick", out=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    for step in ("env", "tests", "probe-fp32", "probe-bf16", "overhead"):
        assert f"== {step}: exit 0" in done.stdout
    assert "== all steps passed" in done.stdout
    (fp32_file,) = tmp_path.glob("bench_probe-quick-*-fp32.json")  # *: the device's name
    (bf16_file,) = tmp_path.glob("bench_probe-quick-*-bf16.json")
    fp32, bf16 = json.loads(fp32_file.read_text()), json.loads(bf16_file.read_text())
    assert fp32["complete"]
    assert bf16["complete"]
    assert (fp32["env"]["dtype"], bf16["env"]["dtype"]) == ("float32", "bfloat16")
    assert len(fp32["precision"]) == 2
    assert bf16["precision"] == []  # the precision section runs once, in the fp32 run
    (overhead_file,) = tmp_path.glob("bench_overhead-quick-100m-bf16-*.json")
    overhead = json.loads(overhead_file.read_text())
    assert overhead["complete"]
    assert overhead["env"]["dtype"] == "bfloat16"
    assert overhead["params"]["config"]["precision"] == "bf16-true"
    assert overhead["params"]["config"]["layers"] == 2  # --quick's toy model
    assert overhead["snapshots"] >= 2
    assert "== all steps passed" in (tmp_path / "gpu_checks-quick.log").read_text()


def test_gpu_checks_refuses_an_unknown_step(tmp_path: Path) -> None:
    """A typo in --steps stops the script before anything runs, naming the steps."""
    done = gpu_checks("--quick", "--steps", "tests,probe", out=tmp_path)
    assert done.returncode == 2
    assert "unknown step 'probe'; the steps are env,tests,probe-fp32" in done.stderr
    assert not list(tmp_path.iterdir())


def test_bench_loop_quick_writes_its_json(tmp_path: Path) -> None:
    """bench_loop --quick times monitor.step between snapshots and a bounded logger copy."""
    result = run_quick("bench_loop.py", tmp_path / "loop.json")
    assert result["params"]["quick"] is True
    assert len(result["step_not_due_us"]) == len(result["bounded_copy_us"]) == 1
    assert result["median"]["step_not_due_us"] > 0
    assert result["median"]["bounded_copy_us"] > 0


@pytest.mark.slow
def test_bench_store_quick_writes_its_json(tmp_path: Path) -> None:
    """bench_store --quick: every write timed at each run length, and the report over each run."""
    result = run_quick("bench_store.py", tmp_path / "store.json")
    assert {"torch", "git", "threads"} <= set(result["env"])
    assert [r["snapshots"] for r in result["runs"]] == [20, 40]
    for run in result["runs"]:
        assert len(run["write_s"]) == len(run["write_cpu_s"]) == run["snapshots"]
        assert run["write_cpu_first_median_s"] > 0
        assert run["with_maps"] >= 2  # the first and the last, at least
        assert run["report_cpu_s"] > 0
