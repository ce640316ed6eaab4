"""The batched, KV-cached patched-forward engine that every measurement runs on (docs/method.md §9).

A patch touches only the last position after block L_w, and attention is causal, so the prefix of
a context prompt (all but its last token) computes the same keys and values in every patched run.
The engine therefore runs each context once, clean, keeping its KV cache, and then evaluates all of
that context's patch vectors as extra query tokens in chunks: every query sits at position T-1,
attends to the cached prefix and to itself only (a custom 4D mask), and its write-site output is
its vector. Blocks 0..L_w are not run for the queries at all, since the patch replaces all they
compute (`access.skipping`): a query costs (N-1-L_w)/N of a token's forward. Queries are never
replicated against a copied prefix; the cache is cropped back after each chunk. Contexts of equal
length share one batch, so nothing is padded. The alpha = 0 point of a pair is A's clean readout
(`plan.PairPart`), not a query.

Callers (interpolation, region maps, `measure`) describe work as prompts, phases of query counts
per context, and a function that builds those vectors from all prompts' write vectors. Phases
(pair curves, then region maps) run one after the other on the same cached prefixes, and the
batches never depend on which phases are present: a part's numbers are bitwise the same whether
it is measured alone or beside others (a live snapshot without maps equals its replay with them).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch import distributed as dist
from transformers import DynamicCache

from regionwatch.access import (
    ResidualSite,
    cache_keyword,
    capturing,
    drop_queries,
    final_hidden,
    logits,
    skipping,
    write_vectors,
)
from regionwatch.distributed import gather_rows

logger = logging.getLogger(__name__)

# Tokens in one forward pass (prompt tokens of a clean pass, query tokens of a query pass) when the
# caller sets no budget: ~0.2 GB of activations per pass for a GPT-2-small-sized model in fp32.
DEFAULT_MAX_BATCH_TOKENS = 16384
# Queries per context in one pass. Each query also attends over its chunk's other (masked) queries,
# so wide chunks waste attention work quadratically; 128 keeps that under ~5% at d_model=256.
QUERY_CHUNK = 128

Prompt = tuple[int, ...]
Phase = Mapping[int, int]  # context prompt index -> number of query vectors
Split = tuple[int, int, "dist.ProcessGroup"]  # (rank, world, group) sharing the queries
BuildQueries = Callable[[Tensor], Sequence[Mapping[int, Tensor]]]


@dataclass(frozen=True)
class CleanRun:
    """What the unpatched forward of every prompt gives.

    Attributes:
        write: write-site residual at the last position, [prompts, d_model], model dtype.
        final: readout at the last position, [prompts, d_model], model dtype.
        top: argmax of the next-token logits, [prompts].
    """

    write: Tensor
    final: Tensor
    top: Tensor


@dataclass(frozen=True)
class EngineResult:
    """A clean run plus the readouts of every patched query, per phase and context prompt index."""

    clean: CleanRun
    patched: Sequence[Mapping[int, Tensor]]  # per phase: context -> [queries, d_model]
    clean_s: float  # wall time of the unpatched passes
    queries_s: float  # wall time of the patched query passes


def run(
    site: ResidualSite,
    prompts: Sequence[Prompt],
    phases: Sequence[Phase],
    build: BuildQueries,
    *,
    max_batch_tokens: int,
    split: Split | None = None,
) -> EngineResult:
    """Run the clean pass of every prompt and every context's patched queries, phase by phase.

    Args:
        site: the resolved model; must already be in eval mode under `torch.no_grad`.
        prompts: distinct token-id tuples, each at least 2 tokens long.
        phases: per phase, context prompt index -> number of query vectors in its context.
        build: maps all prompts' write vectors [prompts, d_model] to each phase's query vectors,
            context -> [queries, d_model] (float32; cast to the model dtype at the write).
        max_batch_tokens: most tokens in one forward pass.
        split: (rank, world, group) of an FSDP2 model: every rank runs the same clean passes
            and an even share of each context's queries, so all ranks make the same forward calls
            with the same shapes (FSDP gathers each block's parameters collectively: a rank that
            skipped or added a forward would hang the job); one all-gather at the end gives every
            rank all readouts.

    Returns:
        The clean run and the patched readouts.
    """
    n = len(prompts)
    clock = _Clock(site.device)
    write: list[Tensor | None] = [None] * n
    final: list[Tensor | None] = [None] * n
    top: list[Tensor | None] = [None] * n
    # Canonical order (length, then index): batches never depend on what the phases ask for.
    contexts = sorted({c for phase in phases for c in phase}, key=lambda i: (len(prompts[i]), i))
    groups = _groups(prompts, contexts, max_batch_tokens)
    others = [i for i in range(n) if i not in set(contexts)]

    for chunk in _groups(prompts, others, max_batch_tokens):
        clock.phase("clean")
        ids = _stack(site, prompts, chunk)
        with capturing(site) as captured:
            hidden = final_hidden(site, ids, use_cache=False)[:, -1]
        _scatter(chunk, captured.vectors[0], write)
        _scatter(chunk, hidden, final)
        _scatter(chunk, logits(site, hidden).argmax(-1), top)

    vectors: Sequence[Mapping[int, Tensor]] | None = None
    if len(groups) > 1:  # a group's partners may sit in a later group: read every x first
        clock.phase("clean")
        for chunk in groups:
            _scatter(chunk, write_vectors(site, _stack(site, prompts, chunk)), write)
        vectors = build(torch.stack(write))

    patched: list[dict[int, Tensor]] = [{} for _ in phases]
    keyword = cache_keyword(site)
    for group in groups:
        clock.phase("clean")
        ids = _stack(site, prompts, group)
        cache = _new_cache()
        with capturing(site) as captured:
            hidden = final_hidden(site, ids, use_cache=True, **{keyword: cache})[:, -1]
        if vectors is None:
            _scatter(group, captured.vectors[0], write)
        _scatter(group, hidden, final)
        _scatter(group, logits(site, hidden).argmax(-1), top)
        cache.crop(-1)  # queries replace the last token: they must not see its clean keys
        if vectors is None:
            vectors = build(torch.stack(write))
        clock.phase("queries")
        users = [k for k, phase in enumerate(phases) if any(c in phase for c in group)]
        for k in users:
            rows = sorted(
                (r for r, c in enumerate(group) if c in phases[k]),
                key=lambda r: -phases[k][group[r]],
            )
            counts = {phases[k][group[r]] for r in rows}
            selects = rows != list(range(len(group)))
            phase_cache = cache
            if (selects or len(counts) > 1) and k != users[-1]:
                phase_cache = copy.deepcopy(cache)  # this phase drops rows a later one needs
            if selects:
                phase_cache.batch_select_indices(torch.tensor(rows, device=ids.device))
            members = [group[r] for r in rows]
            _queries(
                site,
                ids[rows],
                members,
                vectors[k] if split is None else _shares(vectors[k], members, split),
                phase_cache,
                _Form(keyword, captured.tuples),
                max_batch_tokens,
                patched[k],
            )

    if split is not None:
        patched = _gathered(patched, phases, split)
    clock.phase(None)
    clean = CleanRun(torch.stack(write), torch.stack(final), torch.stack(top))
    return EngineResult(clean, patched, clock.seconds["clean"], clock.seconds["queries"])


class _Form(NamedTuple):
    """How a query pass drives the model: its cache argument and its blocks' output form."""

    keyword: str  # `cache_keyword`
    tuples: bool  # `Capture.tuples`


