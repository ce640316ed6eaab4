"""Plain-text tables the verbs print: max-slope quartiles, and snapshots over tokens."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from regionwatch.onset import Onset


def slope_table(summary: Mapping[str, float]) -> str:
    """Quartiles of max slope per pair set, one row each, and the excluded and near-linear pairs."""
    rows = [("max slope", "q25", "median", "q75")]
    for label, prefix in (("random", ""), ("similar", "similar_"), ("dissimilar", "dissimilar_")):
        if f"max_slope/{prefix}median" in summary:
            rows.append(
                (label, *(num(summary[f"max_slope/{prefix}{q}"]) for q in ("q25", "median", "q75")))
            )
    extra = []
    if "pairs/excluded" in summary:
        extra.append(f"excluded pairs (d(1) <= 0.01): {int(summary['pairs/excluded'])}")
    if "max_slope/frac_linear" in summary:
        extra.append(f"near-linear pairs: {num(summary['max_slope/frac_linear'])}")
    return "\n".join([aligned(rows), *extra])


def tokens_table(records: list[Mapping[str, Any]], damaged: Mapping[str, str] | None = None) -> str:
    """One row per snapshot: tokens, step, max-slope quartiles, similar vs dissimilar medians.

    With `damaged` (file -> reason, from `SnapshotStore.verify`), a last column says each file's
    state. A one-off measurement's unknown step and tokens print as "unknown", never as 0.
    """
    header = ("tokens", "step", "q25", "median", "q75", "similar", "dissimilar", "maps")
    rows = [header + (("file",) if damaged is not None else ())]
    for r in records:
        unknown = r.get("position_unknown", ())
        row = (
            "unknown" if "tokens" in unknown else f"{r['tokens']:,}",
            "unknown" if "step" in unknown else str(r["step"]),
            *(num(r.get(f"max_slope/{q}")) for q in ("q25", "median", "q75")),
            num(r.get("max_slope/similar_median")),
            num(r.get("max_slope/dissimilar_median")),
            "yes" if "maps" in r.get("parts", ()) else "",
        )
        rows.append(row + ((damaged.get(r.get("file", ""), "ok"),) if damaged is not None else ()))
    return aligned(rows)


def onset_line(onset: Onset) -> str:
    """The run's emergence onset and the init band it was measured against, or why there is none."""
    text = onset.describe(lambda tokens: f"{int(tokens):,}")
    baseline = onset.baseline
    if baseline is None:
        return f"emergence onset: {text}"
    band = f"init band {num(baseline.q25)}-{num(baseline.q75)} from {baseline.origin}"
    return f"emergence onset: {text} ({band})"


def aligned(rows: list[tuple[str, ...]]) -> str:
    """Columns padded to a common width: the first left-aligned, the others right-aligned."""
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, width, strict=True))
        ).rstrip()
        for r in rows
    )


def tokens(text: str) -> int:
    """The argparse type of a token count: "2T", "4.2M", "1e9", 1000 (argparse names it "tokens").

    Raises:
        ConfigError: not a count (a ValueError: argparse says "invalid tokens value").
    """
    from regionwatch.report.tokens import parse_tokens  # lazy: the package loads matplotlib

    return parse_tokens(text)


def num(value: float | None) -> str:
    """Three decimals; "nan" for a missing or undefined number."""
    return "nan" if value is None or math.isnan(value) else f"{value:.3f}"
