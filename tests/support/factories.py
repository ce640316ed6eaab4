"""One factory each for the things tests build over and over: probe sets, snapshots, monitors.

Each takes only what the tests vary; everything else is the one small, fast default, so that a
test's arguments say what it is about.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from regionwatch.hf import RegionMonitorCallback
from regionwatch.lightning import RegionMonitor
from regionwatch.measurement import ProbeConfig, measure
from regionwatch.monitor import Monitor, WatchConfig
from regionwatch.probes import NamedPair, ProbeSet
from regionwatch.schedule import Schedule
from regionwatch.snapshot import Snapshot
from tests.conftest import random_prompts, tiny_model
from tests.support.lm import SMALL_PROBE

WATCH_FIELDS = frozenset(f.name for f in dataclasses.fields(WatchConfig))


def make_probes(
    *,
    prompts: int = 6,
    pairs: int = 2,
    seq_len: int = 6,
    seed: int = 0,
    named: Sequence[NamedPair] = (),
    triples: Sequence[Sequence[int]] = ((0, 1, 2),),
    provenance: Mapping[str, Any] | None = None,
) -> ProbeSet:
    """A hand-made probe set of random token ids (no tokenizer, no corpus).

    Args:
        prompts: random prompts (ids drawn with `seed`).
        pairs: similar pairs (seed + 1; B keeps A's last token) and as many dissimilar pairs
            (seed + 2; B keeps all of A but the last token).
        seq_len: tokens per prompt.
        seed: seed of the random prompts; the pairs use the next two.
        named: named pairs.
        triples: prompt indices of the region-map triples.
        provenance: the set's provenance (default: none recorded).
    """
    similar = random_prompts(2 * pairs, seq_len, seed=seed + 1).reshape(pairs, 2, seq_len)
    similar[:, 1, -1] = similar[:, 0, -1]
    dissimilar = random_prompts(2 * pairs, seq_len, seed=seed + 2).reshape(pairs, 2, seq_len)
    dissimilar[:, 1, :-1] = dissimilar[:, 0, :-1]
    return ProbeSet(
        random_prompts(prompts, seq_len, seed=seed),
        similar,
        dissimilar,
        tuple(named),
        torch.tensor([list(t) for t in triples]),
        dict(provenance or {}),
    )


def make_snapshot(
    probes: ProbeSet,
    config: ProbeConfig = SMALL_PROBE,
    *,
    seed: int = 0,
    run_id: str = "run-1",
    step: int = 0,
    tokens: int = 0,
    info: Mapping[str, Any] | None = None,
    maps: bool = True,
) -> Snapshot:
    """A real measurement of a seeded tiny GPT-2 on `probes`, stamped at (step, tokens)."""
    model = tiny_model("gpt2", seed=seed)
    result = measure(model, probes, config, maps=maps)
    return Snapshot.stamp(
        result, run_id=run_id, step=step, tokens=tokens, probes=probes, model=model, info=info
    )


def make_watch(every: int | None = 2, **changes: Any) -> WatchConfig:
    """SMALL_PROBE measured every `every` optimizer steps (None: the default schedule)."""
    if every is not None:
        changes.setdefault("schedule", Schedule.every_steps(every))
    return WatchConfig(**{"probe": SMALL_PROBE, **changes})


def make_monitor(
    driver: Literal["lightning", "hf", "monitor"],
    probes: ProbeSet,
    run_dir: Path | None = None,
    *,
    every: int | None = 2,
    **options: Any,
) -> Any:
    """A `RegionMonitor`, `RegionMonitorCallback` or bare `Monitor` watching `make_watch(every)`.

    Args:
        driver: "lightning", "hf" or "monitor" (the driver-independent core).
        probes: the probe set.
        run_dir: the run directory (None: the driver's default under the trainer's log dir).
        every: measure every this many optimizer steps (None: the default schedule).
        options: `WatchConfig` fields (probe, maps_schedule, precision, tensorboard, ...) change
            the watch config; the rest go to the driver (count_tokens, model_attr, tokenizer).
    """
    watch = make_watch(every, **{k: v for k, v in options.items() if k in WATCH_FIELDS})
    host = {k: v for k, v in options.items() if k not in WATCH_FIELDS}
    kind = {"lightning": RegionMonitor, "hf": RegionMonitorCallback, "monitor": Monitor}[driver]
    return kind(watch, probes=probes, run_dir=run_dir, **host)
