"""What a measurement is: its settings and its numbers.

`ProbeConfig` (with the checks of its values) says what a run measures; `Curves`, `RegionMaps`
and `Measurement` hold what was measured. How they are computed is `plan`'s and `measure`'s.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from torch import Tensor

from regionwatch import metrics
from regionwatch.errors import ConfigError, check_int, check_keys

MIN_ALPHAS = 3  # with 2 grid points every relative curve is a straight line
MIN_GRID = 3  # a 2x2 map has no interior to show a boundary in
DEFAULT_SPAN = (-0.25, 1.25)  # docs/method.md §5: a margin of a quarter segment around the anchors
# Region-map points per axis: a step of 1/16 over DEFAULT_SPAN, so A and B sit on pixel centres.
# A map costs 3 x grid^2 patched points per triple; 25 costs 0.46x of 37's and keeps a live run's
# snapshots within 3% of its training time (docs/method.md §8).
DEFAULT_GRID = 25


def check_alphas(num_alphas: int) -> None:
    """Refuse grids too coarse to show a jump."""
    hint = "2 points always give a straight line"
    check_int("num_alphas", num_alphas, minimum=MIN_ALPHAS, hint=hint)


def check_grid(grid: int, span: tuple[float, float]) -> None:
    """Refuse region-map grids that are too coarse or empty."""
    check_int("grid", grid, minimum=MIN_GRID)
    check_span(span)


def check_span(span: Any) -> tuple[float, float]:
    """The region-map axis range as two finite floats, low < high.

    Raises:
        ConfigError: not two numbers (a string, three values), not finite, or not increasing.
    """
    two_numbers = (
        isinstance(span, Sequence)
        and not isinstance(span, str)
        and len(span) == 2  # noqa: PLR2004
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in span)
    )
    if not two_numbers:
        raise ConfigError(
            f"span={span!r}: need two numbers (low, high) for the alpha and beta axes, "
            f"e.g. {DEFAULT_SPAN}"
        )
    low, high = float(span[0]), float(span[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(
            f"span={span!r}: need finite low < high (the map's grid spans it), e.g. {DEFAULT_SPAN}"
        )
    return low, high


def check_budget(max_batch_tokens: int | None) -> None:
    """Refuse a memory budget that cannot hold one token."""
    if max_batch_tokens is not None:
        check_int("max_batch_tokens", max_batch_tokens, minimum=1, hint="or None")


@dataclass(frozen=True)
class Curves:
    """Interpolation curves of P prompt pairs on a grid of K alphas (docs/method.md §4).

    Attributes:
        alphas: the grid a_k, [K].
        distance: d(a) = ||h(a) - h_A||, [P, K]; d(0) is round-off, not exactly 0.
        relative: d(a) / d(1), [P, K]; a row of NaN for pairs in `excluded`.
        max_slope: (K - 1) * max_k (r_{k+1} - r_k), [P]; NaN for excluded pairs.
        logit_diff: 1 - n_k, the normalized logit difference between A's and B's clean top
            tokens in A's patched context (docs/method.md §4.1), [P, K]; 0 at a = 0, 1 at a = 1, NaN
            where both prompts predict the same token.
        top_a: argmax of A's clean next-token logits, [P].
        top_b: argmax of B's clean next-token logits, [P].
    """

    alphas: Tensor
    distance: Tensor
    relative: Tensor
    max_slope: Tensor
    logit_diff: Tensor
    top_a: Tensor
    top_b: Tensor

    @property
    def excluded(self) -> Tensor:
        """Pairs whose d(1) <= `metrics.MIN_END_DISTANCE` (e.g. identical prompts), [P] bool."""
        return metrics.excluded(self.distance)


@dataclass(frozen=True)
class RegionMaps:
    """2-D slices through the write vectors of T prompt triples (docs/method.md §5, Figure 1).

    Attributes:
        axis: grid values used for both alpha and beta, [G].
        distance: D_A, D_B, D_C, each in its own prompt's context, [T, 3, G, G]; rows are beta
            (top to bottom), columns alpha (left to right).
        rgb: 1 - D / max per map and channel, [T, G, G, 3], channels (A, B, C) -> (R, G, B).
        anchors: (alpha, beta) of A, B and C in each plane, [T, 3, 2]: (0, 0), (1, 0), (t, 1).
    """

    axis: Tensor
    distance: Tensor
    rgb: Tensor
    anchors: Tensor


PAIR_PARTS = ("random", "similar", "dissimilar", "named")
PARTS = (*PAIR_PARTS, "maps")
Part = Literal["random", "similar", "dissimilar", "named", "maps"]


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """What one measurement computes; saved with the run so that resume and replay compute the same.

    Attributes:
        write_layer: block whose output is patched; 0 = after the first block (docs/method.md §2).
        num_alphas: interpolation grid points K; max slopes are only comparable at equal K.
        grid: region-map grid points per axis; any of 7, 13, 19, 25, 31, 37 ... puts A and B
            on pixel centres over the default span.
        span: region-map axis range for alpha and beta.
        parts: which parts of the probe set the run measures, a subset of `PARTS`; whether one
            snapshot draws the maps is `measure`'s `maps`, and what it measured is its result.
        max_batch_tokens: most tokens per forward pass (memory budget); None for the default.
        block_path: dotted path to the block list, for architectures without a table entry.
    """

    write_layer: int = 0
    num_alphas: int = 21
    grid: int = DEFAULT_GRID
    span: tuple[float, float] = DEFAULT_SPAN
    parts: tuple[Part, ...] = PARTS
    max_batch_tokens: int | None = None
    block_path: str | None = None

    def __post_init__(self) -> None:
        check_int("ProbeConfig.write_layer", self.write_layer, hint="0 = after the first block")
        _field_check("num_alphas", check_alphas, self.num_alphas)
        object.__setattr__(self, "span", _field_check("span", check_span, self.span))
        _field_check("grid", lambda g: check_grid(g, self.span), self.grid)
        _field_check("max_batch_tokens", check_budget, self.max_batch_tokens)
        parts = tuple(self.parts)
        unknown = [p for p in parts if p not in PARTS]
        if unknown or not parts or len(set(parts)) != len(parts):
            raise ConfigError(f"ProbeConfig.parts={self.parts!r}: need distinct names from {PARTS}")
        object.__setattr__(self, "parts", parts)
        if self.block_path is not None and not (
            isinstance(self.block_path, str) and self.block_path
        ):
            raise ConfigError(
                f"ProbeConfig.block_path={self.block_path!r}: need a dotted path or None"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as saved in a run's config.json."""
        out = asdict(self)
        out["span"] = list(self.span)
        out["parts"] = list(self.parts)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeConfig:
        """Rebuild a config; unknown keys are an error (a typo must not run another experiment)."""
        check_keys("ProbeConfig", data, (f.name for f in fields(cls)))
        values = dict(data)
        for key in ("span", "parts"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @property
    def fingerprint(self) -> str:
        """Hash of the settings that make numbers comparable across snapshots.

        Leaves out the memory budget and the parts: neither changes any number that was
        measured. Stored runs hold this hash, so what it covers must not change.
        """
        numbers = {
            k: v for k, v in self.to_dict().items() if k not in ("max_batch_tokens", "parts")
        }
        return hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()[:16]


def _field_check(name: str, check: Callable[[Any], Any], value: Any) -> Any:
    try:
        return check(value)
    except ConfigError as err:
        raise ConfigError(f"ProbeConfig.{name}: {err}") from None


@dataclass(frozen=True)
class Measurement:
    """Everything one probe of a model gives: curves per part, region maps, summary and timing.

    Attributes:
        config: the settings measured with.
        curves: per part ("random", "similar", "dissimilar", "named") that was measured.
        maps: region maps of the probe set's triples, or None.
        summary: headline scalars under docs/method.md §8's names (see `metrics.summary`).
        timing: seconds: `total`, `clean` (unpatched passes), `queries` (patched passes), and
            `part/<name>`: each part's share, its patched points' share of the query time plus
            its prompts' share of the clean time (all points cost the same single-token pass).
    """

    config: ProbeConfig
    curves: Mapping[str, Curves]
    maps: RegionMaps | None
    summary: Mapping[str, float]
    timing: Mapping[str, float]
