"""`write_report`: run directories in, a folder with paper-style figures and `index.html` out.

Reads stored snapshots only (never a model): each run's store becomes `RunData`, the figures
are drawn from it and written as PNG (and one GIF per run) next to the page, which links them
by relative name, so the folder works opened from disk, copied, or zipped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from regionwatch.errors import ConfigError
from regionwatch.report.curves import (
    CurvePanel,
    model_curves_figure,
    pairs_figure,
    relative_curves_figure,
)
from regionwatch.report.data import (
    MIN_ALIGN_GROUP,
    RunData,
    SnapshotData,
    curve_subset,
    group_by_alphas,
    load_run,
    one_off_label,
    run_name,
)
from regionwatch.report.maps import region_animation, region_strip_figure
from regionwatch.report.page import Image, RunSection, render_page
from regionwatch.report.style import save
from regionwatch.report.tokens import format_tokens
from regionwatch.report.trends import (
    alignment_over_tokens_figure,
    slope_by_model_figure,
    slope_over_tokens_figure,
)

logger = logging.getLogger(__name__)

INDEX_FILE = "index.html"
DEFAULT_MAX_CURVES = 8  # Fig. 4a stays readable up to about eight lines per panel
MIN_CURVES = 2  # the first and the last checkpoint
# A run mapping every snapshot of a long schedule would make a GIF of thousands of frames (too
# long to watch, and its time and size grow with the run): at most this many, log-spaced.
MAX_FRAMES = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def write_report(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    at_tokens: int | None = None,
    max_curves: int = DEFAULT_MAX_CURVES,
    progress: bool = True,
) -> Path:
    """Draw every report figure for one or more runs and write the HTML page that shows them.

    Args:
        run_dirs: run directories (`SnapshotStore`s); several runs share the max-slope axis
            when they were measured with the same number of alphas.
        out: the folder to write into (created; files of an earlier report are replaced).
        at_tokens: also draw the pairs figure (Fig. 2) at the snapshot nearest to this many
            tokens seen; the latest snapshot is always drawn.
        max_curves: the most checkpoints drawn per panel of Fig. 4a and the region-map strip.
        progress: show a progress bar over the snapshots read.

    Returns:
        The path of `index.html`.

    Raises:
        ConfigError: no run given, `max_curves` < 2, or `out` is a file or cannot be made.
        StoreError: a directory is not a run, or has no snapshots yet.
    """
    if not run_dirs:
        raise ConfigError("write_report: give at least one run directory")
    if max_curves < MIN_CURVES:
        raise ConfigError(f"write_report(max_curves={max_curves}): need >= {MIN_CURVES}")
    out = check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out} (out=...): cannot create the folder ({err})") from err
    runs = load_runs(run_dirs, progress=progress)
    overview, notes = _overview(runs, out, max_curves)
    sections = [_run_section(run, out, at_tokens=at_tokens, max_curves=max_curves) for run in runs]
    index = out / INDEX_FILE
    index.write_text(render_page(runs, overview, sections, notes=notes), encoding="utf-8")
    logger.info("report of %d run(s) written to %s", len(runs), index)
    return index


def check_out(out: str | Path) -> Path:
    """The report folder, refused when it is a file (checked before any run is read).

    Raises:
        ConfigError: `out` is a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--out {out} (out=...) is a file; the report is a folder of files: name a new or "
            "existing directory"
        )
    return out


def load_runs(run_dirs: Sequence[str | Path], *, progress: bool = True) -> list[RunData]:
    """Read every run; runs whose directories share a name get a numeric suffix."""
    runs: list[RunData] = []
    seen: set[str] = set()
    for run_dir in run_dirs:
        base = run_name(run_dir)
        name, n = base, 1
        while name in seen:  # e.g. a/run and b/run: file names and legends must differ
            n += 1
            name = f"{base}-{n}"
        seen.add(name)
        runs.append(load_run(run_dir, name=name, progress=progress))
    return runs


def curve_panel(run: RunData, max_curves: int) -> CurvePanel | None:
    """The Fig. 4a panel of a run: its readable subset of median curves over tokens, or None.

    Only snapshots with a place over tokens: one-off measurements go to `model_curves_figure`.
    """
    snapshots = [s for s in run.snapshots if s.median_curve is not None and s.placed]
    if not snapshots:
        return None
    chosen = [snapshots[i] for i in curve_subset([s.tokens for s in snapshots], max_curves)]
    return CurvePanel(
        label=run.label,
        alphas=chosen[0].alphas,
        tokens=np.array([s.tokens for s in chosen], dtype=np.float64),
        curves=np.stack([s.median_curve for s in chosen]),
    )


