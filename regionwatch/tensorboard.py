"""The TensorBoard sink: each Snapshot as scalars, histograms, curve figures and region-map images.

The step axis is **tokens seen** (`Snapshot.tokens`, an int64 event step, so 5e10 tokens are
fine), never the host's global step. That is why the sink writes to a TensorBoard run of its own,
`<run_dir>/tensorboard` (`TB_SUBDIR`), and never into the trainer's writer: a run mixing
token-indexed and step-indexed scalars would draw both on one meaningless x axis. The view
regionwatch prints (`view_hint`) serves the run directory, whose only TensorBoard run is this
one: every tag on one axis (tokens), each image once, and the trainer's loss beside the max
slope, copied onto tokens by the drivers as `regionwatch/train/loss`. The copies in the
trainer's own loggers sit at its global step and are named `regionwatch_step/...`
(`step_tag`), so a view of the trainer's log dir never draws one tag on two x axes either. The
writer is `torch.utils.tensorboard.SummaryWriter`, whatever logger the host uses (Lightning's may
be tensorboardX's), and it opens lazily on the first write, so a sink that never writes leaves
no file.

What one snapshot writes, at global_step = tokens seen (tags are a file format, STYLE.md §2.2):

- `regionwatch/<key>` for every key of `Snapshot.summary` (docs/method.md §8: `max_slope/median`,
  `max_slope/q25`, `max_slope/q75`, `max_slope/similar_median`, `max_slope/frac_linear`,
  `dist/d1_median`, `pairs/excluded`, ...); NaN and infinite values are skipped.
- `regionwatch/probe/seconds` (the probe's total time) and `regionwatch/probe/<part>_seconds`.
- `regionwatch/max_slope_hist/{random,similar,dissimilar}`: histograms of the finite max slopes.
- `regionwatch/curves/random` and `regionwatch/curves/similar_dissimilar`: figures of the median
  r(a) over pairs with its q25..q75 band per alpha and the straight line r = a dashed for
  reference; random pairs on one, similar and dissimilar pairs together on the other.
- `regionwatch/maps/triple_<i>`: the region map of triple i (docs/method.md §5) with its axes and
  anchor legend, one tag per triple so that TensorBoard's image slider shows the regions forming
  over tokens.
- `regionwatch/train/loss` (`write_scalars`, from the drivers at the trainer's logging steps): the
  trainer's loss at the tokens seen then.
- Once per writer, a custom-scalars layout: max slope median with its q25/q75 margin for each pair
  set, and similar vs dissimilar medians on one chart.

Scalars are TensorBoard's float32 `simple_value`. Double-precision tensor scalars would keep more
digits, but TensorBoard 2.21's fast data server does not list them at all and the classic
`EventAccumulator` does not purge them on resume (both checked); exact numbers live in the store.

Resume: `purge_after_tokens` writes a purge marker so that TensorBoard drops every event past the
restored token count, and curves never double back.

Viewing: TensorBoard keeps only 10 images per tag unless started with `--samples_per_plugin
images=N`; `tensorboard_command` builds the command with N at least the number of snapshots, and
`view_hint` adds the address to open, `VIEW_URL`, with smoothing off (the time-series dashboard
reads `?smoothing=` from its address; nothing in an event file can set it). Never
use `images=0`: it is often said to keep everything, but TensorBoard 2.21 then downsamples every
image series to zero samples and the image dashboard serves no image at all (checked in
tests/test_tensorboard.py against a real server).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shlex
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TypeVar

import matplotlib as mpl
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from regionwatch import metrics
from regionwatch.errors import check_int
from regionwatch.mapfigure import anchor_legend, draw_map
from regionwatch.palette import PAIR_COLOURS
from regionwatch.snapshot import Snapshot

T = TypeVar("T")

logger = logging.getLogger(__name__)

TB_SUBDIR = "tensorboard"  # events live in <run_dir>/tensorboard, a TensorBoard run of their own
TAG_ROOT = "regionwatch"  # every tag is regionwatch/<group>/<metric> (STYLE.md §2.2)
# The copies in the trainer's own loggers sit at its global step, so they are named apart from
# the token-axis tags: a view holding both runs must never draw one tag on two x axes.
STEP_ROOT = "regionwatch_step"
TRAIN_GROUP = "train"  # the trainer's loss, copied onto the token axis: regionwatch/train/loss
# TensorBoard's time-series dashboard reads its smoothing from this query parameter; its
# default, 0.6, turns a log-spaced noisy series on a linear axis into a smooth rise (the dip
# below init and the spike survive only in the faint raw line). The event file cannot set it.
VIEW_URL = "http://localhost:6006/?smoothing=0#timeseries"
PAIR_SETS = (
    "random",
    "similar",
    "dissimilar",
)  # labelled pair sets; "named" user pairs are too few

# TensorBoard's own default is 10 images per tag. A live run keeps adding snapshots after the
# command is printed, so the hint never goes below a log-spaced schedule's usual size.
MIN_IMAGE_SAMPLES = 100


# Curve figures, by name (the tag is regionwatch/curves/<name>) -> the pair sets drawn on it.
# Random pairs alone are the paper's headline figure; similar and dissimilar pairs share one, as
# in the paper's examples figure (claim 5: one set stays linear, the other jumps). Two figures,
# not three: matplotlib's ~50 ms per figure is most of the sink's time.
CURVE_FIGURES = MappingProxyType(
    {"random": ("random",), "similar_dissimilar": ("similar", "dissimilar")}
)
# 640 x 480 pixels, readable in TensorBoard's image card without zooming.
FIGURE_INCHES = (6.4, 4.8)
FIGURE_DPI = 100
FIGURE_MARGINS = MappingProxyType({"left": 0.12, "right": 0.97, "bottom": 0.12, "top": 0.92})
# A region map is square, with its anchor legend below it: 480 x 540 pixels.
MAP_FIGURE_INCHES = (4.8, 5.4)
MAP_MARGINS = MappingProxyType({"left": 0.15, "right": 0.95, "bottom": 0.2, "top": 0.93})
# Type one step above matplotlib's 10 pt: TensorBoard shows an image card smaller than its pixels.
FIGURE_RC = MappingProxyType(
    {
        "font.size": 13,
        "axes.titlesize": 13,
        "axes.labelsize": 13,
        "legend.fontsize": 12,
        "xtick.labelsize": 12,
        "ytick.labelsize": 12,
    }
)
ALPHA = "\N{GREEK SMALL LETTER ALPHA}"  # spelled out: ruff flags a literal one as ambiguous
BETA = "\N{GREEK SMALL LETTER BETA}"
X_LABEL = f"{ALPHA} (interpolation weight)"
Y_LABEL = f"d({ALPHA})/d(1)"  # relative distance, unitless: output distances over d(1)
BAND_ALPHA = 0.25  # opacity of the q25..q75 bands
GRID_ALPHA = 0.3  # faint grid lines

# Scaled units for figure titles: "50B tokens" reads faster than 50,000,000,000 on a slider.
_COUNT_UNITS = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))


def tag(key: str) -> str:
    """The TensorBoard tag of a summary key or run-level scalar: `regionwatch/<key>`."""
    return f"{TAG_ROOT}/{key}"


def step_tag(name: str) -> str:
    """The name of a copy at the trainer's global step: `regionwatch/x` -> `regionwatch_step/x`."""
    return STEP_ROOT + name.removeprefix(TAG_ROOT)


