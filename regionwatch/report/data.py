"""The data step of a report: a run directory's store turned into plain numpy arrays (`RunData`).

Figures never touch the store: they take the dataclasses defined here, so tests can hand them
known numbers and assert on what is drawn. This module is also where the report decides which
numbers it shows: the readable subset of checkpoints, the snapshot `--at` picks, the emergence
onset and the grouping of runs by grid size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from regionwatch import metrics
from regionwatch.atomic import float_from_json
from regionwatch.errors import StoreError
from regionwatch.measurement import ProbeConfig
from regionwatch.onset import Onset, tracker
from regionwatch.report.tokens import TokenAxis, format_tokens
from regionwatch.snapshot import POSITION_KEY, Snapshot, on_tokens_axis
from regionwatch.store import DEFAULT_RUN_NAME, SnapshotStore

logger = logging.getLogger(__name__)

# `snapshot.info` keys that name the model and its size, in order of preference; drivers and the
# CLI record some of these (the model class always).
MODEL_NAME_KEYS = ("model_name", "model", "checkpoint_name", "model_class")
MODEL_SIZE_KEYS = ("num_parameters", "n_params", "parameters")
PAIR_PARTS = ("similar", "dissimilar", "named")


@dataclass(frozen=True)
class PairCurves:
    """Curves of one set of labelled pairs at one snapshot (docs/method.md §4, §4.1).

    Attributes:
        relative: d(a)/d(1) per pair, [P, K]; NaN rows for excluded pairs.
        logit_diff: 1 - n(a), the normalized logit difference, [P, K]; NaN where A and B
            predict the same top token.
        names: per pair label for named pairs ("S1", ...), else empty.
        kinds: per pair "similar" / "dissimilar" / "user" for named pairs, else empty.
    """

    relative: np.ndarray
    logit_diff: np.ndarray
    names: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()


@dataclass(frozen=True)
class MapData:
    """The region maps of one snapshot (docs/method.md §5).

    Attributes:
        axis: grid values for alpha (columns) and beta (rows, top to bottom), [G].
        rgb: stored colours 1 - D/max, [T, G, G, 3] in [0, 1].
        anchors: (alpha, beta) of A, B, C per triple, [T, 3, 2].
    """

    axis: np.ndarray
    rgb: np.ndarray
    anchors: np.ndarray


@dataclass(frozen=True)
class SnapshotData:
    """What the figures need from one snapshot.

    Attributes:
        step: the host's global step.
        tokens: training tokens seen.
        alphas: the interpolation grid, [K].
        median_curve: `metrics.median_curve` of the random pairs, [K]; None if not measured.
        pairs: per labelled part ("similar", "dissimilar", "named") its curves.
        maps: the region maps, or None if not measured.
        position_unknown: which of "step" and "tokens" are not known (a one-off measurement;
            the number stored for it is a slot, not a position).
    """

    step: int
    tokens: int
    alphas: np.ndarray
    median_curve: np.ndarray | None
    pairs: Mapping[str, PairCurves] = field(default_factory=dict)
    maps: MapData | None = None
    position_unknown: tuple[str, ...] = ()

    @property
    def placed(self) -> bool:
        """Whether the tokens seen are known: the snapshot has a place on the tokens axis."""
        return "tokens" not in self.position_unknown

    @property
    def when(self) -> str:
        """Where in training, in words: "4.2M tokens (step 30)", or "position unknown"."""
        if self.position_unknown == ("step",):
            return f"{format_tokens(self.tokens)} tokens (step unknown)"
        if not self.placed:
            known = "" if "step" in self.position_unknown else f" (step {self.step})"
            return f"position in training unknown{known}"
        return f"{format_tokens(self.tokens)} tokens (step {self.step})"

    @classmethod
    def from_snapshot(
        cls, snapshot: Snapshot, *, named: Sequence[tuple[str, str]] = ()
    ) -> SnapshotData:
        """Arrays of a snapshot; `named` gives (name, kind) of the probe set's named pairs."""
        m = snapshot.measurement
        random = m.curves.get("random")
        pairs = {}
        for part in PAIR_PARTS:
            if part in m.curves:
                curves = m.curves[part]
                labels = tuple(named) if part == "named" else ()
                if labels and len(labels) != len(curves.relative):  # not the run's probe set
                    labels = tuple((f"pair {i + 1}", "user") for i in range(len(curves.relative)))
                pairs[part] = PairCurves(
                    relative=curves.relative.double().numpy(),
                    logit_diff=curves.logit_diff.double().numpy(),
                    names=tuple(name for name, _ in labels),
                    kinds=tuple(kind for _, kind in labels),
                )
        maps = None
        if m.maps is not None:
            maps = MapData(
                axis=m.maps.axis.double().numpy(),
                rgb=m.maps.rgb.double().numpy(),
                anchors=m.maps.anchors.double().numpy(),
            )
        return cls(
            step=snapshot.step,
            tokens=snapshot.tokens,
            alphas=metrics.alpha_grid(m.config.num_alphas).double().numpy(),
            median_curve=None if random is None else _median(random.relative),
            pairs=pairs,
            maps=maps,
            position_unknown=snapshot.position_unknown,
        )