def _overview(runs: Sequence[RunData], out: Path, max_curves: int) -> tuple[list[Image], list[str]]:
    """The figures that put all runs on one axis: max slope, alignment, relative curves."""
    images, notes = _slope_images(runs, out)
    placed = [r for r in runs if r.placed.any()]
    if placed:
        save(
            alignment_over_tokens_figure([r.alignment_series() for r in placed]),
            out / "alignment.png",
        )
        images.append(
            Image(
                "alignment.png",
                "Semantic alignment over training (align/auc)",
                "Beyond the paper: the probability that a random pair whose prompts predict "
                "different next tokens has a larger max slope than a pair whose predictions "
                "agree. 0.5 = no information. Drawn from the first snapshot where both groups "
                f"hold {MIN_ALIGN_GROUP} pairs or more: early in training nearly every pair "
                "predicts the same next token, and an AUC over a handful of pairs is noise.",
            )
        )
    one_offs = [
        (r, s) for r in runs for s in r.snapshots if not s.placed and s.median_curve is not None
    ]
    if one_offs:
        save(
            model_curves_figure(
                [one_off_label(r.label, s.position_unknown, s.step) for r, s in one_offs],
                one_offs[0][1].alphas,
                np.stack([s.median_curve for _, s in one_offs]),
            ),
            out / "curves_models.png",
        )
        images.append(
            Image(
                "curves_models.png",
                "Median relative distance d(&alpha;)/d(1) per model",
                "Snapshots without a place in training (one-off measurements of saved models): "
                "one line per model. A straight line follows the diagonal; stable regions bend "
                "it into an S.",
            )
        )
    panels = [p for p in (curve_panel(r, max_curves) for r in runs) if p is not None]
    if panels:
        save(relative_curves_figure(panels), out / "curves.png")
        images.append(
            Image(
                "curves.png",
                "Median relative distance d(&alpha;)/d(1) per checkpoint",
                f"Paper Fig. 4a,b. At most {max_curves} checkpoints per run, log-spaced in "
                "tokens (always the first and the last), coloured by tokens seen. Random init "
                "follows the diagonal; stable regions bend it into an S.",
                wide=True,
            )
        )
    return images, notes


def _slope_images(runs: Sequence[RunData], out: Path) -> tuple[list[Image], list[str]]:
    """One max-slope figure per grid size S: slopes of different S never share an axis."""
    images: list[Image] = []
    notes: list[str] = []
    groups = group_by_alphas(runs)
    if len(groups) > 1:
        notes.append(
            "These runs were measured with different numbers of alphas S "
            f"({', '.join(str(k) for k in groups)}). A max slope depends on S (a perfect step "
            "gives S - 1; docs/method.md §4), so each S gets its own max-slope figure."
        )
        logger.warning("runs differ in num_alphas %s: one max-slope figure per S", list(groups))
    unplaced = [r.name for r in runs if not r.placed.all()]
    if unplaced:
        notes.append(
            f"{', '.join(unplaced)}: snapshots without a known place in training (one-off "
            "measurements of saved models, measured without --step/--tokens) are drawn apart, "
            "one point per model, never over tokens, and take no part in an init band or onset."
        )
    for size, members in groups.items():
        suffix = "" if len(groups) == 1 else f"_S{size}"
        points = [p for r in members for p in r.model_points()]
        if points:
            file = f"max_slope_models{suffix}.png"
            save(slope_by_model_figure(points, num_alphas=size), out / file)
            images.append(
                Image(
                    file,
                    f"Median max slope per model (S = {size})",
                    "A model comparison, like the paper's model-size figure: one point per "
                    "snapshot whose place in training is unknown, with bars from q25 to q75, "
                    "ordered by parameter count where recorded.",
                )
            )
        members = [r for r in members if r.placed.any()]
        if not members:
            continue
        file = f"max_slope{suffix}.png"
        save(slope_over_tokens_figure([r.slope_series() for r in members]), out / file)
        images.append(
            Image(
                file,
                f"Median max slope over training tokens (S = {size})",
                "Paper Fig. 4c / 3c. One line per run: the median over random pairs of the "
                "max slope of d(&alpha;)/d(1); bars from q25 to q75. 0 tokens (initialization) "
                "is drawn at the marked position left of the axis break. Shaded: each run's "
                "init band; dashed: its emergence onset.",
            )
        )
    return images, notes


