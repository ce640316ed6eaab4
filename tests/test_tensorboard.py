"""The TensorBoard sink: events read back by TensorBoard's own reader and by a real server."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard import SummaryWriter

from regionwatch.errors import ConfigError
from regionwatch.measurement import ProbeConfig
from regionwatch.probes import ProbeSet
from regionwatch.snapshot import Snapshot
from regionwatch.tensorboard import (
    FIGURE_DPI,
    FIGURE_INCHES,
    MAP_FIGURE_INCHES,
    MIN_IMAGE_SAMPLES,
    TB_SUBDIR,
    VIEW_URL,
    TensorBoardSink,
    step_tag,
    tags,
    tensorboard_command,
    view_hint,
)
from tests.support.factories import make_probes, make_snapshot

GRID = 9
BIG_TOKENS = 5 * 10**10  # past 2**31: the step must survive as int64
TOKENS = (0, 4096, 3 * 2**31, BIG_TOKENS)
MAP_TAGS = ("regionwatch/maps/triple_0", "regionwatch/maps/triple_1")
MEDIAN_TAG = "regionwatch/max_slope/median"
CURVE_TAGS = ("regionwatch/curves/random", "regionwatch/curves/similar_dissimilar")
HIST_TAGS = tuple(f"regionwatch/max_slope_hist/{p}" for p in ("random", "similar", "dissimilar"))
EXPLICIT_SECONDS = (
    10**6
)  # event-file name times below this are the tests' own (see in_writing_order)


@pytest.fixture(scope="module")
def probes() -> ProbeSet:
    return make_probes(prompts=8, pairs=3, triples=((0, 1, 2), (2, 3, 4)))


@pytest.fixture(scope="module")
def snapshots(probes: ProbeSet) -> list[Snapshot]:
    """Three real measurements (three seeds), so that steps written out of place show."""
    config = ProbeConfig(num_alphas=5, grid=GRID)
    return [make_snapshot(probes, config, seed=seed, run_id="r") for seed in range(3)]


def series(snapshots: list[Snapshot], tokens: tuple[int, ...], offset: int = 0) -> list[Snapshot]:
    """One snapshot per token count, cycling through the measurements."""
    return [
        dataclasses.replace(snapshots[(i + offset) % len(snapshots)], step=i, tokens=t)
        for i, t in enumerate(tokens)
    ]


def write_all(log_dir: Path, snaps: list[Snapshot], **kwargs: int) -> None:
    with TensorBoardSink(log_dir, **kwargs) as sink:
        for snap in snaps:
            sink.write(snap)


def read(log_dir: Path) -> ea.EventAccumulator:
    """Everything in the directory; size guidance 0 keeps every event."""
    kinds = (ea.SCALARS, ea.IMAGES, ea.HISTOGRAMS, ea.TENSORS, ea.COMPRESSED_HISTOGRAMS, ea.AUDIO)
    return ea.EventAccumulator(str(log_dir), size_guidance=dict.fromkeys(kinds, 0)).Reload()


def in_writing_order(log_dir: Path) -> None:
    """Name the event files written since the last call after their writer's turn, not the clock.

    TensorBoard reads a directory's event files in name order, and names them
    events.out.tfevents.<seconds>.<host>.<pid>.<counter>: two writers of this process within one
    second sort by counter as text (10 before 9), so a resumed file could be read first. Separate
    processes (a real resume) cannot hit this. Each call gives the files the next explicit
    <seconds>, 1, 2, ... (far below any real clock), in the order the test wrote them.
    """
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    turn = sum(int(f.name.split(".")[3]) < EXPLICIT_SECONDS for f in files)
    for file in files:
        parts = file.name.split(".")
        if int(parts[3]) >= EXPLICIT_SECONDS:
            turn += 1
            parts[3] = f"{turn:010d}"
            file.rename(file.with_name(".".join(parts)))


def png(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def test_write_logs_summary_scalars_on_the_token_axis(
    tmp_path: Path, snapshots: list[Snapshot]
) -> None:
    """Every finite summary scalar and the probe time, at step = tokens (also past 2**31)."""
    snaps = series(snapshots, TOKENS)
    write_all(tmp_path, snaps)
    acc = read(tmp_path)
    assert acc.Tags()[ea.SCALARS]
    for key in snaps[0].summary:
        expected = [(s.tokens, np.float32(s.summary[key])) for s in snaps]
        expected = [(t, v) for t, v in expected if math.isfinite(v)]
        got = [(e.step, e.value) for e in acc.Scalars(f"regionwatch/{key}")] if expected else []
        assert got == expected, key  # float32: TensorBoard's simple_value
    seconds = [(e.step, e.value) for e in acc.Scalars("regionwatch/probe/seconds")]
    assert seconds == [(s.tokens, np.float32(s.measurement.timing["total"])) for s in snaps]
    for part in ("random", "similar", "dissimilar", "maps"):
        events = acc.Scalars(f"regionwatch/probe/{part}_seconds")
        assert [e.value for e in events] == [
            np.float32(s.measurement.timing[f"part/{part}"]) for s in snaps
        ]


def test_nan_scalars_are_skipped(tmp_path: Path, snapshots: list[Snapshot]) -> None:
    """A NaN headline scalar leaves a gap at its step; the other scalars are still logged."""
    snap = snapshots[0]
    summary = {**snap.summary, "max_slope/median": math.nan}
    broken = dataclasses.replace(
        snap, tokens=10, measurement=dataclasses.replace(snap.measurement, summary=summary)
    )
    write_all(tmp_path, [dataclasses.replace(snap, tokens=5), broken])
    acc = read(tmp_path)
    assert [e.step for e in acc.Scalars("regionwatch/max_slope/median")] == [5]
    assert [e.step for e in acc.Scalars("regionwatch/max_slope/q25")] == [5, 10]
    assert "regionwatch/max_slope/median" not in tags(broken)


def test_write_logs_histograms_and_curve_figures(tmp_path: Path, snapshots: list[Snapshot]) -> None:
    """Max-slope histograms per pair set and the two curve figures, one per snapshot."""
    snaps = series(snapshots, TOKENS)
    write_all(tmp_path, snaps)
    acc = read(tmp_path)
    for name, part in zip(HIST_TAGS, ("random", "similar", "dissimilar"), strict=True):
        events = acc.Histograms(name)
        assert [e.step for e in events] == list(TOKENS)
        for event, snap in zip(events, snaps, strict=True):
            slopes = snap.measurement.curves[part].max_slope
            finite = slopes[torch.isfinite(slopes)].double()
            assert event.histogram_value.num == finite.numel()
            assert event.histogram_value.min == pytest.approx(float(finite.min()))
            assert event.histogram_value.max == pytest.approx(float(finite.max()))
    width, height = (round(inches * FIGURE_DPI) for inches in FIGURE_INCHES)
    for name in CURVE_TAGS:
        events = acc.Images(name)
        assert [e.step for e in events] == list(TOKENS)
        assert {(e.width, e.height) for e in events} == {(width, height)}
        assert png(events[0].encoded_image_string).std() > 0  # something was drawn


def test_region_maps_are_one_image_per_triple_per_snapshot(
    tmp_path: Path, snapshots: list[Snapshot]
) -> None:
    """Each triple has its own tag with one image per snapshot, of the promised size."""
    write_all(tmp_path, series(snapshots, TOKENS))
    acc = read(tmp_path)
    size = tuple(round(inches * FIGURE_DPI) for inches in MAP_FIGURE_INCHES)
    assert sorted(t for t in acc.Tags()[ea.IMAGES] if "/maps/" in t) == list(MAP_TAGS)
    for name in MAP_TAGS:
        events = acc.Images(name)
        assert [e.step for e in events] == list(TOKENS)
        assert {(e.width, e.height) for e in events} == {size}


def test_region_map_figure_shows_every_cell_of_the_map(
    tmp_path: Path, snapshots: list[Snapshot]
) -> None:
    """Every grid cell's colour fills a block of the figure (nearest, unblended), axes around it."""
    snap = snapshots[1]
    write_all(tmp_path, [snap])
    maps = snap.measurement.maps
    for index, name in enumerate(MAP_TAGS):
        image = png(read(tmp_path).Images(name)[0].encoded_image_string).astype(int)
        colours = (maps.rgb[index].double().clamp(0, 1) * 255).numpy()
        for row in range(GRID):
            for col in range(GRID):
                near = (np.abs(image - colours[row, col]).max(-1) <= 1).sum()
                assert near >= 200, (row, col, near)  # a cell is ~40 x 40 pixels
        white = (image == 255).all(-1).mean()
        assert 0.2 < white < 0.8  # margins, ticks, labels and the legend around the map


