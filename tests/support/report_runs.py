"""Synthetic runs for test_report.py: stores of snapshots whose curves and maps are known.

Every random pair's relative curve is a ramp r(a) = clip((a - c) / w + 1/2, 0, 1): with w = 1 and
c = 1/2 it is the straight line r = a (random init, max slope 1); smaller widths give sharper
jumps, centred at c. Distances are the ramp times a per-pair scale, so d(1) = scale and
`metrics.relative` recovers the ramp. Region maps are distance fields from the anchors that
sharpen with the same schedule. Summaries come from `metrics.summary`, as measure() makes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from regionwatch import metrics
from regionwatch.probes import ProbeSet
from regionwatch.results import Curves, Measurement, ProbeConfig, RegionMaps
from regionwatch.sampling import NamedPair
from regionwatch.snapshot import Snapshot
from regionwatch.store import SnapshotStore
from tests.support.factories import make_probes

PAIRS = 9
LABELLED = 4  # similar and dissimilar pairs each
TRIPLES = 2
SEQ_LEN = 5
# Ramp width per snapshot: the first two snapshots are straight lines (so the onset is the
# third), then the jumps sharpen.
WIDTHS = (1.0, 1.0, 0.6, 0.35, 0.2, 0.12, 0.08, 0.05, 0.03, 0.02)


def probe_set(seed: int = 0) -> ProbeSet:
    """A hand-made probe set: PAIRS random pairs, labelled pairs, S1 and D1, TRIPLES triples."""
    named = (
        NamedPair("S1", "similar", (1, 2, 3), (1, 2, 4), "a cloud of mist", "a cloud of dust"),
        NamedPair("D1", "dissimilar", (5, 6, 7), (5, 6, 8), "the street was very", "was in"),
    )
    provenance = {
        "source": "synthetic <test>",
        "tokenizer_name": "none",
        "tokenizer_hash": "0" * 16,
        "seed": seed,
        "seq_len": SEQ_LEN,
        "n_prompts": PAIRS + 1,
        "named_kept": ["S1", "D1"],
        "named_dropped": [{"name": "S2", "reason": "B is one token longer"}],
    }
    return make_probes(
        prompts=PAIRS + 1,
        pairs=LABELLED,
        seq_len=SEQ_LEN,
        seed=seed,
        named=named,
        triples=[(i, i + 1, i + 2) for i in range(TRIPLES)],
        provenance=provenance,
    )


def ramps(alphas: torch.Tensor, centres: torch.Tensor, width: float) -> torch.Tensor:
    """r(a) = clip((a - c) / w + 1/2, 0, 1) per centre, [len(centres), K] in float64."""
    a = alphas.double()[None, :]
    return ((a - centres.double()[:, None]) / width + 0.5).clamp(0, 1)


def curves(alphas: torch.Tensor, centres: torch.Tensor, width: float, seed: int) -> Curves:
    """Curves of pairs whose relative distances are `ramps` (scaled by 1..3 per pair)."""
    rel = ramps(alphas, centres, width)
    scales = torch.linspace(1.0, 3.0, len(centres), dtype=torch.float64)[:, None]
    dist = (rel * scales).float()
    relative = metrics.relative(dist)
    tops = torch.arange(len(centres))
    return Curves(
        alphas=alphas,
        distance=dist,
        relative=relative,
        max_slope=metrics.max_slope(relative),
        logit_diff=ramps(alphas, centres, width / 2).float(),  # flips where r jumps
        top_a=tops,
        top_b=torch.where(tops % 2 == 0, tops, tops + seed + 1),  # every other pair differs
    )


def maps(grid: int, sharpness: float) -> RegionMaps:
    """Distance fields from A (0, 0), B (1, 0), C (t, 1) per context, tanh-sharpened."""
    axis = metrics.map_grid(grid, (-0.25, 1.25))
    beta, alpha = torch.meshgrid(axis.double(), axis.double(), indexing="ij")  # rows are beta
    anchors = torch.zeros(TRIPLES, 3, 2)
    anchors[:, 1, 0] = 1.0
    anchors[:, 2, 0] = torch.linspace(0.2, 0.7, TRIPLES)
    anchors[:, 2, 1] = 1.0
    dist = torch.stack(
        [
            torch.stack(
                [torch.tanh(sharpness * torch.hypot(alpha - a, beta - b)) for a, b in triple]
            )
            for triple in anchors.double().tolist()
        ]
    ).float()
    return RegionMaps(axis=axis, distance=dist, rgb=metrics.region_rgb(dist), anchors=anchors)


def snapshot(
    probes: ProbeSet,
    config: ProbeConfig,
    *,
    run_id: str,
    index: int,
    step: int,
    tokens: int,
    info: dict | None = None,
    width: float | None = None,
) -> Snapshot:
    """The index-th snapshot of a synthetic run (ramp width `width`, default WIDTHS[index]).

    A width above 1 clips nothing and starts above 0: max slopes below 1, lower than any
    measured curve's (a curve from 0 to 1 has a max slope of at least 1).
    """
    width = WIDTHS[index] if width is None else width
    alphas = metrics.alpha_grid(config.num_alphas)
    parts = {
        "random": curves(alphas, torch.linspace(0.35, 0.65, PAIRS), width, seed=0),
        "similar": curves(alphas, torch.full((LABELLED,), 0.5), 1.0, seed=1),
        "dissimilar": curves(alphas, torch.linspace(0.4, 0.6, LABELLED), width, seed=2),
        "named": curves(alphas, torch.tensor([0.5, 0.45]), width, seed=3),
    }
    region = maps(config.grid, sharpness=1.0 + 3 * index)
    random = parts["random"]
    summary = metrics.summary(
        (random.distance, random.relative, random.top_a, random.top_b),
        parts["similar"].max_slope,
        parts["dissimilar"].max_slope,
        (region.rgb, region.anchors, region.axis),
    )
    measurement = Measurement(
        config=config,
        curves=parts,
        maps=region,
        summary=summary,
        timing={"total": 0.25 + index},
    )
    return Snapshot(
        measurement=measurement,
        run_id=run_id,
        step=step,
        tokens=tokens,
        wall_time=1.7e9 + step,
        probe_fingerprint=probes.fingerprint,
        config_fingerprint=config.fingerprint,
        weights_fingerprint=f"{index:016x}",
        info=info or {"model_class": "SyntheticLM", "num_parameters": 1_200_000},
    )


def synthetic_run(
    path: Path,
    tokens: Sequence[int],
    *,
    num_alphas: int = 11,
    grid: int = 13,
    run_id: str = "synthetic",
    failures: int = 0,
) -> list[Snapshot]:
    """Write a run of len(tokens) snapshots (steps 0, 10, 20, ...) to `path`; return them."""
    probes = probe_set()
    config = ProbeConfig(num_alphas=num_alphas, grid=grid)
    store = SnapshotStore.create(path, probes=probes, config=config, run_id=run_id)
    written = []
    with store:
        for i, t in enumerate(tokens):
            snap = snapshot(probes, config, run_id=run_id, index=i, step=10 * i, tokens=int(t))
            store.write(snap)
            written.append(snap)
        for i in range(failures):
            store.record_failure(step=1000 + i, tokens=10**9, error=f"CUDA OOM <{i}>")
    return written


def log_tokens(count: int, *, first: int = 1_000_000, factor: int = 4) -> list[int]:
    """0, then `count - 1` log-spaced token counts first, first * factor, ..."""
    return [0] + [first * factor**i for i in range(count - 1)]
