"""The fixed prompts of a run (`ProbeSet`): built once, saved with the run, reused on resume/replay.

Every snapshot of a run must measure exactly the same token ids, so a probe set holds ids, not
text, and carries a fingerprint that snapshots record (PAPER.md §3, §8).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

PairKind = Literal["similar", "dissimilar", "user"]


@dataclass(frozen=True)
class NamedPair:
    """A pair given as text (the paper's S1-S3 / D1-D3, or the user's), kept with its token ids.

    Attributes:
        name: short label, e.g. "S1".
        kind: "similar", "dissimilar" or "user".
        a: token ids of the context prompt A.
        b: token ids of the partner prompt B (same length as A, same prefix).
        text_a: A as text.
        text_b: B as text.
    """

    name: str
    kind: PairKind
    a: tuple[int, ...]
    b: tuple[int, ...]
    text_a: str
    text_b: str


@dataclass(frozen=True, eq=False)
class ProbeSet:
    """The prompts every snapshot of a run measures.

    Attributes:
        random: prompt windows, [prompts, seq_len] int64; chained into pairs (i, i+1), so 100
            prompts give 99 pairs whose context is the first (PAPER.md §3.1).
        similar: automatic similar pairs (distinct windows, same final token), [n, 2, seq_len].
        dissimilar: automatic dissimilar pairs (same prefix, final token swapped), [n, 2, seq_len].
        named: hand-picked and user pairs given as text.
        triples: region-map triples as indices into `random`, [n, 3] int64.
        provenance: tokenizer name and hash, source, seed, sizes, regionwatch version.
    """

    random: Tensor
    similar: Tensor
    dissimilar: Tensor
    named: tuple[NamedPair, ...] = ()
    triples: Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @property
    def random_pairs(self) -> tuple[Tensor, Tensor]:
        """Contexts and partners of the chained random pairs, each [prompts - 1, seq_len]."""
        return self.random[:-1], self.random[1:]

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex, 16 chars) of every token id and index: equal iff the prompts are equal."""
        digest = hashlib.sha256()
        for name, tensor in (
            ("random", self.random),
            ("similar", self.similar),
            ("dissimilar", self.dissimilar),
            ("triples", self.triples),
        ):
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(tensor.to(torch.int64).contiguous().numpy().tobytes())
        for pair in self.named:
            digest.update(repr((pair.name, pair.kind, pair.a, pair.b)).encode())
        return digest.hexdigest()[:16]