def test_custom_scalars_layout_points_at_logged_tags(
    tmp_path: Path, snapshots: list[Snapshot]
) -> None:
    """One layout per writer: margin charts over median/q25/q75 and similar vs dissimilar."""
    write_all(tmp_path, series(snapshots, TOKENS[:2]))
    acc = read(tmp_path)
    events = acc.Tensors("custom_scalars__config__")
    assert len(events) == 1
    layout = layout_pb2.Layout.FromString(events[0].tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["regionwatch"]
    charts = layout.category[0].chart
    margins = [
        (s.value, s.lower, s.upper) for c in charts if c.HasField("margin") for s in c.margin.series
    ]
    assert margins == [
        ("regionwatch/max_slope/median", "regionwatch/max_slope/q25", "regionwatch/max_slope/q75"),
        *(
            tuple(f"regionwatch/max_slope/{p}_{q}" for q in ("median", "q25", "q75"))
            for p in ("similar", "dissimilar")
        ),
    ]
    lines = [list(c.multiline.tag) for c in charts if c.HasField("multiline")]
    assert lines == [
        ["regionwatch/max_slope/similar_median", "regionwatch/max_slope/dissimilar_median"],
        ["regionwatch/train/loss"],  # the trainer's loss, on the same token axis (drivers log it)
    ]
    logged = set(acc.Tags()[ea.SCALARS])
    assert {t for m in margins for t in m} | set(lines[0]) <= logged  # no typo in a chart


def test_tags_lists_exactly_what_write_logs(tmp_path: Path, snapshots: list[Snapshot]) -> None:
    """`tags` names every scalar, histogram and image tag in the event file, and no other."""
    write_all(tmp_path, [snapshots[0]])
    found = read(tmp_path).Tags()
    written = set(found[ea.SCALARS]) | set(found[ea.HISTOGRAMS]) | set(found[ea.IMAGES])
    assert set(tags(snapshots[0])) == written
    assert len(tags(snapshots[0])) == len(written)
    assert all(re.fullmatch(r"regionwatch/\w+/\w+", t) for t in written)


def test_resume_purges_events_past_the_restored_tokens(
    tmp_path: Path, snapshots: list[Snapshot]
) -> None:
    """Written to 5000, resumed from 2000: the reader sees each step once, newest values.

    The resumed sink is closed and written again halfway: only its first writer purges.
    """
    first = series(snapshots, tuple(range(0, 6000, 1000)))
    write_all(tmp_path, first)
    in_writing_order(tmp_path)
    again = series(snapshots, (3000, 4000), offset=1)  # other measurements than before
    sink = TensorBoardSink(tmp_path, purge_after_tokens=2000)
    sink.write(again[0])
    sink.close()
    in_writing_order(tmp_path)
    sink.write(again[1])  # reopens: must not purge again what this sink wrote at 3000
    sink.close()
    in_writing_order(tmp_path)
    acc = read(tmp_path)
    steps = [0, 1000, 2000, 3000, 4000]
    for name in (*acc.Tags()[ea.SCALARS], *acc.Tags()[ea.HISTOGRAMS], *acc.Tags()[ea.IMAGES]):
        kind = acc.Scalars if name in acc.Tags()[ea.SCALARS] else acc.Histograms
        kind = acc.Images if name in acc.Tags()[ea.IMAGES] else kind
        assert [e.step for e in kind(name)] == steps, name
    kept = {e.step: e.value for e in acc.Scalars("regionwatch/max_slope/median")}
    expected = {s.tokens: np.float32(s.summary["max_slope/median"]) for s in first[:3] + again}
    assert kept == expected


def test_tokens_going_back_are_warned_about(
    tmp_path: Path, snapshots: list[Snapshot], caplog: pytest.LogCaptureFixture
) -> None:
    """A snapshot before the last written tokens is logged anyway, with a warning."""
    with caplog.at_level(logging.WARNING, logger="regionwatch.tensorboard"):
        write_all(tmp_path, series(snapshots, (5000, 4000)))
    assert "tokens=4000 does not follow" in caplog.text


def test_a_snapshot_retaken_with_its_maps_adds_only_the_maps(
    tmp_path: Path, probes: ProbeSet, caplog: pytest.LogCaptureFixture
) -> None:
    """The final snapshot measured again to draw its maps, at the same tokens: every scalar
    stays one point, the maps and their scalars join it, and nothing is warned about."""
    plain, full = (make_snapshot(probes, step=5, tokens=800, maps=maps) for maps in (False, True))
    warnings = caplog.at_level(logging.WARNING, logger="regionwatch.tensorboard")
    with warnings, TensorBoardSink(tmp_path) as sink:
        sink.write(plain, run_scalars={"onset/tokens": 400.0})
        sink.write(full, run_scalars={"onset/tokens": 400.0})
    assert caplog.text == ""
    acc = read(tmp_path)
    assert set(tags(full)) - set(tags(plain))  # the retake does add tags
    for name in acc.Tags()[ea.SCALARS]:
        assert [e.step for e in acc.Scalars(name)] == [800], name
    assert {t for t in acc.Tags()[ea.IMAGES] if "maps" in t}


def test_write_scalars_logs_run_level_values(tmp_path: Path) -> None:
    """Extra scalars land under regionwatch/<key> at the given tokens; NaN is skipped."""
    with TensorBoardSink(tmp_path) as sink:
        sink.write_scalars({"onset/tokens": 2.5e9, "onset/missing": math.nan}, tokens=BIG_TOKENS)
    acc = read(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("regionwatch/onset/tokens")] == [
        (BIG_TOKENS, 2.5e9)
    ]
    assert "regionwatch/onset/missing" not in acc.Tags()[ea.SCALARS]


def test_sink_opens_lazily(tmp_path: Path) -> None:
    """A sink that never writes leaves no directory and no event file."""
    sink = TensorBoardSink(tmp_path / "run" / TB_SUBDIR, purge_after_tokens=7)
    sink.flush()
    sink.close()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p: TensorBoardSink(p, purge_after_tokens=-1), "purge_after_tokens=-1"),
        (lambda p: TensorBoardSink(p, purge_after_tokens=2.5), "purge_after_tokens=2.5"),
        (lambda p: TensorBoardSink(p, purge_after_tokens=True), "purge_after_tokens=True"),
        (lambda p: tensorboard_command(p, snapshots=-3), "snapshots=-3"),
        (lambda p: tensorboard_command(p, snapshots=1.5), "snapshots=1.5"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, call: object, match: str) -> None:
    """Each bad value raises ConfigError naming it."""
    with pytest.raises(ConfigError, match=re.escape(match)):
        call(tmp_path)