def _run_section(run: RunData, out: Path, *, at_tokens: int | None, max_curves: int) -> RunSection:
    slug = _UNSAFE.sub("_", run.name)
    images: list[Image] = []
    chosen = [("latest", run.snapshots[-1])]
    picked = None if at_tokens is None else run.at(at_tokens)
    if picked is not None and picked.placed:  # named by the snapshot found, maybe not the asked
        chosen.append((f"at_{format_tokens(picked.tokens)}", picked))
    mapped = [s for s in run.snapshots if s.maps is not None]
    if mapped:  # first: the paper's Figure 1 is what a reader looks for
        images.extend(_map_images(run, mapped, out, slug, max_curves))
    for tag, snapshot in chosen:
        image = _pairs_image(run, snapshot, out / f"pairs_{slug}_{tag}.png")
        if image is not None:
            images.append(image)
    return RunSection(run=run, images=images)


def _pairs_image(run: RunData, snapshot: SnapshotData, path: Path) -> Image | None:
    if not {"similar", "dissimilar"} & set(snapshot.pairs):
        return None  # the run measured no labelled pairs
    when = snapshot.when
    save(pairs_figure(snapshot.alphas, snapshot.pairs, title=f"{run.label}, {when}"), path)
    return Image(
        path.name,
        f"Similar vs dissimilar pairs, {when}",
        "Paper Fig. 2. Left: d(&alpha;)/d(1) of every similar (blue) and dissimilar (orange) "
        "pair, medians bold. Middle: the normalized logit difference 1 - n(&alpha;) of the "
        "dissimilar pairs (0 = A's top token wins, 1 = B's) beside their median d(&alpha;)/d(1). "
        "Right (if any): the named pairs.",
        wide=True,
    )


def map_columns(
    mapped: Sequence[SnapshotData], max_curves: int
) -> tuple[list[int], list[float | str]]:
    """The region-map strip's columns: which snapshots, and every snapshot's title.

    A readable subset of the snapshots placed over tokens (titled by their tokens), then each
    one-off measurement, titled by what it is ("position in training unknown"), never "0".

    Returns:
        (indices into `mapped` of the strip's columns, title per snapshot of `mapped`).
    """
    placed = [i for i, s in enumerate(mapped) if s.placed]
    subset = [placed[i] for i in curve_subset([mapped[i].tokens for i in placed], max_curves)]
    subset += [i for i, s in enumerate(mapped) if not s.placed]
    return subset, [s.tokens if s.placed else s.when for s in mapped]


def _map_images(
    run: RunData, mapped: Sequence[SnapshotData], out: Path, slug: str, max_curves: int
) -> list[Image]:
    axis = mapped[0].maps.axis
    rgb = np.stack([s.maps.rgb for s in mapped])
    anchors = np.stack([s.maps.anchors for s in mapped])
    subset, titles = map_columns(mapped, max_curves)
    placed = any(s.placed for s in mapped)
    what = "over training (columns: tokens seen)" if placed else "(position in training unknown)"
    strip = region_strip_figure(
        axis, rgb[subset], anchors[subset], [titles[i] for i in subset],
        title=f"{run.label}: region maps {what}",
    )  # fmt: skip
    save(strip, out / f"maps_{slug}.png")
    frames = sorted(map_columns(mapped, MAX_FRAMES)[0])  # a GIF of thousands of frames: too long
    gif = region_animation(
        axis,
        rgb[frames],
        anchors[frames],
        [titles[i] for i in frames],
        [mapped[i].step for i in frames],
        out / f"maps_{slug}.gif",
    )
    how = (
        "Colour = 1 - D/max per channel (A red, B green, C blue): a pixel is reddish where the "
        "output in A's context stays near A's own. Columns &alpha;, rows &beta; "
        "(&beta; = -0.25 at the top); dots mark A (0, 0), B (1, 0) and C (t, 1)."
    )
    return [
        Image(
            f"maps_{slug}.png",
            "Region maps over training",
            f"Paper Fig. 1: one row per triple, one column per checkpoint (at most {max_curves}, "
            f"log-spaced). {how}",
            wide=True,
        ),
        Image(
            gif.name,
            "Region maps, animated",
            f"One frame per snapshot with maps ({len(frames)} of {len(mapped)}; at most "
            f"{MAX_FRAMES}, log-spaced). {how}",
        ),
    ]
