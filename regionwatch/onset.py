"""The emergence onset of a run: measured against a true initialization, and kept incrementally.

The onset (`metrics.emergence_onset`) is the first token count from which the median max slope
stays above the init band, the q25-q75 of the pairs' max slopes at initialization. Only a true
initialization gives that band:

- the run's own snapshot at step 0 (of known position);
- else, for a run that starts later (a replay of checkpoints without the step-0 one), the step-0
  snapshot of the live run it names in its run info under `live_run` (LIVE_RUN_KEY), if that run
  measured the same probe set with the same settings;
- else the run has no onset, and `Onset.why_none` says why. A run's first later snapshot is never
  taken for its initialization: that gave another number for the same weights (issue 21).

A snapshot of unknown position (`Snapshot.position_unknown`) is neither a baseline nor a point of
the series: it has no place in training.

`OnsetTracker` keeps the onset as snapshots arrive: O(1) per snapshot added in token order (a live
run, a replay in order); a retaken or out-of-order snapshot costs one pass over the run. The
monitor (TensorBoard's `onset/tokens`), the report and `show` all build theirs with `tracker`;
`record_onset` computes the same onset over all records at once, the reference it is tested on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from regionwatch import metrics
from regionwatch.errors import StoreError
from regionwatch.snapshot import is_init, on_tokens_axis
from regionwatch.store import SnapshotStore

# The replay run's info key naming the live run its checkpoints came from (a path string).
LIVE_RUN_KEY = "live_run"
OWN_INIT = "step 0 of this run"


@dataclass(frozen=True)
class Baseline:
    """The init band an onset is measured against: max-slope quartiles at initialization.

    Attributes:
        q25: bottom of the band.
        median: the median max slope at initialization.
        q75: top of the band, the onset's threshold.
        origin: where it comes from: "step 0 of this run", or "step 0 of live run <path>".
    """

    q25: float
    median: float
    q75: float
    origin: str


@dataclass(frozen=True)
class Onset:
    """A run's emergence onset, the band it was measured against, or why there is none.

    Attributes:
        tokens: tokens seen at the onset snapshot; None before the median left the band for
            good, or without a baseline.
        baseline: the init band, or None when the run has no true initialization to compare with.
        why_none: without a baseline, the reason (for the page and `show`); else None.
    """

    tokens: float | None
    baseline: Baseline | None
    why_none: str | None = None

    def describe(self, count: Callable[[float], str] = str) -> str:
        """The onset as words: "<count> tokens", "not yet", or "none: <why>"."""
        if self.tokens is not None:
            return f"{count(self.tokens)} tokens"
        return "not yet" if self.baseline is not None else f"none: {self.why_none}"


def init_baseline(row: Mapping[str, Any], origin: str) -> Baseline | None:
    """The band of an init snapshot's index row, or None if it has no max slopes."""
    q25, median, q75 = (row.get(f"max_slope/{q}") for q in ("q25", "median", "q75"))
    if not all(_finite(v) for v in (q25, median, q75)):
        return None  # every pair excluded: nothing to compare with
    return Baseline(q25=q25, median=median, q75=q75, origin=origin)


class OnsetTracker:
    """The onset of a run, updated one stored snapshot (index row) at a time.

    Equal after every `add` to `record_onset` over the rows added so far (a row replaces an
    earlier one of its step, as the store does).

    Args:
        live: the live run's init band (`live_baseline`), used when the run has no step 0.
        no_live: why there is no live band, for `Onset.why_none`.
    """

    def __init__(self, live: Baseline | None = None, *, no_live: str = "") -> None:
        self._live, self._no_live = live, no_live
        self._rows: dict[int, Mapping[str, Any]] = {}  # by step, as the store keys them
        self._series: list[tuple[int, int, float]] = []  # (tokens, step, median), ascending
        self._start = 0  # where the final stretch above the band starts; len(series): none
        self._own: Baseline | None = None

    def add(self, row: Mapping[str, Any]) -> None:
        """Take in one stored snapshot's row (`Snapshot.record()` or a store index row)."""
        point = _point(row)
        in_order = point is None or not self._series or point[:2] > self._series[-1][:2]
        replaces, step = row["step"] in self._rows, row["step"]
        self._rows[step] = row
        if replaces or not in_order or is_init(row):
            self._rebuild()
        elif point is not None:
            self._series.append(point)
            baseline = self.baseline
            if baseline is not None and not point[2] > baseline.q75:
                self._start = len(self._series)

    @property
    def baseline(self) -> Baseline | None:
        """The run's own step-0 band, else the live run's, else None."""
        return self._own or self._live

    @property
    def onset(self) -> float | None:
        """The onset in tokens (`Onset.tokens`)."""
        baseline = self.baseline
        # Two points at least, the initialization among them: the live run's lies outside.
        points = len(self._series) + (1 if self._own is None else 0)
        if baseline is None or points < 2 or self._start >= len(self._series):  # noqa: PLR2004
            return None
        return self._series[self._start][0]

    def result(self) -> Onset:
        """The onset with its baseline, or the reason there is none."""
        baseline = self.baseline
        why = None if baseline is not None else why_no_baseline(self._rows.values(), self._no_live)
        return Onset(self.onset, baseline, why)

    def _rebuild(self) -> None:
        rows = self._rows.values()
        inits = [r for r in rows if is_init(r)]
        self._own = init_baseline(inits[0], OWN_INIT) if inits else None
        self._series = sorted(p for p in map(_point, rows) if p is not None)
        self._start = len(self._series)
        baseline = self.baseline
        if baseline is not None:
            while self._start > 0 and self._series[self._start - 1][2] > baseline.q75:
                self._start -= 1


