"""bench_probe's tables: the issue's targets, the console tables and the markdown of a result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from harness import QUIET
from probe_models import GIGA

# Targets, interpolate / floor at a prompt length: the demo model (a 4x256 GPT-2 with the demo's
# 2048-token vocabulary, any pair count; issue 23) and 12-layer models with 16 pairs (issue 13).
DEMO_VOCAB, TARGET_PAIRS = 2048, 16
TARGETS: tuple[tuple[str, Callable[[dict[str, Any]], bool], dict[int, float]], ...] = (
    (
        "demo",
        lambda r: r["arch"] == "gpt2" and r["size"] == "4x256" and r.get("vocab") == DEMO_VOCAB,
        {10: 2.6, 128: 1.1},
    ),
    (
        "12-layer",
        lambda r: r["size"].startswith("12x") and r["pairs"] == TARGET_PAIRS,
        {10: 3.0, 128: 1.35},
    ),
)
MIB = 2**20


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row a target applies to, against both floors."""
    rows = []
    for name, applies, limits in TARGETS:
        for r in results:
            limit = limits.get(r["length"])
            if limit is None or not applies(r):
                continue
            ratios = r["ratios"]
            rows.append(
                {
                    "target": name,
                    "arch": r["arch"],
                    "size": r["size"],
                    "pairs": r["pairs"],
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
    if "smollm2" in result:
        real, names = result["smollm2"], ("floor_forward", "snapshot", "snapshot_maps")
        v, ratios = real["variants"], real["ratios"]
        print(
            f"\nsmollm2 ({real['prompts']} prompts, {real['alphas']} alphas, grid {real['grid']}): "
            + ", ".join(f"{n} {v[n]['median_s']:.2f} s" for n in names)
            + f"; x floor {ratios['snapshot_vs_floor_forward']:.1f} (no maps), "
            f"{ratios['snapshot_maps_vs_floor_forward']:.1f} (maps); peak MiB beyond the model "
            + " / ".join(_mib(v[n]["peak_extra_bytes"]) for n in names)
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
        f"transformers {env['transformers']}, commit {(env['git']['commit'] or 'unknown')[:8]}"
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
    lines += [
        "",
        "| arch | size | pairs | T | prompt tokens/s: floor_forward / floor_min / interpolate "
        "| probe points/s | % of matmul rate: floor_forward / floor_min / interpolate |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for r in result["interpolate"]:
        v = r["variants"]
        rates = " / ".join(f"{v[n]['prompt_tokens_per_s']:.0f}" for n in v)
        shares = " / ".join(f"{v[n]['pct_of_matmul_rate']:.1f}" for n in v)
        lines.append(
            f"| {r['arch']} | {r['size']} | {r['pairs']} | {r['length']} | {rates} "
            f"| {v['interpolate']['points_per_s']:.0f} | {shares} |"
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
