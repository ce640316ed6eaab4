"""Reports: paper-style figures and an HTML page drawn from a run's stored snapshots only.

`write_report` is the entry point (and `regionwatch report` its command line). The package has
one module per concept: `data` turns stores into plain arrays, `tokens` owns the tokens axis,
`curves`, `trends` and `maps` draw the figures (each function takes plain data and returns a
`matplotlib.figure.Figure`), `page` writes `index.html`, `build` ties them together.

Example:
    >>> from regionwatch.report import write_report
    >>> write_report(["runs/gpt2-small", "runs/gpt2-medium"], "report/")  # -> report/index.html
"""

from __future__ import annotations

from regionwatch.report.build import write_report
from regionwatch.report.curves import CurvePanel, pairs_figure, relative_curves_figure
from regionwatch.report.data import (
    MapData,
    PairCurves,
    RunData,
    ScalarSeries,
    SlopeSeries,
    SnapshotData,
    curve_subset,
    load_run,
)
from regionwatch.report.maps import region_animation, region_frame_figure, region_strip_figure
from regionwatch.report.tokens import TokenAxis, format_tokens, parse_tokens
from regionwatch.report.trends import alignment_over_tokens_figure, slope_over_tokens_figure

__all__ = [
    "CurvePanel",
    "MapData",
    "PairCurves",
    "RunData",
    "ScalarSeries",
    "SlopeSeries",
    "SnapshotData",
    "TokenAxis",
    "alignment_over_tokens_figure",
    "curve_subset",
    "format_tokens",
    "load_run",
    "pairs_figure",
    "parse_tokens",
    "region_animation",
    "region_frame_figure",
    "region_strip_figure",
    "relative_curves_figure",
    "slope_over_tokens_figure",
    "write_report",
]
