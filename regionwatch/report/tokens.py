"""The training-tokens axis of every report figure: labels ("4.2M"), parsing, and the marked 0.

Tokens seen grow over many decades, so figures draw them on a log axis (docs/method.md §7.1). The
initialization snapshot has 0 tokens, which a log axis cannot show; like the paper (which draws 0
tokens at 1e9, left of its 4B checkpoint) we draw it at a marked position half a decade left of
the smallest positive count, with a tick labelled "0" and a break mark between the two.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import LogLocator, NullFormatter

from regionwatch.errors import ConfigError

# Suffixes of `format_tokens`, largest first; K/M/B/T as training logs write token counts.
UNITS = (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3))
SIGNIFICANT = 3  # "4.2M", "123K", "3.05T": enough to tell checkpoints apart on a slide
# Where 0 tokens is drawn: this many decades left of the smallest positive count (method.md §7.1
# draws 0 at 1e9 with 4B as its first checkpoint, about half a decade).
ZERO_OFFSET_DECADES = 0.5
# Axis limits sit this many decades beyond the outermost points, so markers are not clipped.
PAD_DECADES = 0.25
MIN_DECADE_TICKS = 2  # fewer decade ticks than this in range: tick the data's own end points
MINOR_SUBS = (2, 3, 4, 5, 6, 7, 8, 9)  # minor ticks at 2..9 times each decade
DEFAULT_ONE = 1.0  # the position of 0 when a run has no positive token count at all
_TOKENS_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMBT]?)\s*$", re.IGNORECASE)


def format_tokens(tokens: float) -> str:
    """A token count as a short label: 0 -> "0", 4_200_000 -> "4.2M", 1e10 -> "10B".

    Three significant digits, trailing zeros dropped, the largest unit that keeps the number
    at least 1 (the rounding happens first, so 999_999 gives "1M", not "1000K").

    Args:
        tokens: a count >= 0 (floats are accepted: axis positions).

    Returns:
        The label.
    """
    if tokens <= 0:
        return "0"
    rounded = float(f"{tokens:.{SIGNIFICANT}g}")
    for suffix, size in UNITS:
        if rounded >= size:
            return f"{rounded / size:.{SIGNIFICANT}g}{suffix}"
    return f"{rounded:.{SIGNIFICANT}g}"


def parse_tokens(text: str) -> int:
    """Read a token count written as `format_tokens` writes it ("10B", "4.2M", "0", "1e9").

    Args:
        text: digits with an optional K/M/B/T suffix (any case).

    Returns:
        The count, rounded to an integer.

    Raises:
        ConfigError: not a count (a ValueError, so argparse reports it as a bad value).
    """
    match = _TOKENS_RE.match(text)
    if match is None:
        raise ConfigError(
            f"tokens {text!r}: give a count like 1000000, 1e6, 4.2M, 10B (suffixes K, M, B, T)"
        )
    value = float(match.group(1)) * dict(UNITS).get(match.group(2).upper(), 1)
    return round(value)


@dataclass(frozen=True)
class TokenAxis:
    """A log axis of tokens seen with a marked position for 0 tokens.

    Attributes:
        zero: where 0 tokens is drawn: half a decade left of `low` (1 if nothing is positive).
        low: the smallest positive token count shown (`zero` if none).
        high: the largest token count shown (`zero` if none).
        marks_zero: the axis shows a 0-token point, ticked "0".
        has_positive: the axis shows positive counts (with decade ticks).
    """

    zero: float
    low: float
    high: float
    marks_zero: bool = True
    has_positive: bool = True

    @classmethod
    def spanning(cls, tokens: Iterable[float]) -> TokenAxis:
        """The axis that shows every count in `tokens` (of one or several runs)."""
        values = np.asarray(list(tokens), dtype=np.float64)
        positive = values[values > 0]
        if positive.size == 0:  # only initialization snapshots so far
            return cls(zero=DEFAULT_ONE, low=DEFAULT_ONE, high=DEFAULT_ONE, has_positive=False)
        low, high = float(positive.min()), float(positive.max())
        if positive.size == values.size:  # no 0-token point: nothing to mark
            return cls(zero=low, low=low, high=high, marks_zero=False)
        return cls(zero=low / 10**ZERO_OFFSET_DECADES, low=low, high=high)

    def x(self, tokens: Iterable[float]) -> np.ndarray:
        """Axis positions of token counts: the count itself, or `zero` for 0 tokens."""
        values = np.asarray(list(tokens), dtype=np.float64)
        return np.where(values > 0, values, self.zero)

    def ticks(self) -> tuple[list[float], list[str]]:
        """Tick positions and labels: "0" at `zero`, then decades (or the end points) in range."""
        positions, labels = ([self.zero], [format_tokens(0)]) if self.marks_zero else ([], [])
        if self.has_positive:
            decades = LogLocator(base=10).tick_values(self.low, self.high)
            inside = [float(t) for t in decades if self.low <= t <= self.high]
            if len(inside) < MIN_DECADE_TICKS:
                inside = sorted({self.low, self.high})
            positions += inside
            labels += [format_tokens(t) for t in inside]
        return positions, labels

    def apply(self, ax: Axes, *, label: str = "training tokens seen (log scale)") -> None:
        """Make `ax`'s x axis this one: log scale, limits, "0" tick and a break mark after it."""
        ax.set_xscale("log")
        pad = 10**PAD_DECADES
        ax.set_xlim(self.zero / pad, self.high * pad)
        positions, labels = self.ticks()
        ax.set_xticks(positions, labels)
        # Minor ticks only right of the break: left of it the axis is not to scale.
        minor = LogLocator(base=10, subs=MINOR_SUBS).tick_values(self.low, self.high * pad)
        minor = [float(t) for t in minor if self.low <= t <= self.high * pad]
        ax.set_xticks(minor if self.has_positive else [], minor=True)
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minors would crowd
        ax.set_xlabel(label)
        if self.marks_zero and self.has_positive:
            self.mark_break(ax)

    def mark_break(self, ax: Axes) -> None:
        """A "//" on the x axis between the 0 point and the first positive count: not to scale."""
        middle = math.sqrt(self.zero * self.low)
        ax.axvline(middle, color="0.8", linewidth=0.8, linestyle=":", zorder=0)
        ax.annotate(
            "//",
            xy=(middle, 0),
            xycoords=("data", "axes fraction"),
            ha="center",
            va="center",
            fontsize=9,
            color="0.35",
            annotation_clip=False,
        )
