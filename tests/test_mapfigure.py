"""One region-map panel: anchors inside the frame are dots in place, outside ones edge markers."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from regionwatch.mapfigure import (
    ANCHOR_AREA,
    EDGE_MARKER_AREA,
    anchor_legend,
    draw_map,
    frame_anchors,
    map_extent,
    move_anchors,
)

AXIS = np.linspace(-0.25, 1.25, 7)  # docs/method.md §5's span, 7 cells
RGB = np.random.default_rng(0).random((7, 7, 3))


def panel(anchors: np.ndarray) -> tuple[Figure, object]:
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    draw_map(ax, AXIS, RGB, anchors)
    return fig, ax


def test_anchors_inside_are_dots_at_their_place() -> None:
    """A, B at (0, 0), (1, 0) and C at (0.4, 1) lie inside: dots exactly there, plain labels."""
    anchors = np.array([[0.0, 0.0], [1.0, 0.0], [0.4, 1.0]])
    _, ax = panel(anchors)
    np.testing.assert_allclose([c.get_offsets()[0] for c in ax.collections], anchors)
    assert [c.get_sizes()[0] for c in ax.collections] == [ANCHOR_AREA] * 3
    assert anchor_legend([ax])[1] == ["anchor A", "anchor B", "anchor C"]


@pytest.mark.parametrize(
    ("anchor", "side", "at"),
    [
        ((0.4, 2.5), "below", (0.4, 1.375)),  # beta grows downwards
        ((0.4, -1.0), "above", (0.4, -0.375)),
        ((3.0, 0.5), "right", (1.375, 0.5)),
        ((-2.0, 4.0), "below", (-0.375, 1.375)),  # a corner: the farther side names it
    ],
)
def test_an_anchor_outside_is_an_edge_marker_on_the_frame(
    anchor: tuple[float, float], side: str, at: tuple[float, float]
) -> None:
    """C outside a fixed span sits on the frame's edge as a triangle, and the legend says so."""
    anchors = np.array([[0.0, 0.0], [1.0, 0.0], anchor])
    positions, sides = frame_anchors(anchors, AXIS)
    assert sides == [None, None, side]
    np.testing.assert_allclose(positions[2], at)
    left, right, bottom, top = map_extent(AXIS)
    assert left <= positions[2][0] <= right
    assert top <= positions[2][1] <= bottom
    _, ax = panel(anchors)
    dot = ax.collections[2]
    np.testing.assert_allclose(dot.get_offsets()[0], at)
    assert dot.get_sizes()[0] == EDGE_MARKER_AREA
    assert not dot.get_clip_on()  # drawn over the frame line, never cut away
    labels = anchor_legend([ax])[1]
    assert labels[:2] == ["anchor A", "anchor B"]
    assert "anchor C" in labels[2]
    assert "outside the frame" in labels[2]


def test_moving_anchors_updates_dots_and_edge_markers() -> None:
    """An animation frame moves each anchor, turning a dot into an edge marker and back."""
    _, ax = panel(np.array([[0.0, 0.0], [1.0, 0.0], [0.4, 1.0]]))
    move_anchors(ax, AXIS, np.array([[0.0, 0.0], [1.0, 0.0], [0.4, 9.0]]))
    np.testing.assert_allclose(ax.collections[2].get_offsets()[0], (0.4, 1.375))
    assert ax.collections[2].get_sizes()[0] == EDGE_MARKER_AREA
    move_anchors(ax, AXIS, np.array([[0.0, 0.0], [1.0, 0.0], [0.4, 1.0]]))
    np.testing.assert_allclose(ax.collections[2].get_offsets()[0], (0.4, 1.0))
    assert ax.collections[2].get_sizes()[0] == ANCHOR_AREA