@dataclass(frozen=True)
class ModelPoint:
    """The max slope of one snapshot of unknown place in training: a point of a model comparison.

    Attributes:
        label: the model (run name and model), and the step where one is known.
        q25: lower quartile of the max slopes.
        median: median max slope.
        q75: upper quartile.
        parameters: the model's parameter count, if recorded (orders the comparison).
    """

    label: str
    q25: float
    median: float
    q75: float
    parameters: float = math.nan


@dataclass(frozen=True)
class SlopeSeries:
    """Median max slope over tokens of one run, with its quartiles (Figure 4c / 3c).

    Attributes:
        label: legend label (run name and model).
        tokens: tokens seen per snapshot, ascending, [N].
        q25: lower quartile of the max slopes per snapshot, [N].
        median: median max slope per snapshot, [N].
        q75: upper quartile per snapshot, [N].
        num_alphas: the grid size S; slopes of different S are not comparable (docs/method.md §4).
        onset: emergence onset in tokens (see `RunData.onset`), or None.
        init_q25: bottom of the init band (q25 of the lowest-tokens snapshot).
        init_q75: top of the init band, the onset's threshold.
    """

    label: str
    tokens: np.ndarray
    q25: np.ndarray
    median: np.ndarray
    q75: np.ndarray
    num_alphas: int
    onset: float | None = None
    init_q25: float = math.nan
    init_q75: float = math.nan


# The alignment AUC is drawn once both its groups (pairs whose top next tokens differ / agree)
# hold this many pairs: with n pairs in the smaller group its standard error is about
# 0.29 / sqrt(n), 0.09 at 10.
MIN_ALIGN_GROUP = 10


