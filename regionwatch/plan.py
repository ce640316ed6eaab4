"""The query plan of a measurement: how pairs and triples become query slots of one engine run.

`Plan` collects the prompts and the patched points of every part of a measurement so that the
engine runs them in one pass, sharing each context's prefix; `PairPart` and `MapPart` plan their
points and turn the engine's readouts back into `Curves` and `RegionMaps` with `metrics`.
`measuring` puts a model in eval mode without grad for the pass and restores it exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from regionwatch import engine, metrics, rows
from regionwatch.access import ResidualSite, token_logits
from regionwatch.results import Curves, RegionMaps


@contextmanager
def measuring(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, no grad and a forked RNG while measuring; all of it returns, even on error.

    The RNG fork covers the model's GPU too: `fork_rng(devices=[])` would restore the CPU
    generator only, and a GPU run's dropout stream must not depend on whether it was probed.
    """
    modes = [(m, m.training) for m in model.modules()]  # models can mix modes (frozen parts)
    device = next(model.parameters()).device
    gpus = [device] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=gpus, device_type="cuda"):
            yield model
    finally:
        for module, was_training in modes:
            module.training = was_training


PAIR_PHASE, MAP_PHASE = 0, 1  # pair curves run first, region maps after, on the same prefixes
PHASES = (PAIR_PHASE, MAP_PHASE)
Slot = tuple[int, int, int]  # (phase, context prompt index, offset of the slot's first query)


@dataclass
class Plan:
    """Prompts and query slots of one engine run, built up by the parts of a measurement.

    A slot is a run of consecutive query vectors in one context, in one phase; parts add slots
    while planning and read their readouts back by slot after `execute`. Pair curves are phase
    `PAIR_PHASE` and region maps `MAP_PHASE`, so the engine batches each kind the same way whether
    or not the other is measured too.
    """

    prompts: list[engine.Prompt] = field(default_factory=list)
    _index: dict[engine.Prompt, int] = field(default_factory=dict)
    _counts: list[dict[int, int]] = field(default_factory=lambda: [{} for _ in PHASES])
    _builders: list[dict[int, list[Callable[[Tensor], Tensor]]]] = field(
        default_factory=lambda: [{} for _ in PHASES]
    )

    def prompt(self, ids: engine.Prompt) -> int:
        """Index of a prompt, added once however often it is used."""
        if ids not in self._index:
            self._index[ids] = len(self.prompts)
            self.prompts.append(ids)
        return self._index[ids]

    def slot(
        self, phase: int, context: int, count: int, vectors: Callable[[Tensor], Tensor]
    ) -> Slot:
        """Reserve `count` queries in `context`; `vectors(write)` gives them, [count, d_model]."""
        offset = self._counts[phase].get(context, 0)
        self._counts[phase][context] = offset + count
        self._builders[phase].setdefault(context, []).append(vectors)
        return (phase, context, offset)

    def execute(
        self,
        site: ResidualSite,
        max_batch_tokens: int | None,
        split: engine.Split | None = None,
    ) -> engine.EngineResult:
        """Run every slot through the engine (the model must be under `measuring`).

        The KV-cached engine where the site can take it (`ResidualSite.fast`), else the generic
        full-row path (`rows.run`). `split`: share the queries among the ranks of an FSDP2
        model (see `engine.run`).
        """

        def build(write: Tensor) -> list[dict[int, Tensor]]:
            return [
                {c: torch.cat([f(write) for f in fs]) for c, fs in builders.items()}
                for builders in self._builders
            ]

        budget = engine.DEFAULT_MAX_BATCH_TOKENS if max_batch_tokens is None else max_batch_tokens
        return (engine.run if site.fast else rows.run)(
            site, self.prompts, self._counts, build, max_batch_tokens=budget, split=split
        )


def readout(result: engine.EngineResult, slot: Slot, count: int) -> Tensor:
    """The patched readouts of one slot, [count, d_model]."""
    phase, context, offset = slot
    return result.patched[phase][context][offset : offset + count]


