"""Reports: figures drawn from stored runs show the stored numbers; the page works from disk.

Runs are synthetic stores whose curves are known (tests/support/report_runs.py) plus one tiny real
measurement; every figure test asserts on the plotted data, read back from the artists.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import LineCollection
from matplotlib.container import ErrorbarContainer
from PIL import Image

from regionwatch import metrics
from regionwatch.cli import main
from regionwatch.errors import ConfigError, StoreError
from regionwatch.mapfigure import ANCHOR_AREA
from regionwatch.measurement import ProbeConfig
from regionwatch.onset import record_onset
from regionwatch.palette import ANCHOR_EDGE, ANCHOR_FILL
from regionwatch.report import (
    TokenAxis,
    curve_subset,
    format_tokens,
    load_run,
    pairs_figure,
    parse_tokens,
    region_animation,
    region_strip_figure,
    relative_curves_figure,
    slope_over_tokens_figure,
    write_report,
)
from regionwatch.report.build import curve_panel, load_runs
from regionwatch.report.data import MIN_ALIGN_GROUP
from regionwatch.store import SnapshotStore
from tests.conftest import tiny_model
from tests.support.factories import make_probes, make_snapshot
from tests.support.report_runs import log_tokens, synthetic_run

SMALL_TOKENS = log_tokens(6)  # 0, 1M, 4M, 16M, 64M, 256M
LARGE_TOKENS = log_tokens(10, first=2_000_000)  # 0, 2M, 8M, ..., 131B
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# A screenshot pixel is "colourful" when its channels spread this far: plot lines and region
# maps are; text, white background and grey grid lines are not.
COLOURFUL_SPREAD = 80
MIN_COLOURFUL_PIXELS = 20_000  # a few plotted figures' worth at 1400 px wide
# Region maps are nearly pure red, green and blue near their anchors: one channel above 180,
# the other two below 80. Of the page itself only link text (pure blue) is.
MIN_MAP_PIXELS = 10_000


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two runs of different lengths on one grid, and one on another grid."""
    root = tmp_path_factory.mktemp("runs")
    synthetic_run(root / "small", SMALL_TOKENS, failures=1)
    synthetic_run(root / "large", LARGE_TOKENS, run_id="large")
    synthetic_run(root / "coarse", SMALL_TOKENS[:3], num_alphas=7, run_id="coarse")
    return {name: root / name for name in ("small", "large", "coarse")}