@dataclass(frozen=True)
class ScalarSeries:
    """One headline scalar over tokens of one run (e.g. `align/auc`).

    Attributes:
        label: legend label.
        tokens: tokens seen per snapshot, ascending, [N].
        values: the scalar per snapshot, [N]; NaN where not measured.
    """

    label: str
    tokens: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class RunData:
    """Everything a report shows of one run, read from its store.

    Attributes:
        name: the run directory's name, unique within a report.
        label: legend label: name and model (from `snapshot.info`).
        path: the run directory.
        run_id: the store's run id.
        config: the probe config of the run.
        provenance: the probe set's provenance (source, tokenizer, seed, sizes, named pairs).
        probe_summary: `ProbeSet.summary()`, one line with counts, source and fingerprint.
        named_pairs: the probe set's named pairs: name, kind, text_a, text_b.
        info: the store's run info, updated with the latest snapshot's `info` (model class,
            dtype, device, ...).
        failures: failed measurements the store recorded.
        records: the store's flat records (one per snapshot), ascending in tokens.
        snapshots: per snapshot arrays, same order as `records`.
        emergence: the onset with its init band, or why there is none (`regionwatch.onset`).
    """

    name: str
    label: str
    path: Path
    run_id: str
    config: ProbeConfig
    provenance: Mapping[str, Any]
    probe_summary: str
    named_pairs: tuple[Mapping[str, str], ...]
    info: Mapping[str, Any]
    failures: tuple[Mapping[str, Any], ...]
    records: tuple[Mapping[str, Any], ...]
    snapshots: tuple[SnapshotData, ...]
    emergence: Onset

    @property
    def placed(self) -> np.ndarray:
        """Mask [N] of snapshots with a known place over tokens (not one-off measurements)."""
        return np.array([on_tokens_axis(r) for r in self.records], dtype=bool)

    @property
    def tokens(self) -> np.ndarray:
        """Tokens seen per placed snapshot, ascending, [placed N]."""
        return np.array([s.tokens for s in self.snapshots if s.placed], dtype=np.float64)

    def values(self, key: str) -> np.ndarray:
        """A record key per snapshot as floats, [N]; missing or null values are NaN."""
        return np.array([float_from_json(r.get(key)) for r in self.records], dtype=np.float64)

    @property
    def init_q25(self) -> float:
        """Bottom of the init band (the onset's baseline: step 0 here or in the live run)."""
        baseline = self.emergence.baseline
        return math.nan if baseline is None else baseline.q25

    @property
    def init_q75(self) -> float:
        """Top of the init band, the onset's threshold; NaN without a true initialization."""
        baseline = self.emergence.baseline
        return math.nan if baseline is None else baseline.q75

    @property
    def onset(self) -> float | None:
        """The emergence onset in tokens (`emergence.tokens`), or None.

        The run's `onset.tracker`, as the live monitor's, which logs it to TensorBoard
        (`onset/tokens`), and `show`'s, so that all three agree.
        """
        return self.emergence.tokens

    def slope_series(self) -> SlopeSeries:
        """The run's median max slope and quartiles over tokens (placed snapshots only)."""
        placed = self.placed
        return SlopeSeries(
            label=self.label,
            tokens=self.tokens,
            q25=self.values("max_slope/q25")[placed],
            median=self.values("max_slope/median")[placed],
            q75=self.values("max_slope/q75")[placed],
            num_alphas=self.config.num_alphas,
            onset=self.onset,
            init_q25=self.init_q25,
            init_q75=self.init_q75,
        )

    def model_points(self) -> list[ModelPoint]:
        """One point per snapshot of unknown place in training, for the model comparison."""
        size = next((self.info[k] for k in MODEL_SIZE_KEYS if self.info.get(k)), math.nan)
        points = []
        for record in self.records:
            if on_tokens_axis(record):
                continue
            label = one_off_label(self.label, record[POSITION_KEY], record["step"])
            q25, median, q75 = (
                float_from_json(record.get(f"max_slope/{q}")) for q in ("q25", "median", "q75")
            )
            points.append(ModelPoint(label, q25, median, q75, float(size)))
        return points

    def scalar_series(self, key: str) -> ScalarSeries:
        """One record key over tokens (e.g. `align/auc`), placed snapshots only."""
        return ScalarSeries(
            label=self.label, tokens=self.tokens, values=self.values(key)[self.placed]
        )

    def alignment_series(self) -> ScalarSeries:
        """`align/auc` over tokens from the first snapshot where it means something, NaN before.

        Early in training almost every pair predicts the same next token (the most frequent
        one), so one of the AUC's two groups holds a handful of pairs and the AUC is noise. It
        counts from the first snapshot whose groups both hold `MIN_ALIGN_GROUP` pairs (runs
        stored before the group sizes were recorded keep every point).
        """
        auc = self.scalar_series("align/auc")
        differ = self.scalar_series("align/differ_pairs").values
        groups = np.minimum(differ, self.scalar_series("align/agree_pairs").values)
        if not np.isfinite(groups).any():
            return auc
        enough = np.flatnonzero(groups >= MIN_ALIGN_GROUP)
        start = enough[0] if enough.size else len(groups)
        values = np.where(np.arange(len(groups)) >= start, auc.values, np.nan)
        return ScalarSeries(label=self.label, tokens=self.tokens, values=values)

    def at(self, tokens: float) -> SnapshotData:
        """The placed snapshot nearest to `tokens` on the report's log token axis.

        Nearest in log tokens, because snapshots are log-spaced: asking for 1e9 between 0 and
        1e10 means the 1e10 one. Ties go to the earlier snapshot. A run of one-off measurements
        only has no tokens axis: its latest snapshot.
        """
        placed = [s for s in self.snapshots if s.placed]
        if not placed:
            logger.info("%s: no snapshot has a known place in training; --at is ignored", self.name)
            return self.snapshots[-1]
        axis = TokenAxis.spanning([*self.tokens, tokens])
        gaps = np.abs(np.log10(axis.x(self.tokens)) - np.log10(axis.x([tokens])[0]))
        chosen = placed[int(np.argmin(gaps))]
        if chosen.tokens != tokens:
            logger.info(
                "%s: no snapshot at %s tokens; using the nearest, at %s",
                self.name,
                format_tokens(tokens),
                format_tokens(chosen.tokens),
            )
        return chosen


def one_off_label(label: str, position_unknown: Sequence[str], step: int) -> str:
    """A one-off snapshot's name in a model comparison: its run's label, and its step if known."""
    return label if "step" in position_unknown else f"{label} at step {step}"


