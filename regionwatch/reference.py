"""The slow, obviously correct probe: one full forward pass per patched point, as the authors did.

Write vectors are read from `hidden_states[write_layer + 1]`, readouts from `hidden_states[-1]`
and logits from the model's own head, all of one unmodified forward per prompt (a `Decoder`
model: from hooks on its write block and final norm, logits from its head); every patched
point is a full forward of its context with a hook that overwrites the last position after block
`write_layer` (method.md §2). Points of equal-length contexts share a batch, nothing else is shared.
Same signatures as `measure.interpolate` / `measure.region_maps`; tests and benchmarks
hold the fast engine to it, and users may cross-check with it. The library never imports it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from regionwatch import metrics
from regionwatch.access import ResidualSite, decoder_readout, logits, patching, resolve
from regionwatch.decoder import Decoder
from regionwatch.engine import Prompt
from regionwatch.measurement import check_prompts
from regionwatch.plan import measuring
from regionwatch.probes import PromptIds, prompt_list
from regionwatch.results import (
    DEFAULT_GRID,
    DEFAULT_SPAN,
    Curves,
    RegionMaps,
    check_alphas,
    check_grid,
)


def _forward(site: ResidualSite, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Write-site states, readouts and logits of one full forward, each [batch, tokens, ...].

    A Hugging Face model gives all three itself; a `Decoder` model's are read by hooks on its
    named modules (the write block and the final norm), its logits from its head.
    """
    if site.decoder is None:
        out = site.model(input_ids=ids, output_hidden_states=True)
        states = out.hidden_states
        return states[site.write_layer + 1], states[-1], out.logits
    written: list[Tensor] = []

    def hook(_module: nn.Module, _args: object, output: Tensor | tuple[Tensor, ...]) -> None:
        written.append(output if isinstance(output, Tensor) else output[0])

    handle = site.blocks[site.write_layer].register_forward_hook(hook)
    try:
        final = decoder_readout(site, ids)
    finally:
        handle.remove()
    return written[0], final, logits(site, final)


def _clean(site: ResidualSite, prompt: Prompt) -> tuple[Tensor, Tensor, Tensor]:
    """Write-site states [seq, d_model], last readout and last logits of one unpatched forward.

    The write vector is the states' last row.
    """
    states, final, out = _forward(site, torch.tensor([prompt], device=site.device))
    return states[0], final[0, -1], out[0, -1]


def _patched(
    site: ResidualSite, prompt: Prompt, states: Tensor, vectors: Tensor
) -> tuple[Tensor, Tensor]:
    """Readouts and logits of one full forward of `prompt` per vector in `vectors` [n, d_model].

    Each forward's write site holds the prompt's clean `states` [seq, d_model] with the last
    position overwritten by its vector: what a hook patching only the last position gives.
    """
    written = states.expand(len(vectors), -1, -1).clone()
    written[:, -1] = vectors
    ids = torch.tensor([prompt], device=site.device).expand(len(vectors), -1)
    with patching(site, written):
        _, final, out = _forward(site, ids)
    return final[:, -1], out[:, -1]


def interpolate(
    model: nn.Module,
    ids_a: PromptIds,
    ids_b: PromptIds,
    *,
    num_alphas: int = 21,
    write_layer: int = 0,
    max_batch_tokens: int | None = None,  # unused: same signature as the fast path
    block_path: str | None = None,
    decoder: Decoder | None = None,
) -> Curves:
    """Reference for `measurement.interpolate`: a full forward per (pair, alpha)."""
    site = resolve(model, write_layer=write_layer, block_path=block_path, decoder=decoder)
    pairs_a, pairs_b = prompt_list(ids_a, "ids_a"), prompt_list(ids_b, "ids_b")
    check_prompts(site, pairs_a + pairs_b)
    check_alphas(num_alphas)
    alphas = metrics.alpha_grid(num_alphas)
    dists, diffs, tops = [], [], []
    with measuring(model):
        for a, b in zip(pairs_a, pairs_b, strict=True):
            s_a, h_a, logits_a = _clean(site, a)
            s_b, _, logits_b = _clean(site, b)
            t_a, t_b = int(logits_a.argmax()), int(logits_b.argmax())
            points = metrics.interpolation_points(s_a[None, -1], s_b[None, -1], alphas)[0]
            hidden, logits = _patched(site, a, s_a, points)
            dists.append(metrics.distance(hidden, h_a))
            diffs.append((logits[:, t_a] - logits[:, t_b]).float())
            tops.append((t_a, t_b))
    dist = torch.stack(dists)
    rel = metrics.relative(dist)
    top = torch.tensor(tops)
    return Curves(
        alphas=alphas,
        distance=dist.cpu(),
        relative=rel.cpu(),
        max_slope=metrics.max_slope(rel).cpu(),
        logit_diff=metrics.logit_diff(torch.stack(diffs)).cpu(),
        top_a=top[:, 0],
        top_b=top[:, 1],
    )


def region_maps(
    model: nn.Module,
    ids_a: PromptIds,
    ids_b: PromptIds,
    ids_c: PromptIds,
    *,
    grid: int = DEFAULT_GRID,
    span: tuple[float, float] = DEFAULT_SPAN,
    write_layer: int = 0,
    max_batch_tokens: int | None = None,  # unused: same signature as the fast path
    block_path: str | None = None,
    decoder: Decoder | None = None,
) -> RegionMaps:
    """Reference for `measurement.region_maps`: a full forward per (grid point, context)."""
    site = resolve(model, write_layer=write_layer, block_path=block_path, decoder=decoder)
    triples = list(zip(*(prompt_list(ids, "ids") for ids in (ids_a, ids_b, ids_c)), strict=True))
    check_prompts(site, [p for triple in triples for p in triple])
    check_grid(grid, span)
    axis = metrics.map_grid(grid, span)
    maps, anchors = [], []
    with measuring(model):
        for triple in triples:
            clean = [_clean(site, p) for p in triple]
            a, b, c = (states[-1] for states, _, _ in clean)
            t, u = metrics.plane(a, b, c)
            points = metrics.plane_points(a, b, u, axis).flatten(0, 1)
            channels = []
            for prompt, (states, h, _) in zip(triple, clean, strict=True):
                hidden, _ = _patched(site, prompt, states, points)
                channels.append(metrics.distance(hidden, h).reshape(grid, grid))
            maps.append(torch.stack(channels))
            anchors.append([[0.0, 0.0], [1.0, 0.0], [float(t), 1.0]])
    dist = torch.stack(maps).cpu()
    return RegionMaps(
        axis=axis, distance=dist, rgb=metrics.region_rgb(dist), anchors=torch.tensor(anchors)
    )
