"""Headline numbers over training tokens: max slope (paper Fig. 4c / 3c) and semantic alignment.

Median max slope with quartile bars and the alignment score, one line per run on a shared log
tokens axis.

Runs of different model sizes compare on one axis, but only at equal grid size S: a max slope
depends on S (docs/method.md §4), so `slope_over_tokens_figure` refuses a mix rather than draw it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure

from regionwatch.errors import ConfigError
from regionwatch.report.data import ModelPoint, ScalarSeries, SlopeSeries, curve_subset
from regionwatch.report.style import PANEL_SIZE, RUN_COLOURS, new_figure, styled
from regionwatch.report.tokens import TokenAxis, format_tokens

CAPSIZE = 3
BAR_WIDTH = 1.3
BAR_ALPHA = 0.65
MARKER_SIZE = 5
LINE_WIDTH = 1.8
WIDE = 1.35  # the trend figures are wider than a curve panel: tokens span many decades
ONSET_STYLE = {"linestyle": "--", "linewidth": 1.2, "alpha": 0.8}
INIT_BAND_ALPHA = 0.08  # the init band is background for the onset, not a datum
NO_INFORMATION = 0.5  # an AUC of 0.5: max slope says nothing about the next token
STRAIGHT_LINE = 1.0  # max slope of a straight line, its lower bound (docs/method.md §4)
SLOPE_LABEL = "median max slope of d($\\alpha$)/d(1)  (per unit $\\alpha$)"
# Beyond this many snapshots a run's bars and markers merge into a block (a long every_steps
# run has thousands): the quartiles become a shaded band, with bars and markers at this many
# log-spaced snapshots on it.
MAX_BARS = 40
QUARTILE_BAND_ALPHA = 0.2


def slope_over_tokens_figure(
    series: Sequence[SlopeSeries],
    *,
    title: str | None = None,
) -> Figure:
    """Paper Fig. 4c / 3c: median max slope over tokens seen, q25..q75 bars, one line per run.

    A run of more than `MAX_BARS` snapshots draws its quartiles as a shaded band, and its bars
    and markers at `MAX_BARS` log-spaced snapshots, so that 2,000 points stay readable.

    0 tokens sits at the axis's marked position with a "0" tick (see `TokenAxis`). Each run's
    emergence onset, if any, is a dashed vertical line in the run's colour.

    Args:
        series: one per run, all with the same `num_alphas`.
        title: the figure's title; default names the grid size.

    Returns:
        The figure. Its axes hold one errorbar container per run (in order), whose data line
        is (axis position of tokens, median) and whose bars run from q25 to q75.

    Raises:
        ConfigError: no series, or series measured with different numbers of alphas.
    """
    sizes = sorted({s.num_alphas for s in series})
    if len(sizes) != 1:
        raise ConfigError(
            f"max slopes of grids with different numbers of alphas {sizes} cannot share an axis "
            "(a perfect step gives S - 1; docs/method.md §4): draw one figure per num_alphas"
        )
    axis = TokenAxis.spanning(np.concatenate([s.tokens for s in series]))
    colours = colormaps[RUN_COLOURS]
    width, height = PANEL_SIZE
    with styled():
        fig = new_figure(width * WIDE, height)
        ax = fig.subplots()
        onsets = []
        for i, s in enumerate(series):
            colour = colours(i % colours.N)
            if np.isfinite([s.init_q25, s.init_q75]).all():
                ax.axhspan(s.init_q25, s.init_q75, color=colour, alpha=INIT_BAND_ALPHA, linewidth=0)
            x = axis.x(s.tokens)
            shown = np.zeros(len(x), dtype=bool)
            shown[curve_subset(s.tokens, MAX_BARS)] = True
            if not shown.all():
                ax.fill_between(
                    x, s.q25, s.q75, color=colour, alpha=QUARTILE_BAND_ALPHA, linewidth=0
                )
            bars = ax.errorbar(
                x,
                s.median,
                yerr=np.stack([s.median - s.q25, s.q75 - s.median]),
                errorevery=shown,
                markevery=shown,
                color=colour,
                marker="o",
                markersize=MARKER_SIZE,
                linewidth=LINE_WIDTH,
                elinewidth=BAR_WIDTH,
                capsize=CAPSIZE,
                label=s.label,
            )
            for artist in (*bars.lines[1], *bars.lines[2]):
                artist.set_alpha(BAR_ALPHA)  # runs at the same tokens overlap: see through them
            if s.onset is not None:
                onsets.append(
                    ax.axvline(
                        axis.x([s.onset])[0],
                        color=colour,
                        **ONSET_STYLE,
                        label=f"onset at {format_tokens(s.onset)} tokens",
                    )
                )
        ax.axhline(STRAIGHT_LINE, color="0.5", linestyle=":", label="straight line (s = 1)")
        axis.apply(ax)
        ax.set_ylabel(SLOPE_LABEL)
        ax.set_title(
            title
            or f"Max slope over training (S = {sizes[0]} alphas)\nbars: q25-q75 over pairs; "
            + ("shaded: init band; " if any(np.isfinite(s.init_q75) for s in series) else "")
            + "dashed: emergence onset",
        )
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(handles)), key=lambda i: _legend_rank(handles[i], onsets))
        ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left")
    return fig


def slope_by_model_figure(points: Sequence[ModelPoint], *, num_alphas: int) -> Figure:
    """Median max slope per model, for snapshots of unknown place in training (one-off runs).

    A model comparison, like the paper's model-size figure: one labelled point per model with
    its q25..q75 bar, ordered by parameter count where recorded. No tokens axis, no init band,
    no onset: these snapshots have no place in a training run.

    Args:
        points: one per model, all measured with `num_alphas` alphas.
        num_alphas: the grid size S (named in the title; slopes compare only at equal S).

    Returns:
        The figure. Its axes hold one errorbar container per point (in the drawn order), whose
        data line is (position, median), and x tick labels naming the models.
    """
    ordered = sorted(points, key=lambda p: (not np.isfinite(p.parameters), p.parameters))
    colours = colormaps[RUN_COLOURS]
    width, height = PANEL_SIZE
    with styled():
        fig = new_figure(max(width, 1.2 * len(ordered) + 2), height)
        ax = fig.subplots()
        for i, p in enumerate(ordered):
            ax.errorbar(
                [i],
                [p.median],
                yerr=[[p.median - p.q25], [p.q75 - p.median]],
                color=colours(i % colours.N),
                marker="o",
                markersize=MARKER_SIZE,
                elinewidth=BAR_WIDTH,
                capsize=CAPSIZE,
                label=p.label,
            )
        ax.axhline(STRAIGHT_LINE, color="0.5", linestyle=":", label="straight line (s = 1)")
        ax.set_xticks(range(len(ordered)), [p.label for p in ordered], rotation=15, ha="right")
        ax.set_xlim(-0.6, len(ordered) - 0.4)
        ax.set_xlabel("model (position in training unknown)")
        ax.set_ylabel(SLOPE_LABEL)
        ax.set_title(f"Max slope per model (S = {num_alphas} alphas)\nbars: q25-q75 over pairs")
    return fig


def _legend_rank(handle: object, onsets: Sequence[object]) -> int:
    """Legend order: the runs, then their onsets, then reference lines."""
    if isinstance(handle, ErrorbarContainer):
        return 0
    return 1 if any(handle is onset for onset in onsets) else 2


def alignment_over_tokens_figure(
    series: Sequence[ScalarSeries],
    *,
    title: str = "Semantic alignment: does a steep pair change the next token?",
) -> Figure:
    """`align/auc` over tokens seen, one line per run, with the 0.5 "no information" line.

    The AUC is the probability that a pair whose prompts predict different next tokens has a
    larger max slope than a pair whose predictions agree (`metrics.alignment`): it rises
    above 0.5 as region boundaries come to separate predictions (docs/method.md §7.2 claim 7).

    Args:
        series: one per run (the AUC is rank-based, so it compares across grid sizes).
        title: the figure's title.

    Returns:
        The figure; one line per run (in order), then the 0.5 line.
    """
    axis = TokenAxis.spanning(np.concatenate([s.tokens for s in series]))
    colours = colormaps[RUN_COLOURS]
    width, height = PANEL_SIZE
    with styled():
        fig = new_figure(width * WIDE, height)
        ax = fig.subplots()
        for i, s in enumerate(series):
            ax.plot(
                axis.x(s.tokens),
                s.values,
                color=colours(i % colours.N),
                marker="o",
                markersize=MARKER_SIZE,
                markevery=curve_subset(s.tokens, MAX_BARS),  # thousands of markers: a smear
                linewidth=LINE_WIDTH,
                label=s.label,
            )
        ax.axhline(NO_INFORMATION, color="0.5", linestyle=":", label="0.5 = no information")
        ax.text(
            0.01,
            0.02,
            "drawn once both groups (top tokens differ / agree) hold enough pairs",
            transform=ax.transAxes,
            fontsize="small",
            color="0.4",
        )
        axis.apply(ax)
        ax.set_ylim(0, 1)
        ax.set_ylabel("alignment AUC (probability)")
        ax.set_title(title)
        ax.legend(loc="lower right")
    return fig