class PairPart:
    """The interpolation curves of a list of (A, B) pairs, as slots of a `Plan`."""

    def __init__(
        self,
        plan: Plan,
        pairs_a: list[engine.Prompt],
        pairs_b: list[engine.Prompt],
        num_alphas: int,
    ) -> None:
        self.alphas = metrics.alpha_grid(num_alphas)
        self.a = [plan.prompt(p) for p in pairs_a]
        self.b = [plan.prompt(p) for p in pairs_b]
        # x(0) = x_A: its readout is A's clean one, h(0) = h_A by definition, not a query.
        self.slots = [
            plan.slot(PAIR_PHASE, ia, num_alphas - 1, self._points(ia, ib))
            for ia, ib in zip(self.a, self.b, strict=True)
        ]
        self.points = len(self.slots) * (num_alphas - 1)
        self.prompt_ids = set(self.a) | set(self.b)

    def _points(self, ia: int, ib: int) -> Callable[[Tensor], Tensor]:
        return lambda write: metrics.interpolation_points(
            write[ia : ia + 1], write[ib : ib + 1], self.alphas[1:]
        )[0]

    def curves(self, site: ResidualSite, result: engine.EngineResult) -> Curves:
        """Distances, relative curves, slopes and logit differences from an engine result."""
        clean = result.clean
        patched = torch.stack([readout(result, s, len(self.alphas) - 1) for s in self.slots])
        hidden = torch.cat([clean.final[self.a][:, None], patched], dim=1)  # [P, K, d_model]
        dist = metrics.distance(hidden, clean.final[self.a][:, None, :])
        rel = metrics.relative(dist)
        tops = torch.stack([clean.top[self.a], clean.top[self.b]], dim=1)  # [P, 2]
        chosen = token_logits(site, hidden, tops).float()
        return Curves(  # stored numbers live on the CPU, whatever the model's device
            alphas=self.alphas,
            distance=dist.cpu(),
            relative=rel.cpu(),
            max_slope=metrics.max_slope(rel).cpu(),
            logit_diff=metrics.logit_diff(chosen[..., 0] - chosen[..., 1]).cpu(),
            top_a=clean.top[self.a].cpu(),
            top_b=clean.top[self.b].cpu(),
        )


class MapPart:
    """The region maps of a list of (A, B, C) triples, as slots of a `Plan`."""

    def __init__(
        self,
        plan: Plan,
        triples: list[tuple[engine.Prompt, engine.Prompt, engine.Prompt]],
        grid: int,
        span: tuple[float, float],
    ) -> None:
        self.axis = metrics.map_grid(grid, span)
        self.triples = [tuple(plan.prompt(p) for p in triple) for triple in triples]
        self.slots = [
            [plan.slot(MAP_PHASE, ctx, grid * grid, self._points(triple)) for ctx in triple]
            for triple in self.triples
        ]
        self.points = len(self.triples) * 3 * grid * grid
        self.prompt_ids = {i for triple in self.triples for i in triple}

    def _points(self, triple: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
        def points(write: Tensor) -> Tensor:
            a, b, c = (write[i] for i in triple)
            _, u = metrics.plane(a, b, c)
            return metrics.plane_points(a, b, u, self.axis).flatten(0, 1)

        return points

    def maps(self, result: engine.EngineResult) -> RegionMaps:
        """Per-context distances, colours and anchor positions from an engine result."""
        g = len(self.axis)
        final = result.clean.final
        dist = torch.stack(
            [
                torch.stack(
                    [
                        metrics.distance(readout(result, s, g * g), final[ctx]).reshape(g, g)
                        for ctx, s in zip(triple, slots, strict=True)
                    ]
                )
                for triple, slots in zip(self.triples, self.slots, strict=True)
            ]
        )
        write = result.clean.write
        t = torch.stack([metrics.plane(*(write[i] for i in triple))[0] for triple in self.triples])
        anchors = torch.zeros(len(self.triples), 3, 2)
        anchors[:, 1, 0] = 1.0
        anchors[:, 2, 0] = t.cpu()
        anchors[:, 2, 1] = 1.0
        return RegionMaps(
            axis=self.axis, distance=dist.cpu(), rgb=metrics.region_rgb(dist).cpu(), anchors=anchors
        )