def record_onset(records: Iterable[Mapping[str, Any]], live: Baseline | None = None) -> Onset:
    """The onset over a run's records at once (`SnapshotStore.records()` rows, any order).

    The reference `OnsetTracker` is held to: the band of the run's own step-0 snapshot, else
    `live`; the series is every snapshot of known tokens with a median max slope, ascending in
    (tokens, step), led by the live run's init when the band is the live run's.
    """
    rows = list(records)
    inits = [r for r in rows if is_init(r)]
    own = init_baseline(inits[0], OWN_INIT) if inits else None
    baseline = own or live
    if baseline is None:
        return Onset(None, None, why_no_baseline(rows, ""))
    series = sorted(p for p in map(_point, rows) if p is not None)
    if own is None:
        series.insert(0, (0, -1, baseline.median))  # the live run's init leads the series
    tokens = [t for t, _, _ in series]
    return Onset(metrics.emergence_onset(tokens, [m for _, _, m in series], baseline.q75), baseline)


def why_no_baseline(rows: Iterable[Mapping[str, Any]], no_live: str) -> str:
    """Why a run with these rows has no init band; `no_live` says why the live run gives none."""
    rows = list(rows)
    placed = [r for r in rows if on_tokens_axis(r)]
    if any(is_init(r) for r in rows):
        own = "its step-0 snapshot has no max slopes (every pair excluded)"
    elif not rows:
        own = "it has no snapshots yet"
    elif not placed:
        own = "none of its snapshots has a known place in training (one-off measurements)"
    else:
        first = min(placed, key=_order)
        unknown = "step" in first.get("position_unknown", ())
        at = "an unknown step" if unknown else f"step {first['step']}"
        own = (
            f"it has no snapshot at step 0 (its first is at {at}, {first['tokens']:,} tokens), "
            "so nothing shows its initialization"
        )
    return f"{own}, and {no_live}" if no_live else own


def live_baseline(store: SnapshotStore) -> tuple[Baseline | None, str]:
    """The init band of the live run `store` names (LIVE_RUN_KEY), or None and why not.

    The live run must hold the same probe set and settings (fingerprints), and a measured
    snapshot at step 0. Reads that run's index once.
    """
    named = store.info.get(LIVE_RUN_KEY)
    if not named:
        return None, f"it names no live run ('{LIVE_RUN_KEY}' in its config.json) to take one from"
    path = store.path / named  # an absolute path stays itself
    try:
        live = SnapshotStore(path)
        rows = live.records()
    except (StoreError, OSError) as err:
        return None, f"the live run it names cannot be read ({err})"
    if live.probe_fingerprint != store.probe_fingerprint:
        return None, (
            f"the live run it names, {path}, measured another probe set "
            f"({live.probe_fingerprint}, this run's: {store.probe_fingerprint})"
        )
    if live.config.fingerprint != store.config.fingerprint:
        return None, f"the live run it names, {path}, measured with other settings"
    inits = [r for r in rows if is_init(r)]
    if not inits:
        return None, f"the live run it names, {path}, has no step-0 snapshot either"
    baseline = init_baseline(inits[0], f"step 0 of live run {path}")
    if baseline is None:
        return None, f"the step-0 snapshot of the live run it names, {path}, has no max slopes"
    return baseline, ""


def tracker(
    store: SnapshotStore, records: Sequence[Mapping[str, Any]] | None = None
) -> OnsetTracker:
    """A tracker of `store`'s onset, fed its records once (`records` if already read).

    The one way the monitor, the report and `show` get a run's onset, so that all three agree.
    """
    live, why = live_baseline(store)
    onset = OnsetTracker(live, no_live=why)
    for row in sorted(store.records() if records is None else records, key=_order):
        onset.add(row)
    return onset


def _point(row: Mapping[str, Any]) -> tuple[int, int, float] | None:
    """(tokens, step, median) of a row in the series, or None (no place, or no median)."""
    median = row.get("max_slope/median")
    if not on_tokens_axis(row) or not _finite(median):
        return None
    return (row["tokens"], row["step"], median)


def _order(row: Mapping[str, Any]) -> tuple[int, int]:
    return (row["tokens"], row["step"])


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