def _queries(
    site: ResidualSite,
    ids: Tensor,
    group: list[int],
    vectors: Mapping[int, Tensor],
    cache: DynamicCache,
    form: _Form,
    max_batch_tokens: int,
    out: dict[int, Tensor],
) -> None:
    """Evaluate every query vector of a group's contexts against their cached prefixes.

    `group` is ordered by descending query count, so the contexts still holding queries are always
    a leading block of the cache's rows; finished rows are dropped from the cache.
    """
    counts = [len(vectors[c]) for c in group]
    prefix = ids.shape[1] - 1
    parts: list[list[Tensor]] = [[] for _ in group]
    active, start = len(group), 0
    while start < counts[0]:
        finished = sum(1 for k in counts[:active] if k <= start)
        if finished:  # rows are sorted by count, so the finished ones are the trailing rows
            active -= finished
            cache.batch_select_indices(torch.arange(active, device=ids.device))
        width = min(QUERY_CHUNK, max(1, max_batch_tokens // active), counts[0] - start)
        rows = torch.stack([_window(vectors[c], start, width) for c in group[:active]])
        hidden = _query_pass(site, ids[:active, -1], prefix, rows, cache, form)
        for r in range(active):
            parts[r].append(hidden[r, : min(width, counts[r] - start)])
        start += width
    for r, c in enumerate(group):
        out[c] = torch.cat(parts[r])


def _query_pass(
    site: ResidualSite,
    last_tokens: Tensor,
    prefix: int,
    vectors: Tensor,
    cache: DynamicCache,
    form: _Form,
) -> Tensor:
    """One batched pass of patched last-token queries; leaves the cache as it found it.

    Args:
        site: the resolved model.
        last_tokens: each context's last token, [rows].
        prefix: cached prefix length T-1 (equal for all rows).
        vectors: patch vectors, [rows, width, d_model].
        cache: the rows' KV cache, holding exactly their prefixes; cropped back afterwards.
        form: how the model takes the cache and how its blocks answer.

    Returns:
        Readouts, [rows, width, d_model].
    """
    rows, width = vectors.shape[:2]
    device = last_tokens.device
    # Built on the device: no host-to-device copy (and no sync) per chunk.
    mask = torch.full(
        (width, prefix + width), torch.finfo(site.dtype).min, dtype=site.dtype, device=device
    )
    mask[:, :prefix] = 0
    mask[:, prefix:].fill_diagonal_(0)
    mask = mask[None, None].expand(rows, 1, width, prefix + width)
    tokens = last_tokens[:, None].expand(rows, width)
    positions = torch.full((rows, width), prefix, dtype=torch.long, device=device)
    with skipping(site, vectors, tuples=form.tuples):
        hidden = final_hidden(
            site,
            tokens,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            **{form.keyword: cache},
        )
    drop_queries(site, cache, width)
    return hidden


def _shares(vectors: Mapping[int, Tensor], members: list[int], split: Split) -> dict[int, Tensor]:
    """This rank's share of each context's queries: ceil(n / world) rows, the last share padded.

    Every rank gets the same count per context (padding repeats the context's last vector), so
    the chunk plan of `_queries`, and with it every forward call, is identical on all ranks.
    """
    rank, world, _ = split
    out = {}
    for c in members:
        share = -(-len(vectors[c]) // world)
        out[c] = _window(vectors[c], rank * share, share)
    return out


def _gathered(
    local: list[dict[int, Tensor]], phases: Sequence[Phase], split: Split
) -> list[dict[int, Tensor]]:
    """All ranks' shares of every phase's readouts, put back in query order (one all-gather)."""
    _, world, group = split
    order = [(k, c) for k, phase in enumerate(phases) for c in sorted(phase)]
    if not order:
        return local
    every = gather_rows(torch.cat([local[k][c] for k, c in order]), world, group)
    out: list[dict[int, Tensor]] = [{} for _ in phases]
    start = 0
    for k, c in order:
        share = len(local[k][c])
        rows = every[:, start : start + share]  # [world, share, d_model], rank-major
        out[k][c] = rows.reshape(world * share, -1)[: phases[k][c]]
        start += share
    return out


def _window(vectors: Tensor, start: int, width: int) -> Tensor:
    """Rows start..start+width of one context's vectors, padded by repeating its last vector."""
    part = vectors[start : start + width]
    if len(part) < width:
        part = torch.cat([part, vectors[-1:].expand(width - len(part), -1)])
    return part


def _groups(prompts: Sequence[Prompt], order: Sequence[int], budget: int) -> list[list[int]]:
    """Split `order` into runs of equal-length prompts of at most `budget` tokens, keeping order."""
    groups: list[list[int]] = []
    for length in sorted({len(prompts[i]) for i in order}):
        members = [i for i in order if len(prompts[i]) == length]
        size = max(1, budget // length)
        groups.extend(members[k : k + size] for k in range(0, len(members), size))
    return groups


def _stack(site: ResidualSite, prompts: Sequence[Prompt], indices: Sequence[int]) -> Tensor:
    return torch.tensor([prompts[i] for i in indices], dtype=torch.long, device=site.device)


def _scatter(indices: Sequence[int], values: Tensor, into: list[Tensor | None]) -> None:
    for row, i in enumerate(indices):
        into[i] = values[row]


def _new_cache() -> DynamicCache:
    return DynamicCache()


class _Clock:
    """Wall time per phase; syncs the accelerator so queued kernels count in the phase they ran."""

    def __init__(self, device: torch.device) -> None:
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds = {"clean": 0.0, "queries": 0.0}
        self._phase: str | None = None
        self._since = 0.0

    def phase(self, name: str | None) -> None:
        """End the current phase and start `name` (None: stop)."""
        self._sync()
        now = time.perf_counter()
        if self._phase is not None:
            self.seconds[self._phase] += now - self._since
        self._phase, self._since = name, now