def layout() -> dict[str, dict[str, list[str | list[str]]]]:
    """The custom-scalars layout: each pair set's median max slope in its q25..q75 margin.

    Returns:
        `SummaryWriter.add_custom_scalars`'s form: {category: {chart title: [kind, tags]}}.
    """
    charts: dict[str, list[str | list[str]]] = {
        "max slope, random pairs (median, q25..q75)": [
            "Margin",
            [tag("max_slope/median"), tag("max_slope/q25"), tag("max_slope/q75")],
        ]
    }
    for name in PAIR_SETS[1:]:
        charts[f"max slope, {name} pairs (median, q25..q75)"] = [
            "Margin",
            [tag(f"max_slope/{name}_{q}") for q in ("median", "q25", "q75")],
        ]
    charts["max slope, similar vs dissimilar (medians)"] = [
        "Multiline",
        [tag("max_slope/similar_median"), tag("max_slope/dissimilar_median")],
    ]
    charts["training loss (the trainer's, on tokens)"] = ["Multiline", [tag(f"{TRAIN_GROUP}/loss")]]
    return {TAG_ROOT: charts}


def tags(snapshot: Snapshot) -> list[str]:
    """Every tag `TensorBoardSink.write` logs for `snapshot`, in the order it writes them."""
    return [
        *scalars(snapshot),
        *_histograms(snapshot),
        *(tag(f"curves/{name}") for name in _curve_figures(snapshot)),
        *(tag(f"maps/triple_{i}") for i in range(_map_count(snapshot))),
    ]


