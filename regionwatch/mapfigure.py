"""One region-map panel (docs/method.md §5), drawn the same way in TensorBoard and in the report.

Columns are alpha left to right, rows are beta top to bottom (beta = the axis's low end at the
top); the extent reaches half a cell beyond the outer grid values so that cell centres sit on
grid values. A, B, C are dots filled with their own channel at 1 and the others at 0.5, edged at
0.5 and 0. An anchor outside the frame (a fixed `span` narrower than the triple) is never
dropped silently: it is drawn on the frame's edge as a triangle pointing towards where it lies,
and its legend entry says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.markers import MarkerStyle

from regionwatch.palette import ANCHOR_EDGE, ANCHOR_FILL

ANCHOR_NAMES = ("A", "B", "C")  # coloured by palette.ANCHOR_FILL / ANCHOR_EDGE (docs/method.md §5)
ANCHOR_AREA = 40  # points^2, the paper figure's marker area
EDGE_MARKER_AREA = 70  # a triangle reads as small as a dot at a larger area
ANCHOR_EDGE_WIDTH = 1.0
HALF_CELL = 0.5
MAP_TICKS = (0.0, 0.5, 1.0)
DOT = "o"
# Which way an out-of-frame anchor lies -> the triangle pointing there. Beta grows downwards.
EDGE_MARKERS = {"left": "<", "right": ">", "above": "^", "below": "v"}
OUTSIDE = "outside the frame"


def map_extent(axis: np.ndarray) -> tuple[float, float, float, float]:
    """The `imshow` extent (left, right, bottom, top), beta growing downwards (docs/method.md §5).

    Half a cell beyond the first and last grid values, so that cell centres are grid values.
    """
    g0, g1 = float(axis[0]), float(axis[-1])
    margin = HALF_CELL * (g1 - g0) / (len(axis) - 1)
    return (g0 - margin, g1 + margin, g1 + margin, g0 - margin)


def frame_anchors(anchors: np.ndarray, axis: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
    """Where to draw each anchor: its own place, or the nearest point on the frame's edge.

    Args:
        anchors: (alpha, beta) of A, B, C, [3, 2].
        axis: the map's grid values, [G].

    Returns:
        Positions [3, 2] inside the extent, and per anchor None (inside) or the side it lies
        beyond ("left", "right", "above", "below"; the farther one for a corner).
    """
    left, right, _, _ = map_extent(axis)
    low, high = left, right  # alpha and beta share one grid
    positions = np.clip(np.asarray(anchors, dtype=float), low, high)
    sides: list[str | None] = []
    for alpha, beta in np.asarray(anchors, dtype=float):
        beyond = {
            "left": low - alpha,
            "right": alpha - high,
            "above": low - beta,  # beta = low is the top row
            "below": beta - high,
        }
        side, distance = max(beyond.items(), key=lambda item: item[1])
        sides.append(side if distance > 0 else None)
    return positions, sides


def anchor_label(name: str, side: str | None) -> str:
    """The legend entry of one anchor: its name, and where it lies when outside the frame."""
    return f"anchor {name}" if side is None else f"anchor {name} {OUTSIDE} ({side})"


def anchor_legend(axes: Sequence[Axes]) -> tuple[list[Artist], list[str]]:
    """One legend entry per anchor over panels drawn by `draw_map`, edge markers noted.

    An anchor inside every panel reads "anchor C"; one outside some panel's frame reads
    "anchor C (dot; a triangle on the edge: outside the frame)", with the dot as its handle.
    """
    entries: dict[str, Artist] = {}
    outside: set[str] = set()
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            name = label.split()[1]
            if OUTSIDE in label:
                outside.add(name)
                entries.setdefault(name, handle)
            elif name not in entries or name in outside:
                entries[name] = handle  # prefer a dot as the handle
    labels = [
        f"anchor {name}" + (f" (\u25b6 on the edge: {OUTSIDE})" if name in outside else "")
        for name in entries
    ]
    return list(entries.values()), labels


def draw_map(ax: Axes, axis: np.ndarray, rgb: np.ndarray, anchors: np.ndarray) -> None:
    """One region map: the stored colours [G, G, 3] and the anchors [3, 2], with ticks.

    Each anchor is one `PathCollection` in `ax.collections`, in the order A, B, C.
    """
    ax.imshow(rgb, extent=map_extent(axis), origin="upper", interpolation="nearest")
    positions, sides = frame_anchors(anchors, axis)
    for (alpha, beta), side, name, fill, edge in zip(
        positions, sides, ANCHOR_NAMES, ANCHOR_FILL, ANCHOR_EDGE, strict=True
    ):
        ax.scatter(
            [alpha],
            [beta],
            s=ANCHOR_AREA if side is None else EDGE_MARKER_AREA,
            c=[fill],
            marker=DOT if side is None else EDGE_MARKERS[side],
            edgecolors=[edge],
            linewidths=ANCHOR_EDGE_WIDTH,
            zorder=3,
            clip_on=False,  # an edge marker sits on the frame, half outside it
            label=anchor_label(name, side),
        )
    left, right, bottom, top = map_extent(axis)
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)  # bottom > top: the beta axis points down
    ax.set_xticks(MAP_TICKS)
    ax.set_yticks(MAP_TICKS)
    ax.set_aspect("equal")
    ax.grid(visible=False)


def move_anchors(ax: Axes, axis: np.ndarray, anchors: np.ndarray) -> None:
    """Move the anchors `draw_map` drew on `ax` to new positions (an animation's next frame)."""
    positions, sides = frame_anchors(anchors, axis)
    dots = [c for c in ax.collections if isinstance(c, PathCollection)]
    for dot, position, side in zip(dots, positions, sides, strict=True):
        marker = MarkerStyle(DOT if side is None else EDGE_MARKERS[side])
        dot.set_offsets([position])
        dot.set_paths([marker.get_path().transformed(marker.get_transform())])
        dot.set_sizes([ANCHOR_AREA if side is None else EDGE_MARKER_AREA])