@pytest.mark.parametrize(
    ("snapshots", "samples"),
    [(0, MIN_IMAGE_SAMPLES), (12, MIN_IMAGE_SAMPLES), (250, 250)],
)
def test_tensorboard_command_keeps_every_snapshot(
    tmp_path: Path, snapshots: int, samples: int
) -> None:
    """The command names the logdir (shell-quoted) and images=N with N >= snapshots, never 0."""
    logdir = tmp_path / "with space"
    argv = shlex.split(tensorboard_command(logdir, snapshots=snapshots))
    assert argv == [
        "tensorboard",
        "--logdir",
        str(logdir),
        "--samples_per_plugin",
        f"images={samples}",
    ]
    hint = view_hint(logdir, snapshots=snapshots)
    assert hint.startswith(tensorboard_command(logdir, snapshots=snapshots))
    assert hint.endswith(f"and open {VIEW_URL}")
    assert "smoothing=0" in VIEW_URL


def test_rendering_leaves_pyplot_and_the_backend_alone(
    tmp_path: Path, snapshots: list[Snapshot]
) -> None:
    """A fresh process writes a snapshot without importing pyplot or switching backends."""
    snap = snapshots[0]
    save_file(snap.arrays(), tmp_path / "snap.safetensors")
    (tmp_path / "header.json").write_text(json.dumps(snap.header()))
    code = f"""
import json, sys
import matplotlib
matplotlib.use("svg")
from safetensors.torch import load_file
from regionwatch.snapshot import Snapshot
from regionwatch.tensorboard import TensorBoardSink
root = {str(tmp_path)!r}
header = json.load(open(root + "/header.json"))
snap = Snapshot.from_parts(header, load_file(root + "/snap.safetensors"))
with TensorBoardSink(root + "/tb") as sink:
    sink.write(snap)
print("matplotlib.pyplot" in sys.modules, matplotlib.get_backend())
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "svg"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------
# End to end through a real `tensorboard` server on loopback.

SERVER_TIMEOUT_S = 60
SERVER_TOKENS = tuple(int(t) for t in np.geomspace(1e3, BIG_TOKENS, 13).round())  # 14 with 0
SERVED_TOKENS = (0, *SERVER_TOKENS)
DONE_TAG = "regionwatch/e2e/written"  # logged last: once a server has it, it has read everything
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Server:
    """One `tensorboard` subprocess on 127.0.0.1 with an OS-chosen port."""

    def __init__(self, argv: list[str], workdir: Path) -> None:
        workdir.mkdir()
        self.stderr = workdir / "stderr.txt"
        # The venv's own tensorboard; its bookkeeping files (.tensorboard-info) go to workdir.
        program = Path(sys.executable).parent / argv[0]
        env = {**os.environ, "TMPDIR": str(workdir)}
        with self.stderr.open("w") as err:
            self.proc = subprocess.Popen(
                [str(program), *argv[1:], "--host", "127.0.0.1", "--port", "0"],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                cwd=workdir,
            )
        self.base: str | None = None

    def get(self, path: str, **params: str) -> object:
        if self.base is None:
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", self.stderr.read_text())
            if found is None:
                raise ConnectionError("not listening yet")
            self.base = f"http://127.0.0.1:{found[1]}"
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}" if params else self.base + path
        with NO_PROXY.open(url, timeout=10) as response:
            body = response.read()
        return (
            json.loads(body) if response.headers.get_content_type() == "application/json" else body
        )

    def ready(self, run: str) -> bool:
        """True once the server has loaded the whole event file of `run`."""
        assert self.proc.poll() is None, self.stderr.read_text()
        try:
            points = self.get("/data/plugin/scalars/scalars", tag=DONE_TAG, run=run)
        except (ConnectionError, OSError):
            return False
        return len(points) == 1

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


LOSS_STEPS = 20


def one_run_per_tag(server: Server) -> dict[str, list[str]]:
    """Every scalar and image tag the server lists -> the runs holding it."""
    runs: dict[str, list[str]] = {}
    for plugin in ("scalars", "images"):
        for run, tags_ in server.get(f"/data/plugin/{plugin}/tags").items():
            for name in tags_:
                runs.setdefault(name, []).append(run)
    return runs


@pytest.mark.slow
def test_real_server_serves_token_steps_and_every_region_map(
    tmp_path: Path, snapshots: list[Snapshot]
) -> None:
    """The printed view: one run on tokens, loss and max slope together, every map step, once.

    Three servers: the printed command (`view_hint`: the run directory), the trainer's whole log
    dir (what a user may open instead: no tag may sit in two runs, i.e. on two x axes), and
    `images=0`, the one check of TensorBoard's own `images=` behaviour: no image at all, though
    the tag is listed (the reason the hint is never 0). The sink's run was resumed once, so the
    server also shows that the purge holds: each step once.
    """
    logdir = tmp_path / "logs"
    trainer_run = logdir / "version_0"
    run_dir = trainer_run / "regionwatch"  # Lightning's default run dir
    sink_dir = run_dir / TB_SUBDIR
    first = series(snapshots, SERVED_TOKENS)
    with SummaryWriter(str(trainer_run)) as trainer:  # the host's own step-indexed logger
        for step in range(LOSS_STEPS):
            trainer.add_scalar("train/loss", 1 / (step + 1), step)
        for snap in first:  # regionwatch's copies at the trainer's step, as the drivers send them
            trainer.add_scalar(step_tag(MEDIAN_TAG), snap.summary["max_slope/median"], snap.step)
    write_all(sink_dir, first)
    in_writing_order(sink_dir)
    resumed = series(snapshots, SERVED_TOKENS[-3:], offset=1)
    loss_tokens = [int(t) for t in np.linspace(0, SERVED_TOKENS[-1], LOSS_STEPS)]
    with TensorBoardSink(sink_dir, purge_after_tokens=SERVED_TOKENS[-4]) as sink:
        for snap in resumed:
            sink.write(snap)
        for i, tokens in enumerate(loss_tokens):  # the drivers' copy of the loss, on tokens
            sink.write_scalars({"train/loss": 1 / (i + 1)}, tokens=tokens)
        sink.write_scalars({"e2e/written": 1.0}, tokens=SERVED_TOKENS[-1])
    in_writing_order(sink_dir)
    served = first[:-3] + resumed

    printed = view_hint(run_dir, snapshots=len(served))
    hint = shlex.split(printed.split(" and open ")[0])
    assert hint[-1] == f"images={MIN_IMAGE_SAMPLES}"
    parent = [hint[0], "--logdir", str(logdir), *hint[3:]]
    zero = [*hint[:-2], "--samples_per_plugin", "images=0"]
    argvs = {"hint": (hint, TB_SUBDIR), "parent": (parent, "version_0/regionwatch/tensorboard")}
    argvs["zero"] = (zero, TB_SUBDIR)
    servers = {name: Server(argv, tmp_path / name) for name, (argv, _) in argvs.items()}
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT_S
        while not all(s.ready(argvs[name][1]) for name, s in servers.items()):
            assert time.monotonic() < deadline, "tensorboard did not load the logs in time"
            time.sleep(0.25)
        server, run = servers["hint"], TB_SUBDIR

        assert server.get("/data/runs") == [run]  # the printed view: one run, one axis
        points = server.get("/data/plugin/scalars/scalars", tag=MEDIAN_TAG, run=run)
        assert [p[1] for p in points] == list(SERVED_TOKENS)  # tokens, each once, int64 intact
        assert [p[2] for p in points] == [
            pytest.approx(float(np.float32(s.summary["max_slope/median"]))) for s in served
        ]
        loss = server.get("/data/plugin/scalars/scalars", tag="regionwatch/train/loss", run=run)
        assert [p[1] for p in loss] == loss_tokens  # the loss on the same token axis
        images = server.get("/data/plugin/images/tags")[run]
        assert sorted(images) == sorted([*CURVE_TAGS, *MAP_TAGS])  # each image tag once

        everything = one_run_per_tag(servers["parent"])
        assert {name: runs for name, runs in everything.items() if len(runs) > 1} == {}
        assert everything["train/loss"] == ["version_0"]
        assert everything[step_tag(MEDIAN_TAG)] == ["version_0"]
        assert everything[MEDIAN_TAG] == ["version_0/regionwatch/tensorboard"]

        for name in MAP_TAGS:
            images = server.get("/data/plugin/images/images", tag=name, run=run)
            assert [i["step"] for i in images] == list(SERVED_TOKENS)
            assert servers["zero"].get("/data/plugin/images/images", tag=name, run=run) == []
            assert name in servers["zero"].get("/data/plugin/images/tags")[run]
        last = Image.open(
            io.BytesIO(server.get(f"/data/plugin/images/individualImage?{images[-1]['query']}"))
        )
        assert last.size == tuple(round(inches * FIGURE_DPI) for inches in MAP_FIGURE_INCHES)
    finally:
        for s in servers.values():
            s.stop()
