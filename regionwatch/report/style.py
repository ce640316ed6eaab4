"""The look shared by every report figure: sizes, resolution, fonts, and a fresh Agg figure.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas, never through pyplot, so a
report leaves matplotlib's global state (current figure, backend) untouched and can run in any
process, including a training job's.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import matplotlib as mpl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 150  # slides: a 6.4-inch-wide panel is 960 px, sharp on a projector, small on disk
PANEL_SIZE = (6.0, 4.4)  # inches per curve panel
MAP_PANEL = 2.2  # inches per region-map panel (square)
# Fonts one step above matplotlib's default 10 pt: figures are read off slides.
RC = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
RUN_COLOURS = "tab10"  # one colour per run on shared axes
TOKENS_CMAP = "viridis"  # curves coloured by tokens seen (log-normed)


def new_figure(width: float, height: float) -> Figure:
    """A figure with an Agg canvas and constrained layout; call it inside `styled()`."""
    fig = Figure(figsize=(width, height), layout="constrained", facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def styled() -> AbstractContextManager[None]:
    """The report's rc settings for building and drawing a figure, restored on exit.

    Artists read their defaults when created, and ticks are created again when drawn, so both
    the figure functions and `save` run inside it.
    """
    return mpl.rc_context(RC)


def save(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG at the report's resolution."""
    with styled():
        fig.savefig(path, dpi=DPI, facecolor="white")
    return path