@pytest.fixture(scope="module")
def report(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One report of the two comparable runs, with `--at` 3M tokens."""
    out = tmp_path_factory.mktemp("report")
    return write_report(
        [runs["small"], runs["large"]], out, at_tokens=3_000_000, max_curves=5, progress=False
    )


def records(run: Path) -> list[dict]:
    """The store's own records, read independently of the report's data step."""
    return SnapshotStore(run).records()


def test_format_tokens_writes_short_labels() -> None:
    """0 -> "0", then three significant digits with K/M/B/T; rounding happens first."""
    cases = {
        0: "0",
        512: "512",
        1500: "1.5K",
        4_200_000: "4.2M",
        10**10: "10B",
        999_999: "1M",
        31_000_000_000: "31B",
        3_050_000_000_000: "3.05T",
    }
    assert {t: format_tokens(t) for t in cases} == cases
    assert [parse_tokens(s) for s in ("4.2M", "10b", "1e9", "0", "1500")] == [
        4_200_000,
        10**10,
        10**9,
        0,
        1500,
    ]
    with pytest.raises(ConfigError, match="suffixes K, M, B, T"):
        parse_tokens("4.2X")


def test_token_axis_marks_zero_half_a_decade_left() -> None:
    """0 tokens sits half a decade below the smallest positive count, ticked "0"; none if no 0."""
    axis = TokenAxis.spanning([0, 1e6, 1e9])
    assert axis.zero == pytest.approx(1e6 / 10**0.5)
    positions, labels = axis.ticks()
    assert (positions[0], labels[0]) == (axis.zero, "0")
    assert labels[1:] == ["1M", "10M", "100M", "1B"]
    assert axis.x([0, 5e6]).tolist() == [axis.zero, 5e6]
    assert "0" not in TokenAxis.spanning([5e6, 1e8]).ticks()[1]
    assert TokenAxis.spanning([0, 0]).ticks()[1] == ["0"]  # only the init snapshot so far


def test_curve_subset_is_log_spaced_with_first_and_last() -> None:
    """At most max_curves snapshots, nearest to log-spaced targets, always first and last."""
    tokens = [0] + [1000 * 2**i for i in range(29)]
    # Targets in log10 of axis positions: 2.5 (0 at 1000 / 10**0.5), 4.73, 6.96, 9.20, 11.43.
    assert curve_subset(tokens, 5) == [0, 7, 14, 22, 29]
    assert curve_subset(tokens[:4], 5) == [0, 1, 2, 3]
    for count in range(2, 12):
        chosen = curve_subset(tokens, count)
        assert chosen[0] == 0
        assert chosen[-1] == len(tokens) - 1
        assert len(chosen) <= count
        assert chosen == sorted(set(chosen))


def test_slope_figure_plots_the_stored_medians_and_quartiles(runs: dict[str, Path]) -> None:
    """One errorbar line per run: x = tokens (0 at the marked spot), y = median, bars q25..q75."""
    data = [load_run(runs[name], progress=False) for name in ("small", "large")]
    fig = slope_over_tokens_figure([run.slope_series() for run in data])
    ax = fig.axes[0]
    containers = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(containers) == 2
    zero = min(SMALL_TOKENS[1], LARGE_TOKENS[1]) / 10**0.5
    for container, name in zip(containers, ("small", "large"), strict=True):
        rows = records(runs[name])
        line, _, (bars,) = container.lines
        x = np.array([r["tokens"] or zero for r in rows], dtype=float)
        np.testing.assert_allclose(line.get_xdata(), x)
        np.testing.assert_allclose(line.get_ydata(), [r["max_slope/median"] for r in rows])
        assert isinstance(bars, LineCollection)
        segments = np.array(bars.get_segments())  # [points, 2 ends, (x, y)]
        np.testing.assert_allclose(segments[:, 0, 1], [r["max_slope/q25"] for r in rows])
        np.testing.assert_allclose(segments[:, 1, 1], [r["max_slope/q75"] for r in rows])
        np.testing.assert_allclose(segments[:, 0, 0], x)
    assert ax.get_xscale() == "log"
    assert ax.get_xticks()[0] == pytest.approx(zero)
    assert ax.get_xticklabels()[0].get_text() == "0"
    assert ax.get_xlim()[0] < zero < min(SMALL_TOKENS[1], LARGE_TOKENS[1])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == [data[0].label, data[1].label]
    assert "small (SyntheticLM, 1.2M params)" in legend
    assert ax.get_title()
    assert "tokens" in ax.get_xlabel()
    assert "max slope" in ax.get_ylabel()
    # The synthetic runs stay straight lines for two snapshots: the onset is the third.
    onsets = [line for line in ax.get_lines() if line.get_label().startswith("onset")]
    assert [line.get_xdata()[0] for line in onsets] == [SMALL_TOKENS[2], LARGE_TOKENS[2]]
    assert onsets[0].get_label() == "onset at 4M tokens"


def test_onset_leaves_the_init_band(runs: dict[str, Path]) -> None:
    """The onset is metrics.emergence_onset against the step-0 snapshot's q75."""
    run = load_run(runs["small"], progress=False)
    rows = records(runs["small"])
    assert run.init_q75 == rows[0]["max_slope/q75"]
    assert rows[1]["max_slope/median"] <= run.init_q75 < rows[2]["max_slope/median"]
    assert run.onset == SMALL_TOKENS[2]
    # The page's onset is the one the live monitor logs to TensorBoard (onset/tokens).
    assert record_onset(rows).tokens == run.onset


def test_runs_with_different_alphas_never_share_a_slope_axis(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """The figure refuses a mix of grid sizes; the report draws one figure per size, noted."""
    series = [load_run(runs[n], progress=False).slope_series() for n in ("small", "coarse")]
    with pytest.raises(ConfigError, match="different numbers of alphas"):
        slope_over_tokens_figure(series)
    index = write_report([runs["small"], runs["coarse"]], tmp_path, max_curves=3, progress=False)
    assert (tmp_path / "max_slope_S7.png").is_file()
    assert (tmp_path / "max_slope_S11.png").is_file()
    assert not (tmp_path / "max_slope.png").exists()
    assert "different numbers of alphas S (7, 11)" in index.read_text()


def test_curves_figure_draws_the_median_curves_of_a_log_spaced_subset(
    runs: dict[str, Path],
) -> None:
    """Fig. 4a lines are metrics.median_curve of the chosen snapshots, first and last included."""
    run = load_run(runs["large"], progress=False)
    panel = curve_panel(run, max_curves=4)
    chosen = curve_subset(LARGE_TOKENS, 4)
    assert chosen[0] == 0
    assert chosen[-1] == len(LARGE_TOKENS) - 1
    assert len(chosen) == 4
    assert panel.tokens.tolist() == [LARGE_TOKENS[i] for i in chosen]
    fig = relative_curves_figure([panel])
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == len(chosen) + 1  # the curves, then the diagonal
    store = SnapshotStore(runs["large"])
    for line, index in zip(lines, chosen, strict=False):
        snap = store.read(10 * index)
        expected = metrics.median_curve(snap.measurement.curves["random"].relative)
        np.testing.assert_allclose(line.get_ydata(), expected.numpy(), rtol=1e-6)
        np.testing.assert_allclose(line.get_xdata(), metrics.alpha_grid(11).numpy())
    assert lines[-1].get_xydata().tolist() == [[0, 0], [1, 1]]
    colours = [tuple(line.get_color()) for line in lines[:-1]]
    assert len(set(colours)) == len(colours)  # coloured by tokens
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[: len(chosen)] == [format_tokens(LARGE_TOKENS[i]) for i in chosen]
    bar = fig.axes[-1]  # the colorbar
    assert "tokens" in bar.get_ylabel()
    assert bar.get_yticklabels()[0].get_text() == "0"
    assert ax.get_title() == run.label
    assert ax.get_xlabel()
    assert ax.get_ylabel()


def test_at_picks_the_nearest_snapshot_on_the_log_axis(runs: dict[str, Path]) -> None:
    """--at chooses by log tokens: 3M is nearest 4M; 0 is the init; beyond the end the last."""
    run = load_run(runs["small"], progress=False)
    assert (run.at(3_000_000).tokens, run.at(3_000_000).step) == (4_000_000, 20)
    assert run.at(0).step == 0
    assert run.at(10**13).step == 50
    assert run.at(700_000).tokens == 1_000_000


def test_pairs_figure_draws_the_stored_pair_curves(runs: dict[str, Path]) -> None:
    """Fig. 2: every similar/dissimilar curve, their medians, and the logit differences."""
    run = load_run(runs["small"], progress=False)
    snapshot = run.at(3_000_000)
    stored = SnapshotStore(runs["small"]).read(snapshot.step).measurement.curves
    fig = pairs_figure(snapshot.alphas, snapshot.pairs, title="small at 4M")
    left, middle, right = fig.axes
    similar, dissimilar = stored["similar"], stored["dissimilar"]
    drawn = [line.get_ydata() for line in left.get_lines()]
    rows = [*similar.relative.numpy(), metrics.median_curve(similar.relative).numpy()]
    rows += [*dissimilar.relative.numpy(), metrics.median_curve(dissimilar.relative).numpy()]
    assert len(drawn) == len(rows) + 1  # and the diagonal
    for got, want in zip(drawn, rows, strict=False):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    logits = [line.get_ydata() for line in middle.get_lines()]
    for got, want in zip(logits, dissimilar.logit_diff.numpy(), strict=False):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    named = {line.get_label(): line.get_ydata() for line in right.get_lines()}
    np.testing.assert_allclose(
        named["S1 (similar)"], stored["named"].relative[0].numpy(), rtol=1e-6
    )
    np.testing.assert_allclose(named["D1: 1 - n($\\alpha$)"], stored["named"].logit_diff[1])
    assert fig.get_suptitle() == "small at 4M"
    assert all(ax.get_title() and ax.get_xlabel() and ax.get_legend() for ax in fig.axes)


def test_region_strip_shows_the_stored_colours_in_paper_orientation(
    runs: dict[str, Path],
) -> None:
    """Each panel is the stored rgb, beta down, half-pixel margins, dots at the anchors."""
    run = load_run(runs["small"], progress=False)
    store = SnapshotStore(runs["small"])
    chosen = [0, 3, 5]
    maps = [store.read(10 * i).measurement.maps for i in chosen]
    axis = maps[0].axis.numpy()
    fig = region_strip_figure(
        axis,
        np.stack([m.rgb.numpy() for m in maps]),
        np.stack([m.anchors.numpy() for m in maps]),
        [SMALL_TOKENS[i] for i in chosen],
        title=run.label,
    )
    triples = maps[0].rgb.shape[0]
    assert len(fig.axes) == triples * len(chosen)
    margin = 0.5 * 1.5 / (len(axis) - 1)
    for row in range(triples):
        for col, region in enumerate(maps):
            ax = fig.axes[row * len(chosen) + col]
            image = ax.get_images()[0]
            np.testing.assert_array_equal(image.get_array(), region.rgb[row].numpy())
            np.testing.assert_allclose(
                image.get_extent(), [-0.25 - margin, 1.25 + margin, 1.25 + margin, -0.25 - margin]
            )
            assert ax.get_ylim()[0] > ax.get_ylim()[1]  # beta grows downwards
            dots = ax.collections
            for k, dot in enumerate(dots):
                np.testing.assert_allclose(dot.get_offsets()[0], region.anchors[row, k].numpy())
                np.testing.assert_allclose(dot.get_facecolors()[0][:3], ANCHOR_FILL[k])
                np.testing.assert_allclose(dot.get_edgecolors()[0][:3], ANCHOR_EDGE[k])
                assert dot.get_sizes()[0] == ANCHOR_AREA
            if row == 0:
                assert ax.get_title() == format_tokens(SMALL_TOKENS[chosen[col]])
    assert ANCHOR_FILL[0] == (1.0, 0.5, 0.5)
    assert ANCHOR_EDGE[0] == (0.5, 0.0, 0.0)
    # Rendered pixels of triple 1 at init (a smooth gradient): at each (alpha, beta) the image
    # shows the stored colour of that grid point, row = beta from the top (not flipped).
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    ax = fig.axes[0]
    corners = ((1.25, 1.25, -1, -1), (-0.25, 1.25, -1, 0), (1.25, -0.25, 0, -1), (0.5, 0.0, 2, 6))
    for alpha, beta, row, col in corners:
        x, y = ax.transData.transform((alpha, beta))
        shown = pixels[pixels.shape[0] - round(y), round(x)] / 255
        np.testing.assert_allclose(shown, maps[0].rgb[0, row, col].numpy(), atol=3 / 255)
    assert not np.allclose(maps[0].rgb[0, 0, -1], maps[0].rgb[0, -1, -1], atol=0.1)  # it matters


def test_region_animation_has_one_frame_per_snapshot(runs: dict[str, Path], tmp_path: Path) -> None:
    """The GIF has a frame per snapshot, all the same size, and loops."""
    store = SnapshotStore(runs["small"])
    maps = [store.read(step).measurement.maps for step in store.steps()]
    gif = region_animation(
        maps[0].axis.numpy(),
        np.stack([m.rgb.numpy() for m in maps]),
        np.stack([m.anchors.numpy() for m in maps]),
        SMALL_TOKENS,
        store.steps(),
        tmp_path / "maps.gif",
    )
    with Image.open(gif) as image:
        assert image.n_frames == len(SMALL_TOKENS)
        assert image.info["loop"] == 0
        sizes = set()
        for i in range(image.n_frames):
            image.seek(i)
            sizes.add(image.size)
        assert len(sizes) == 1


def test_report_writes_every_figure_and_a_page_that_links_them(
    report: Path, runs: dict[str, Path]
) -> None:
    """Every linked file exists; the figures, GIFs and the --at pairs figure are written."""
    out = report.parent
    html = report.read_text()
    links = re.findall(r'src="([^"]+)"', html)
    assert links
    assert all((out / link).is_file() for link in links)
    expected = {
        "max_slope.png",
        "alignment.png",
        "curves.png",
        "pairs_small_latest.png",
        "pairs_small_at_4M.png",  # nearest to the asked 3M
        "pairs_large_at_2M.png",
        "maps_small.png",
        "maps_small.gif",
        "maps_large.gif",
    }
    assert expected <= set(links)
    for name in ("small", "large"):
        with Image.open(out / f"maps_{name}.gif") as gif:
            assert gif.n_frames == len(records(runs[name]))
    with Image.open(out / "curves.png") as png:
        assert png.size[0] >= 1200
        assert png.size[1] >= 500
    assert "http" not in " ".join(links)
    assert "<script" not in html
    assert "<link" not in html


def test_page_holds_the_numbers_config_provenance_and_definitions(
    report: Path, runs: dict[str, Path]
) -> None:
    """One table row per snapshot with its headline numbers, plus onset, alignment, provenance."""
    html = report.read_text()
    for name in ("small", "large"):
        for row in records(runs[name]):
            match = re.search(
                rf'<tr class="snapshot[^"]*" data-step="{row["step"]}" '
                rf'data-tokens="{row["tokens"]}"[^>]*>(.*?)</tr>',
                html,
            )
            assert match, (name, row["step"])
            cells = re.findall(r"<td>(.*?)</td>", match.group(1))
            assert cells[0] == format_tokens(row["tokens"])
            assert cells[1] == str(row["step"])
            assert cells[2:5] == [
                f"{row[k]:.3f}" for k in ("max_slope/q25", "max_slope/median", "max_slope/q75")
            ]
            assert cells[7] == f"{row['align/auc']:.3f}"
    assert html.count('class="snapshot onset"') == 2
    assert "Emergence onset: <b>4M tokens</b>" in html
    assert "Emergence onset: <b>8M tokens</b>" in html
    assert "metrics.emergence_onset" in html
    assert "Mann-Whitney" in html
    assert "synthetic &lt;test&gt;" in html  # provenance, escaped
    assert "a cloud of mist" in html
    assert "B is one token longer" in html
    assert "CUDA OOM &lt;0&gt;" in html  # the failure list
    assert "num_alphas" in html
    assert "SyntheticLM" in html


@pytest.fixture
def browser() -> str:
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        "no headless browser found (tried chromium, chromium-browser, google-chrome): install "
        "Debian's chromium (apt-get install -y chromium) to run the page-rendering test"
    )


def screenshot(browser: str, page: Path, tmp_path: Path, name: str) -> np.ndarray:
    """Render `page` in headless chromium at 1400x3000; the screenshot as an RGB array."""
    shot = tmp_path / f"{name}.png"
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / f'profile-{name}'}",
        f"--screenshot={shot}",
        "--window-size=1400,3000",
        page.resolve().as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    with Image.open(shot) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def colourful(pixels: np.ndarray) -> int:
    return int(((pixels.max(-1) - pixels.min(-1)) > COLOURFUL_SPREAD).sum())


