"""The generic engine path: every patched query is a full forward of its context prompt.

A `Decoder` model is called as a whole (`Decoder.forward`), so its attention cannot take the fast
engine's KV cache and query masks (a nanoGPT-style model's attention is hard-wired causal). Each
query is then one row: the whole context prompt, with block L_w's output overwritten at the last
position by a forward hook, read out at the final norm. That is exactly the reference's patched
forward (docs/method.md §2), batched: equal-length rows of one phase share a pass. It costs a full
forward per query instead of one token; `benchmarks/bench_probe.py` measures both paths.

Same contract as `engine.run` (prompts, phases, `build`, budget, FSDP `split`), with the same
split of the queries among ranks (`engine`'s shares and gather), so under FSDP every rank makes
the same forward calls with the same shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from regionwatch import engine
from regionwatch.access import ResidualSite, capturing, decoder_readout, logits, patching_last


def run(
    site: ResidualSite,
    prompts: Sequence[engine.Prompt],
    phases: Sequence[engine.Phase],
    build: engine.BuildQueries,
    *,
    max_batch_tokens: int,
    split: engine.Split | None = None,
) -> engine.EngineResult:
    """Run the clean pass of every prompt, then every phase's queries as full patched rows.

    Args:
        site: the resolved model; must already be in eval mode under `torch.no_grad`.
        prompts: distinct token-id tuples, each at least 2 tokens long.
        phases: per phase, context prompt index -> number of query vectors in its context.
        build: maps all prompts' write vectors [prompts, d_model] to each phase's query vectors.
        max_batch_tokens: most tokens in one forward pass (rows x prompt length).
        split: (rank, world, group) of an FSDP model: see `engine.run`.

    Returns:
        The clean run and the patched readouts, as `engine.run` gives them.
    """
    clock = engine._Clock(site.device)
    n = len(prompts)
    write: list[Tensor | None] = [None] * n
    final: list[Tensor | None] = [None] * n
    top: list[Tensor | None] = [None] * n
    clock.phase("clean")
    for chunk in engine._groups(prompts, range(n), max_batch_tokens):
        ids = engine._stack(site, prompts, chunk)
        with capturing(site) as captured:
            hidden = decoder_readout(site, ids)[:, -1]
        engine._scatter(chunk, captured.vectors[0], write)
        engine._scatter(chunk, hidden, final)
        engine._scatter(chunk, logits(site, hidden).argmax(-1), top)
    vectors = build(torch.stack(write)) if phases else []

    clock.phase("queries")
    patched: list[dict[int, Tensor]] = []
    for k, phase in enumerate(phases):
        # Canonical order (length, then index), as the fast engine's.
        contexts = sorted(phase, key=lambda i: (len(prompts[i]), i))
        mine = vectors[k] if split is None else engine._shares(vectors[k], contexts, split)
        patched.append(_queries(site, prompts, contexts, mine, max_batch_tokens))
    if split is not None:
        patched = engine._gathered(patched, phases, split)
    clock.phase(None)
    clean = engine.CleanRun(torch.stack(write), torch.stack(final), torch.stack(top))
    return engine.EngineResult(clean, patched, clock.seconds["clean"], clock.seconds["queries"])


def _queries(
    site: ResidualSite,
    prompts: Sequence[engine.Prompt],
    contexts: list[int],
    vectors: Mapping[int, Tensor],
    max_batch_tokens: int,
) -> dict[int, Tensor]:
    """Readouts [queries, d_model] per context: equal-length rows share a pass, in order."""
    out: dict[int, list[Tensor]] = {c: [] for c in contexts}
    for length in sorted({len(prompts[c]) for c in contexts}):
        # Every (context, query) row of this length, context by context.
        rows = [
            (c, j) for c in contexts if len(prompts[c]) == length for j in range(len(vectors[c]))
        ]
        size = max(1, max_batch_tokens // length)
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            ids = engine._stack(site, prompts, [c for c, _ in chunk])
            patch = torch.stack([vectors[c][j] for c, j in chunk])
            with patching_last(site, patch):
                hidden = decoder_readout(site, ids)[:, -1]
            for row, (c, _) in enumerate(chunk):
                out[c].append(hidden[row])
    return {c: torch.stack(parts) for c, parts in out.items()}