def run_name(path: str | Path) -> str:
    """A run's name in reports: its directory's name, or its parent's for a default-named run.

    A run inside a trainer's log dir (or a demo's out) is called "regionwatch"; the directory
    above it says which run it is (`runs/6l-384/regionwatch` -> "6l-384").
    """
    resolved = Path(path).resolve()
    return resolved.parent.name if resolved.name == DEFAULT_RUN_NAME else resolved.name


def load_run(path: str | Path, *, name: str | None = None, progress: bool = True) -> RunData:
    """Read a run directory's store into plain arrays; never loads a model.

    Args:
        path: the run directory (a `SnapshotStore`).
        name: the run's name in the report; default the directory's name.
        progress: show a progress bar over the snapshots read.

    Returns:
        The run's data, snapshots ascending in tokens.

    Raises:
        StoreError: not a run directory, no snapshots yet, or snapshots of different grid sizes.
    """
    store = SnapshotStore(path)
    path = Path(store.path)
    name = name or run_name(path)
    records = sorted(store.records(), key=lambda r: (r["tokens"], r["step"]))
    if not records:
        raise StoreError(f"{path}: the run has no snapshots yet; nothing to report")
    sizes = {r.get("num_alphas") for r in records}
    if len(sizes) > 1:
        raise StoreError(
            f"{path}: snapshots were measured with different numbers of alphas {sorted(sizes)}; "
            "max slopes of different grids cannot share an axis (docs/method.md §4)"
        )
    probes = store.probes()
    named = [(pair.name, pair.kind) for pair in probes.named]
    snapshots = []
    for record in tqdm(records, desc=f"report {name}", unit="snapshot", disable=not progress):
        latest = store.read_record(record)  # not read(step): that re-reads the index
        snapshots.append(SnapshotData.from_snapshot(latest, named=named))
    info = {**store.info, **latest.info}  # the loop ran: records is not empty (checked above)
    return RunData(
        name=name,
        label=_label(name, info),
        path=path,
        run_id=store.run_id,
        config=store.config,
        provenance=dict(probes.provenance),
        probe_summary=probes.summary(),
        named_pairs=tuple(
            {"name": p.name, "kind": p.kind, "text_a": p.text_a, "text_b": p.text_b}
            for p in probes.named
        ),
        info=info,
        failures=tuple(store.failures()),
        records=tuple(dict(r) for r in records),
        snapshots=tuple(snapshots),
        emergence=tracker(store, records).result(),
    )


def curve_subset(tokens: Sequence[float], max_curves: int) -> list[int]:
    """A readable subset of snapshots: at most `max_curves`, log-spaced in tokens.

    The first and the last snapshot are always in; the others are the snapshots nearest to
    log-spaced targets between them (0 tokens counts at its marked axis position), so early
    training, where regions form fastest, is not crowded out by a dense late schedule.

    Args:
        tokens: tokens seen per snapshot, ascending.
        max_curves: the most indices to return, at least 2 (first and last).

    Returns:
        Ascending indices into `tokens`.
    """
    count = len(tokens)
    if count <= max_curves:
        return list(range(count))
    logs = np.log10(TokenAxis.spanning(tokens).x(tokens))
    targets = np.linspace(logs[0], logs[-1], max(max_curves, 2))
    chosen = {0, count - 1}
    for target in targets[1:-1]:
        chosen.add(int(np.argmin(np.abs(logs - target))))
    return sorted(chosen)


def group_by_alphas(runs: Sequence[RunData]) -> dict[int, list[RunData]]:
    """Runs grouped by their grid size S: max slopes are comparable only within a group."""
    groups: dict[int, list[RunData]] = {}
    for run in runs:
        groups.setdefault(run.config.num_alphas, []).append(run)
    return dict(sorted(groups.items()))


def _median(relative: torch.Tensor) -> np.ndarray:
    return metrics.median_curve(relative).double().numpy()


def _label(name: str, info: Mapping[str, Any]) -> str:
    """Legend label: the run's name plus the model's name and size where the run recorded them."""
    model = next((str(info[k]) for k in MODEL_NAME_KEYS if info.get(k)), None)
    size = next((info[k] for k in MODEL_SIZE_KEYS if info.get(k)), None)
    extras = [model] if model and model != name else []
    if isinstance(size, int | float):
        extras.append(f"{format_tokens(size)} params")
    return f"{name} ({', '.join(extras)})" if extras else name