def map_like(pixels: np.ndarray) -> int:
    channels = np.sort(pixels, axis=-1)
    return int(((channels[..., 2] > 180) & (channels[..., 1] < 80)).sum())


def test_page_renders_its_images_in_a_headless_browser(
    report: Path, browser: str, tmp_path: Path
) -> None:
    """Opened from disk, the page shows the figures; without the image files it would not."""
    shown = screenshot(browser, report, tmp_path, "report")
    assert shown.shape[:2] == (3000, 1400)
    lonely = tmp_path / "alone" / "index.html"  # the same page with no images beside it
    lonely.parent.mkdir()
    shutil.copy(report, lonely)
    missing = screenshot(browser, lonely, tmp_path, "alone")
    assert colourful(shown) > MIN_COLOURFUL_PIXELS
    assert colourful(missing) < colourful(shown) / 20
    assert map_like(shown) > MIN_MAP_PIXELS > 2 * map_like(missing)  # the region-map strip
    # The first figure sits below the runs table: its area is not blank.
    top = shown[400:1200, 0:900]
    assert (top < 200).any(-1).mean() > 0.02


def test_cli_report_writes_the_page(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    """`regionwatch report RUN --out DIR` runs in-process and prints the page's path."""
    out = tmp_path / "cli"
    assert main(["report", str(runs["coarse"]), "--out", str(out), "--at", "1M", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    assert (out / "index.html").is_file()
    assert (out / "pairs_coarse_at_1M.png").is_file()
    assert main(["report", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "not a regionwatch run directory" in capsys.readouterr().err


def test_report_of_a_run_with_only_its_init_snapshot(tmp_path: Path) -> None:
    """Early in training a run has one snapshot: every figure is drawn, ticked "0" only."""
    synthetic_run(tmp_path / "init", [0])
    data = load_run(tmp_path / "init", progress=False)
    ax = slope_over_tokens_figure([data.slope_series()]).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0"]
    assert data.onset is None
    index = write_report([tmp_path / "init"], tmp_path / "out", progress=False)
    assert "Emergence onset: <b>not yet</b>" in index.read_text()
    with Image.open(tmp_path / "out" / "maps_init.gif") as gif:
        assert gif.n_frames == 1


def test_report_refuses_a_run_without_snapshots(tmp_path: Path) -> None:
    """A run directory with no snapshot yet is a StoreError naming the directory."""
    from tests.support.report_runs import probe_set

    SnapshotStore.create(tmp_path / "empty", probes=probe_set(), config=ProbeConfig()).close()
    with pytest.raises(StoreError, match="no snapshots yet"):
        write_report([tmp_path / "empty"], tmp_path / "out", progress=False)


def test_report_of_a_real_tiny_model_run(tmp_path: Path) -> None:
    """Two real measurements of a tiny GPT-2 (two seeds as checkpoints) report end to end."""
    probes = make_probes(prompts=8, triples=((0, 1, 2), (1, 2, 3)))
    config = ProbeConfig(num_alphas=5, grid=9)
    run = tmp_path / "tiny"
    with SnapshotStore.create(run, probes=probes, config=config, run_id="tiny") as store:
        for step, (seed, tokens) in enumerate(((0, 0), (1, 5000))):
            snap = make_snapshot(probes, config, seed=seed, run_id="tiny", step=step, tokens=tokens)
            store.write(snap)
    index = write_report([run], tmp_path / "out", progress=False)
    data = load_run(run, progress=False)
    fig = slope_over_tokens_figure([data.slope_series()])
    (container,) = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    np.testing.assert_allclose(
        container.lines[0].get_ydata(), [r["max_slope/median"] for r in records(run)]
    )
    size = sum(p.numel() for p in tiny_model("gpt2").parameters())
    assert data.label == f"tiny (GPT2LMHeadModel, {format_tokens(size)} params)"
    html = index.read_text()
    assert html.count('<tr class="snapshot') == 2
    assert (tmp_path / "out" / "maps_tiny.gif").is_file()
    assert (tmp_path / "out" / "pairs_tiny_latest.png").is_file()


def test_runs_named_regionwatch_take_their_parent_directory_names(tmp_path: Path) -> None:
    """`out/6l/regionwatch` reports as "6l" (legend and file names); twins get a suffix."""
    for parent in ("a/2l", "a/6l", "b/6l"):
        synthetic_run(tmp_path / parent / "regionwatch", [0, 1000])
    runs = load_runs(
        [tmp_path / p / "regionwatch" for p in ("a/2l", "a/6l", "b/6l")], progress=False
    )
    assert [r.name for r in runs] == ["2l", "6l", "6l-2"]
    write_report([tmp_path / "a/6l/regionwatch"], tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "maps_6l.gif").is_file()


def test_alignment_is_drawn_only_once_both_groups_are_large_enough(tmp_path: Path) -> None:
    """align/auc counts from the first snapshot whose two pair groups hold MIN_ALIGN_GROUP."""
    synthetic_run(tmp_path / "run", SMALL_TOKENS)
    data = load_run(tmp_path / "run", progress=False)
    sizes = [(1, 98), (4, 95), (MIN_ALIGN_GROUP, 80), (3, 90), (30, 60), (40, 50)]
    records = [
        {**r, "align/differ_pairs": float(d), "align/agree_pairs": float(a)}
        for r, (d, a) in zip(data.records, sizes, strict=True)
    ]
    series = dataclasses.replace(data, records=records).alignment_series()
    auc = data.values("align/auc")
    assert np.isnan(series.values[:2]).all()
    np.testing.assert_array_equal(series.values[2:], auc[2:])  # from the first, even if it dips
    sizeless = [
        {k: v for k, v in r.items() if not k.startswith("align/") or k == "align/auc"}
        for r in data.records
    ]  # a run stored before the sizes were recorded: every point
    old = dataclasses.replace(data, records=sizeless).alignment_series()
    np.testing.assert_array_equal(old.values, auc)
