"""Region-map figures (paper Fig. 1): strips of each triple's map over tokens, and a GIF.

Every panel is `mapfigure.draw_map`: the stored colours as docs/method.md §5 renders them, with the
anchors A, B, C as dots, or as edge markers where a fixed span leaves one outside the frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from regionwatch.mapfigure import anchor_legend, draw_map, move_anchors
from regionwatch.report.style import MAP_PANEL, new_figure, styled
from regionwatch.report.tokens import format_tokens

GIF_DPI = 100  # frames stay small on disk; the PNG strip is the high-resolution version
GIF_COLOURS = 256  # a GIF frame's palette holds at most 256 colours
FRAME_MS = 700  # each snapshot's frame
HOLD_MS = 2500  # the last frame lingers before the loop restarts
TITLE_ROOM = 0.7  # inches above the panels for titles
LEGEND_ROOM = 0.5  # inches below the panels for the anchor legend


def region_strip_figure(
    axis: np.ndarray,
    rgb: np.ndarray,
    anchors: np.ndarray,
    tokens: Sequence[float | str],
    *,
    title: str,
) -> Figure:
    """Paper Fig. 1: each triple's region map over checkpoints, side by side.

    One row per triple, one column per checkpoint, each column titled with its tokens seen.

    Args:
        axis: grid values, [G].
        rgb: stored colours per checkpoint and triple, [n, T, G, G, 3].
        anchors: (alpha, beta) of A, B, C per checkpoint and triple, [n, T, 3, 2].
        tokens: tokens seen per checkpoint, [n]; words instead for a snapshot of unknown
            position (e.g. "position unknown"), its column's title as given.
        title: the figure's title.

    Returns:
        The figure; `fig.axes[row * n + column]` shows triple `row` at checkpoint `column`.
    """
    count, triples = rgb.shape[:2]
    with styled():
        fig = new_figure(MAP_PANEL * count + 0.6, MAP_PANEL * triples + TITLE_ROOM + LEGEND_ROOM)
        axes = fig.subplots(triples, count, squeeze=False, sharex=True, sharey=True)
        for row in range(triples):
            for col in range(count):
                ax = axes[row, col]
                draw_map(ax, axis, rgb[col, row], anchors[col, row])
                if row == 0:
                    ax.set_title(_column_title(tokens[col]))
                if row == triples - 1:
                    ax.set_xlabel("$\\alpha$")
            axes[row, 0].set_ylabel(f"triple {row + 1}\n$\\beta$")
        _anchor_legend(fig, axes.ravel())
        fig.suptitle(title)
    return fig


def region_frame_figure(
    axis: np.ndarray,
    rgb: np.ndarray,
    anchors: np.ndarray,
    *,
    title: str,
    dpi: float = GIF_DPI,
) -> Figure:
    """Every triple's map at one checkpoint in a row: one frame of the animation.

    Args:
        axis: grid values, [G].
        rgb: stored colours per triple, [T, G, G, 3].
        anchors: anchor positions per triple, [T, 3, 2].
        title: the frame's title (tokens seen and step).
        dpi: resolution; the figure's pixel size is fixed by it, so every frame matches.

    Returns:
        The figure; `fig.axes[i]` shows triple i.
    """
    triples = len(rgb)
    with styled():
        fig = new_figure(MAP_PANEL * triples + 0.6, MAP_PANEL + TITLE_ROOM + LEGEND_ROOM)
        fig.set_dpi(dpi)
        axes = fig.subplots(1, triples, squeeze=False)[0]
        for i, ax in enumerate(axes):
            draw_map(ax, axis, rgb[i], anchors[i])
            ax.set_title(f"triple {i + 1}")
            ax.set_xlabel("$\\alpha$")
        axes[0].set_ylabel("$\\beta$")
        _anchor_legend(fig, axes)
        fig.suptitle(title)
    return fig


def region_animation(
    axis: np.ndarray,
    rgb: np.ndarray,
    anchors: np.ndarray,
    tokens: Sequence[float | str],
    steps: Sequence[int],
    path: str | Path,
    *,
    frame_ms: int = FRAME_MS,
    hold_ms: int = HOLD_MS,
) -> Path:
    """Write an animated GIF of the region maps over tokens: one frame per snapshot.

    Args:
        axis: grid values, [G].
        rgb: colours per snapshot and triple, [n, T, G, G, 3].
        anchors: anchor positions per snapshot and triple, [n, T, 3, 2].
        tokens: tokens seen per snapshot, [n]; words for one of unknown position (its title).
        steps: global step per snapshot, [n].
        path: the GIF file to write.
        frame_ms: how long each frame shows.
        hold_ms: how long the last frame shows before the loop restarts.

    Returns:
        The path written.
    """
    fig = region_frame_figure(axis, rgb[0], anchors[0], title=_frame_title(tokens[0], steps[0]))
    frames = [_image(fig)]
    # One figure for every frame: the layout of the first frame is kept (so frames align and
    # no layout is recomputed) and only the pixels, dots and title change.
    fig.set_layout_engine("none")
    for i in range(1, len(rgb)):
        for triple, ax in enumerate(fig.axes):
            ax.images[0].set_data(rgb[i, triple])
            move_anchors(ax, axis, anchors[i, triple])
        fig.suptitle(_frame_title(tokens[i], steps[i]))
        frames.append(_image(fig))
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    path = Path(path)
    frames[0].save(
        path,
        save_all=True,
        append_images=frames[1:],
        duration=durations,
        loop=0,  # forever
        optimize=False,  # keep every frame: optimizing may merge near-identical ones
    )
    return path


def _frame_title(tokens: float | str, step: int) -> str:
    if isinstance(tokens, str):  # a snapshot of unknown position: no place in training
        return f"Region maps, {tokens}"
    return f"Region maps at {format_tokens(tokens)} tokens seen (step {step})"


def _column_title(tokens: float | str) -> str:
    return tokens if isinstance(tokens, str) else format_tokens(tokens)


def _anchor_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    handles, labels = anchor_legend(axes)
    fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), frameon=False)


def _image(fig: Figure) -> Image.Image:
    """The figure rendered at its own dpi, as a 256-colour frame with its own palette.

    Max-coverage quantization keeps every colour within a few levels of the figure's; Pillow's
    default median cut shifted the anchor dots' fills by up to a third of the range.
    """
    with styled():
        fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    rgb = Image.fromarray(rgba[..., :3].copy())
    return rgb.quantize(GIF_COLOURS, method=Image.Quantize.MAXCOVERAGE)
