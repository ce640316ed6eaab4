"""Interpolation-curve figures: median curves per checkpoint (Fig. 4a,b), labelled pairs (Fig. 2).

Both take plain arrays (see `regionwatch.report.data`) and return a `Figure`; medians come from
`metrics.median_curve`, the one home of that number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from regionwatch import metrics
from regionwatch.palette import PAIR_COLOURS
from regionwatch.report.data import PairCurves
from regionwatch.report.style import PANEL_SIZE, TOKENS_CMAP, new_figure, styled
from regionwatch.report.tokens import TokenAxis, format_tokens

CURVE_WIDTH = 1.8
PAIR_ALPHA = 0.25  # single pairs are context for the bold median, not the message
PAIR_WIDTH = 0.8
MEDIAN_WIDTH = 2.6
DIAGONAL = {"color": "0.45", "linestyle": ":", "linewidth": 1.2}
ALPHA_LABEL = "$\\alpha$ (interpolation weight: 0 = prompt A, 1 = prompt B)"
NAMED_COLOURS = "tab10"
LOGIT_STYLE = "--"  # dashed: the logit difference beside the solid distance curve it mirrors


@dataclass(frozen=True)
class CurvePanel:
    """One run's median relative curves at chosen checkpoints (one panel of Fig. 4a,b).

    Attributes:
        label: the panel title (run name and model).
        alphas: the grid, [K].
        tokens: tokens seen of each drawn checkpoint, ascending, [n].
        curves: median d(a)/d(1) per checkpoint, [n, K] (`metrics.median_curve`).
    """

    label: str
    alphas: np.ndarray
    tokens: np.ndarray
    curves: np.ndarray


def relative_curves_figure(
    panels: Sequence[CurvePanel],
    *,
    title: str = "Median relative distance along the path from A to B over training",
) -> Figure:
    """Paper Fig. 4a,b: one panel per run, one median curve per checkpoint, coloured by tokens.

    A random-init model draws the diagonal; training bends it into an S (docs/method.md §7.2 claims
    1-3). Colours share one log norm over every panel, so equal colours mean equal tokens.

    Args:
        panels: one per run.
        title: the figure's title.

    Returns:
        The figure: each panel's lines are the curves (in order) and then the diagonal.
    """
    all_tokens = np.concatenate([p.tokens for p in panels])
    axis = TokenAxis.spanning(all_tokens)
    norm = LogNorm(vmin=axis.zero, vmax=max(axis.high, axis.zero * 10))
    cmap = colormaps[TOKENS_CMAP]
    width, height = PANEL_SIZE
    with styled():
        fig = new_figure(width * len(panels) + 1.2, height)
        axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        for ax, panel in zip(axes, panels, strict=True):
            for tokens, curve in zip(panel.tokens, panel.curves, strict=True):
                colour = cmap(norm(axis.x([tokens])[0]))
                ax.plot(
                    panel.alphas,
                    curve,
                    color=colour,
                    linewidth=CURVE_WIDTH,
                    label=format_tokens(tokens),
                )
            ax.plot([0, 1], [0, 1], **DIAGONAL, label="$\\alpha$ (straight line)")
            ax.set_xlim(0, 1)
            ax.set_title(panel.label)
            ax.set_xlabel(ALPHA_LABEL)
            ax.legend(title="tokens seen", loc="upper left", ncols=1 + len(panel.tokens) // 6)
        axes[0].set_ylabel("median d($\\alpha$) / d(1) over random pairs")
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, pad=0.01)
        bar.set_label("training tokens seen (log scale; 0 = initialization)")
        positions, labels = axis.ticks()
        bar.set_ticks(positions, labels=labels)
        bar.ax.minorticks_off()
        fig.suptitle(title)
    return fig


def model_curves_figure(
    labels: Sequence[str],
    alphas: np.ndarray,
    curves: np.ndarray,
    *,
    title: str = "Median relative distance along the path from A to B, per model",
) -> Figure:
    """Median relative curves of snapshots of unknown place in training, one line per model.

    The model-comparison side of Fig. 4a: lines are named by model, not coloured by tokens
    seen, since a one-off measurement has no tokens seen to colour by.

    Args:
        labels: one per curve: the model (run name and model).
        alphas: the grid, [K].
        curves: median d(a)/d(1) per model, [n, K] (`metrics.median_curve`).
        title: the figure's title.

    Returns:
        The figure: its lines are the curves (in order) and then the diagonal.
    """
    colours = colormaps[NAMED_COLOURS]
    width, height = PANEL_SIZE
    with styled():
        fig = new_figure(width, height)
        ax = fig.subplots()
        for i, (label, curve) in enumerate(zip(labels, curves, strict=True)):
            ax.plot(alphas, curve, color=colours(i % colours.N), linewidth=CURVE_WIDTH, label=label)
        ax.plot([0, 1], [0, 1], **DIAGONAL, label="$\\alpha$ (straight line)")
        ax.set_xlim(0, 1)
        ax.set_xlabel(ALPHA_LABEL)
        ax.set_ylabel("median d($\\alpha$) / d(1) over random pairs")
        ax.legend(title="model (position unknown)", loc="upper left")
        ax.set_title(title)
    return fig


def pairs_figure(
    alphas: np.ndarray,
    pairs: Mapping[str, PairCurves],
    *,
    title: str,
) -> Figure:
    """Paper Fig. 2: similar vs dissimilar pairs at one checkpoint, and the logit difference.

    Left: d(a)/d(1) of every similar and dissimilar pair (thin) and their medians (bold);
    similar pairs should stay near the diagonal, dissimilar ones jump (docs/method.md §7.2 claim 5).
    Middle: 1 - n(a) of the dissimilar pairs, with their median d(a)/d(1) dashed for comparison:
    the prediction should flip where the distance jumps. Right (when the probe set has named
    pairs, e.g. the paper's S1-S3 / D1-D3): each named pair's d(a)/d(1), and its 1 - n(a) dashed.

    Args:
        alphas: the grid, [K].
        pairs: curves per part: "similar", "dissimilar" and optionally "named".
        title: the figure's title (say which run and checkpoint).

    Returns:
        The figure.
    """
    named = pairs.get("named")
    count = 3 if named is not None and len(named.relative) else 2
    width, height = PANEL_SIZE
    with styled():
        fig = new_figure(width * count, height)
        axes = fig.subplots(1, count, squeeze=False)[0]
        _pair_distances(axes[0], alphas, pairs)
        _logit_panel(axes[1], alphas, pairs.get("dissimilar"))
        if count == 3:  # noqa: PLR2004 - the optional third panel
            _named_panel(axes[2], alphas, named)
        for ax in axes:
            ax.plot([0, 1], [0, 1], **DIAGONAL, label="$\\alpha$ (straight line)")
            ax.set_xlim(0, 1)
            ax.set_xlabel(ALPHA_LABEL)
            ax.legend(loc="upper left")
        fig.suptitle(title)
    return fig


def _pair_distances(ax: Axes, alphas: np.ndarray, pairs: Mapping[str, PairCurves]) -> None:
    for kind in ("similar", "dissimilar"):
        if kind not in pairs or not len(pairs[kind].relative):
            continue
        relative = pairs[kind].relative
        colour = PAIR_COLOURS[kind]
        for row in relative:
            ax.plot(alphas, row, color=colour, alpha=PAIR_ALPHA, linewidth=PAIR_WIDTH)
        ax.plot(
            alphas,
            _median(relative),
            color=colour,
            linewidth=MEDIAN_WIDTH,
            label=f"{kind} pairs: median of {len(relative)}",
        )
    ax.set_title("Relative distance: similar vs dissimilar pairs")
    ax.set_ylabel("d($\\alpha$) / d(1)")


def _logit_panel(ax: Axes, alphas: np.ndarray, dissimilar: PairCurves | None) -> None:
    ax.set_title("Normalized logit difference: dissimilar pairs")
    ax.set_ylabel("1 - n($\\alpha$)  (0 = A's top token, 1 = B's)")
    if dissimilar is None or not len(dissimilar.relative):
        return
    colour = PAIR_COLOURS["dissimilar"]
    # A pair whose prompts predict the same top token has no logit difference (NaN row).
    defined = dissimilar.logit_diff[np.isfinite(dissimilar.logit_diff).any(axis=1)]
    for row in defined:
        ax.plot(alphas, row, color=colour, alpha=PAIR_ALPHA, linewidth=PAIR_WIDTH)
    if len(defined):
        ax.plot(
            alphas,
            _median(defined),
            color=colour,
            linewidth=MEDIAN_WIDTH,
            label=f"1 - n($\\alpha$): median of {len(defined)} with different top tokens",
        )
    ax.plot(
        alphas,
        _median(dissimilar.relative),
        color="black",
        linestyle=LOGIT_STYLE,
        linewidth=CURVE_WIDTH,
        label=f"d($\\alpha$) / d(1): median of {len(dissimilar.relative)}",
    )


def _named_panel(ax: Axes, alphas: np.ndarray, named: PairCurves) -> None:
    colours = colormaps[NAMED_COLOURS]
    for i, (name, kind) in enumerate(zip(named.names, named.kinds, strict=True)):
        colour = colours(i % colours.N)
        logits = named.logit_diff[i]
        same_top = not np.isfinite(logits).any()
        label = f"{name} ({kind}{'; same top token' if same_top else ''})"
        ax.plot(alphas, named.relative[i], color=colour, linewidth=CURVE_WIDTH, label=label)
        if not same_top:
            ax.plot(
                alphas,
                logits,
                color=colour,
                linestyle=LOGIT_STYLE,
                linewidth=PAIR_WIDTH * 1.5,
                label=f"{name}: 1 - n($\\alpha$)",
            )
    ax.set_title("Named pairs: d($\\alpha$)/d(1) solid, 1 - n($\\alpha$) dashed")
    ax.set_ylabel("d($\\alpha$) / d(1)  or  1 - n($\\alpha$)")


def _median(values: np.ndarray) -> np.ndarray:
    """Elementwise median over pairs, ignoring NaN pairs (`metrics.median_curve`)."""
    return metrics.median_curve(torch.from_numpy(np.asarray(values))).numpy()