def view_hint(logdir: str | Path, *, snapshots: int) -> str:
    """What to run and open to watch a run: `tensorboard_command`, then `VIEW_URL`."""
    return f"{tensorboard_command(logdir, snapshots=snapshots)} and open {VIEW_URL}"


def tensorboard_command(logdir: str | Path, *, snapshots: int) -> str:
    """The shell command that shows every region-map snapshot in TensorBoard.

    TensorBoard keeps 10 images per tag by default; the slider would skip snapshots. N is at
    least `snapshots` and never 0 (see the module docstring for why `images=0` shows nothing).

    Args:
        logdir: the directory to serve: the run directory (its only TensorBoard run is the
            token-axis one, with the trainer's loss copied onto tokens).
        snapshots: how many snapshots the run has or will have.

    Returns:
        `tensorboard --logdir <logdir> --samples_per_plugin images=<N>`, shell-quoted.

    Raises:
        ConfigError: `snapshots` is not an int >= 0.
    """
    check_int("snapshots", snapshots, hint="the run's snapshot count")
    samples = max(snapshots, MIN_IMAGE_SAMPLES)
    return f"tensorboard --logdir {shlex.quote(str(logdir))} --samples_per_plugin images={samples}"


class TensorBoardSink:
    """Writes snapshots to a TensorBoard run of their own whose step axis is tokens seen.

    Opens a `torch.utils.tensorboard.SummaryWriter` in `log_dir` on the first write and flushes
    after every snapshot (snapshots are rare; users watch them arrive). Only the process that
    owns the run should make one (the monitor guards rank zero). After `close`, a write opens a
    new event file in the same directory.

    Args:
        log_dir: directory of the event files, by convention `<run_dir>/TB_SUBDIR`; created if
            missing. Keep it apart from the trainer's own event files.
        purge_after_tokens: on resume, the token count restored from the checkpoint: TensorBoard
            then hides every earlier event with a step (tokens) above it. None for a fresh run.
        run_scalars: run-level scalars (e.g. `onset/tokens`) to log with every snapshot, asked
            for at each write; None: none.

    Raises:
        ConfigError: `purge_after_tokens` is not an int >= 0 or None.

    Example:
        >>> sink = TensorBoardSink(run_dir / TB_SUBDIR)
        >>> sink.write(snapshot)  # step = snapshot.tokens
        >>> sink.write_scalars({"onset/tokens": 2.5e9}, tokens=snapshot.tokens)
        >>> sink.close()
    """

    name = "tensorboard"  # a `sinks.Sink`, written on the background writer
    placement = "background"

    def __init__(
        self,
        log_dir: str | Path,
        *,
        purge_after_tokens: int | None = None,
        run_scalars: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        if purge_after_tokens is not None:
            hint = "the restored token count, or None for a fresh run"
            check_int("purge_after_tokens", purge_after_tokens, hint=hint)
        self.log_dir = Path(log_dir)
        self.purge_after_tokens = purge_after_tokens
        self._run_scalars = run_scalars
        self._writer: SummaryWriter | None = None
        self._purge_pending = purge_after_tokens is not None
        self._last_tokens: int | None = None
        self._written: set[str] = set()  # tags written at `_last_tokens`

    def _open(self) -> SummaryWriter:
        if self._writer is None:
            # SummaryWriter hides events with step >= purge_step, so + 1 keeps the restored
            # snapshot itself. Only the first writer purges: a reopen after close must not hide
            # what this process has just written.
            purge_step = self.purge_after_tokens + 1 if self._purge_pending else None
            self._writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)
            self._purge_pending = False
            self._writer.add_custom_scalars(layout())
            logger.debug("tensorboard: opened %s (purge_step=%s)", self.log_dir, purge_step)
        return self._writer

    def write(
        self,
        snapshot: Snapshot,
        rendered: Mapping[str, np.ndarray] | None = None,
        *,
        run_scalars: Mapping[str, float] | None = None,
    ) -> None:
        """Log everything of one snapshot at global_step = `snapshot.tokens`, then flush once.

        A second write at the same tokens (the final snapshot retaken to draw its region maps)
        adds only the tags the first did not have: TensorBoard would show both points.

        A failed write (a full disk, a dead event-writer thread) closes the writer and raises;
        the next write opens a new event file, so the sink recovers once the disk takes writes
        again instead of failing for the rest of the run.

        A snapshot whose tokens seen are unknown (`Snapshot.position_unknown`) has no place on
        the axis: it is not written (a warning says so), never drawn at 0 tokens.

        Args:
            snapshot: the snapshot; its tokens should exceed the last written ones.
            rendered: `images(snapshot)` when the caller already has them (they are shared
                with the trainer's loggers); None renders them here.
            run_scalars: run-level scalars to log with it, as `write_scalars` does, under the
                same flush (one flush per snapshot: each flush is a disk write); None: the
                sink's own `run_scalars`, if any.
        """
        if not snapshot.on_tokens_axis:  # its stored 0 is a slot: never a point at 0 tokens
            logger.warning(
                "tensorboard: the snapshot of step slot %d has no known tokens seen (a one-off "
                "measurement); it has no place on the tokens axis and is not written",
                snapshot.step,
            )
            return
        started = time.perf_counter()
        step = int(snapshot.tokens)
        if run_scalars is None and self._run_scalars is not None:
            run_scalars = self._run_scalars()
        with self._discarding_on_error():
            writer = self._open()
            self._check_order(step)
            new = self._new_tags
            for name, value in new(scalars(snapshot)).items():
                writer.add_scalar(name, value, step)
            for name, values in new(_histograms(snapshot)).items():
                writer.add_histogram(name, values, step)
            for name, pixels in new(images(snapshot) if rendered is None else rendered).items():
                writer.add_image(name, pixels, step, dataformats="HWC")
            runs = new({tag(key): (key, value) for key, value in (run_scalars or {}).items()})
            _add_run_scalars(writer, dict(runs.values()), step)
            writer.flush()
        logger.debug(
            "tensorboard: snapshot at tokens=%d written in %.3f s",
            step,
            time.perf_counter() - started,
        )

    def write_scalars(self, values: Mapping[str, float], *, tokens: int) -> None:
        """Log run-level scalars (e.g. `onset/tokens`) as `regionwatch/<key>` at step `tokens`.

        Args:
            values: scalars by key; NaN and infinite ones are skipped.
            tokens: tokens seen, the step to log them at.
        """
        with self._discarding_on_error():
            writer = self._open()
            _add_run_scalars(writer, values, int(tokens))
            writer.flush()

    def flush(self) -> None:
        """Write pending events to disk (nothing to do before the first write)."""
        if self._writer is not None:
            with self._discarding_on_error():
                self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; a later write opens a new one."""
        if self._writer is not None:
            with self._discarding_on_error():
                self._writer.close()
            self._writer = None

    @contextlib.contextmanager
    def _discarding_on_error(self) -> Iterator[None]:
        """On any error, drop the writer (so the next write opens a fresh one) and re-raise.

        `SummaryWriter` writes on a thread of its own; once that thread hits an error (ENOSPC),
        every later call re-raises it, close included. Without this the sink would stay dead
        for the rest of the run, and the error would surface again at teardown.
        """
        try:
            yield
        except BaseException:
            writer, self._writer = self._writer, None
            if writer is not None:
                try:
                    writer.close()
                except OSError as err:  # its thread died of the error being re-raised below
                    logger.debug("tensorboard: closing the failed writer: %r", err)
            raise

    def __enter__(self) -> TensorBoardSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _new_tags(self, values: Mapping[str, T]) -> dict[str, T]:
        """The items of `values` not yet written at this step, now counted as written."""
        fresh = {name: value for name, value in values.items() if name not in self._written}
        self._written.update(fresh)
        return fresh

    def _check_order(self, step: int) -> None:
        if step == self._last_tokens:
            return  # the same snapshot again: `write` adds only what is new
        self._written = set()
        # TensorBoard treats a step before the last one as a restart and hides later points.
        if self._last_tokens is not None and step < self._last_tokens:
            logger.warning(
                "tensorboard: snapshot at tokens=%d does not follow the last one written "
                "(tokens=%d); TensorBoard will show the curve restarting there",
                step,
                self._last_tokens,
            )
        self._last_tokens = step


def _add_run_scalars(writer: SummaryWriter, values: Mapping[str, float], step: int) -> None:
    for key, value in values.items():
        if _finite(key, value):
            writer.add_scalar(tag(key), float(value), step)


def _finite(key: str, value: float) -> bool:
    if math.isfinite(value):
        return True
    logger.debug("tensorboard: %s is %s; not logged", key, value)
    return False


def scalars(snapshot: Snapshot) -> dict[str, float]:
    """Summary scalars and probe timing by tag, finite values only."""
    values = {tag(key): value for key, value in snapshot.summary.items()}
    timing = snapshot.measurement.timing
    if "total" in timing:
        values[tag("probe/seconds")] = timing["total"]
    for key, seconds in timing.items():
        if key.startswith("part/"):
            values[tag(f"probe/{key.removeprefix('part/')}_seconds")] = seconds
    return {name: float(v) for name, v in values.items() if _finite(name, v)}


def images(snapshot: Snapshot) -> dict[str, np.ndarray]:
    """Every image of a snapshot by tag: its curve figures, then its region maps (RGB, HWC).

    Rendered once per snapshot and shared by every sink that takes images (TensorBoard, the
    trainer's loggers): matplotlib is most of a snapshot's write time.
    """
    out = {tag(f"curves/{name}"): curve_image(snapshot, name) for name in _curve_figures(snapshot)}
    for i in range(_map_count(snapshot)):
        out[tag(f"maps/triple_{i}")] = map_image(snapshot, i)
    return out


def _histograms(snapshot: Snapshot) -> dict[str, Tensor]:
    """Finite max slopes of each measured pair set by tag; sets without one are left out."""
    out = {}
    for part in PAIR_SETS:
        curves = snapshot.measurement.curves.get(part)
        if curves is None:
            continue
        slopes = curves.max_slope[torch.isfinite(curves.max_slope)]
        if slopes.numel():
            out[tag(f"max_slope_hist/{part}")] = slopes.double()
        else:
            logger.debug("tensorboard: no finite max slope among %s pairs; no histogram", part)
    return out


def _curve_figures(snapshot: Snapshot) -> list[str]:
    """Names of the curve figures with at least one measured pair set."""
    measured = snapshot.measurement.curves
    return [name for name, parts in CURVE_FIGURES.items() if any(p in measured for p in parts)]


def _map_count(snapshot: Snapshot) -> int:
    maps = snapshot.measurement.maps
    return 0 if maps is None else len(maps.rgb)


def _short_count(count: int) -> str:
    for size, unit in _COUNT_UNITS:
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)


def curve_image(snapshot: Snapshot, name: str) -> np.ndarray:
    """Render one curve figure: the median relative distance of its pair sets, with IQR bands.

    Per pair set, the median r(a) over kept pairs (`metrics.median_curve`) and its q25..q75
    band per alpha; the straight line r = a, what a network without regions gives, is dashed.
    Drawn on a bare `Figure` with the Agg canvas, so the user's pyplot state and backend are
    never touched.

    Args:
        snapshot: the snapshot.
        name: a key of `CURVE_FIGURES` whose pair sets the snapshot measured at least one of.

    Returns:
        RGB pixels, uint8 [height, width, 3] (FIGURE_INCHES at FIGURE_DPI).
    """
    with mpl.rc_context(FIGURE_RC):
        return _draw_curves(snapshot, name)


def _draw_curves(snapshot: Snapshot, name: str) -> np.ndarray:
    fig = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.5", linewidth=1, label=f"r = {ALPHA} (linear)")
    counts = []
    for part in CURVE_FIGURES[name]:
        curves = snapshot.measurement.curves.get(part)
        if curves is None:
            continue
        rel = curves.relative.double()  # [P, K]; excluded pairs are rows of NaN
        alphas = curves.alphas.double().numpy()
        low, high = (band.numpy() for band in metrics.quartile_band(rel))
        kept = int((~curves.excluded).sum())
        colour = PAIR_COLOURS[part]
        ax.fill_between(alphas, low, high, color=colour, alpha=BAND_ALPHA, linewidth=0)
        median = metrics.median_curve(rel).numpy()
        ax.plot(alphas, median, color=colour, marker=".", label=f"{part}: median, q25..q75")
        counts.append(f"{kept}/{len(rel)} {part}")
    ax.set_xlim(0, 1)
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    ax.set_title(
        f"{_short_count(snapshot.tokens)} tokens seen; pairs kept: {', '.join(counts)}",
        fontsize="medium",
    )
    ax.grid(alpha=GRID_ALPHA)
    ax.legend(loc="upper left")
    # Fixed margins: tight_layout would double the time of a figure that never changes layout.
    fig.subplots_adjust(**FIGURE_MARGINS)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def map_image(snapshot: Snapshot, index: int) -> np.ndarray:
    """The region map of one triple as a figure: axes, anchors and their legend (docs/method.md §5).

    Drawn by `mapfigure.draw_map`, as the report draws it: an anchor outside the frame is an
    edge marker pointing to where it lies, named in the legend.

    Args:
        snapshot: a snapshot with region maps.
        index: the triple, 0-based.

    Returns:
        RGB pixels, uint8 [height, width, 3] (MAP_FIGURE_INCHES at FIGURE_DPI).
    """
    maps = snapshot.measurement.maps
    assert maps is not None  # callers check _map_count
    with mpl.rc_context(FIGURE_RC):
        fig = Figure(figsize=MAP_FIGURE_INCHES, dpi=FIGURE_DPI)
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        rgb = maps.rgb[index].double().clamp(0, 1).numpy()  # [G, G, 3]
        draw_map(ax, maps.axis.double().numpy(), rgb, maps.anchors[index].double().numpy())
        ax.set_xlabel(f"{ALPHA} (A at 0, B at 1)")
        ax.set_ylabel(f"{BETA} (C at 1)")
        ax.set_title(f"triple {index}: {_short_count(snapshot.tokens)} tokens seen")
        handles, labels = anchor_legend([ax])
        fig.legend(handles, labels, loc="lower center", ncols=len(handles), frameon=False)
        fig.subplots_adjust(**MAP_MARGINS)
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()
