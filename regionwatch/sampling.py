"""Drawing a probe set's prompts from a token source (docs/method.md §3.1, §8).

`draw` cuts a token stream into windows and samples the random prompts, the automatic similar
and dissimilar pairs and the region-map triples from them with a private generator, and turns
the hand-picked and the user's text pairs into `NamedPair`s. `probes.ProbeSet.build` is its
public face; the probe set's file format and checks live in `probes`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from regionwatch.corpus import (
    Source,
    describe,
    encode,
    token_stream,
    tokenizer_hash,
    tokenizer_name,
)
from regionwatch.errors import ConfigError, check_int
from regionwatch.version import VERSION

logger = logging.getLogger(__name__)

PairKind = Literal["similar", "dissimilar", "user"]

DEFAULT_SEQ_LEN = 10  # docs/method.md §3.1: 10-token windows
DEFAULT_PROMPTS = 100  # docs/method.md §3.1: 100 prompts chained into 99 pairs
DEFAULT_SIMILAR = 16  # docs/method.md §8
DEFAULT_DISSIMILAR = 16  # docs/method.md §8
DEFAULT_TRIPLES = 4  # docs/method.md §8: consecutive triples (0, 1, 2), (1, 2, 3), ...
# Enough for 200,000 windows of 10 tokens, far more than a probe set draws from, while a large
# dataset is read only until then (a few seconds), not to its end.
DEFAULT_MAX_TOKENS = 2**21
MIN_SEQ_LEN = 2  # the patched last token needs at least one token to attend to
MIN_PROMPTS = 2  # two prompts make one chained pair
TRIPLE_SIZE = 3  # A, B, C of a region map
STREAM_HASH_CHARS = 16  # hex digits of the token stream's hash in provenance

# docs/method.md §3.2: A and B share every token but the last (for the model's own tokenizer); the
# leading spaces are part of the prompts.
HANDPICKED: tuple[tuple[str, PairKind, str, str], ...] = (
    (
        "S1",
        "similar",
        " She opened the dusty book and a cloud of mist",
        " She opened the dusty book and a cloud of dust",
    ),
    (
        "S2",
        "similar",
        " In the quiet library, students flipped through pages of",
        " In the quiet library, students flipped through pages in",
    ),
    (
        "S3",
        "similar",
        " The hiker reached the peak and admired the breathtaking",
        " The hiker reached the peak and admired the spectacular",
    ),
    (
        "D1",
        "dissimilar",
        " The house at the end of the street was very",
        " The house at the end of the street was in",
    ),
    (
        "D2",
        "dissimilar",
        " He suddenly looked at his watch and realized he was",
        " He suddenly looked at his watch and realized he had",
    ),
    (
        "D3",
        "dissimilar",
        " And then she picked up the phone to call her",
        " And then she picked up the phone to call him",
    ),
)

UserPair = tuple[str, str] | tuple[str, str, str]


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


@dataclass(frozen=True)
class Drawn:
    """The prompts `draw` sampled, as `ProbeSet`'s fields of the same names."""

    random: Tensor
    similar: Tensor
    dissimilar: Tensor
    named: tuple[NamedPair, ...]
    triples: Tensor
    provenance: dict[str, Any]


def draw(
    tokenizer: PreTrainedTokenizerBase,
    source: Source,
    *,
    seed: int,
    seq_len: int,
    n_prompts: int,
    n_similar: int,
    n_dissimilar: int,
    n_triples: int,
    handpicked: bool,
    pairs: Sequence[UserPair],
    text_column: str,
    max_tokens: int | None,
    progress: bool,
) -> Drawn:
    """Sample a probe set's prompts as `ProbeSet.build` documents (its arguments, here all given).

    Raises:
        ConfigError: as `ProbeSet.build`.
    """
    sizes = {
        "seq_len": seq_len,
        "n_prompts": n_prompts,
        "n_similar": n_similar,
        "n_dissimilar": n_dissimilar,
        "n_triples": n_triples,
    }
    _check_sizes(seed, sizes, max_tokens)
    if isinstance(source, Iterator):
        source = list(source)  # a one-shot iterator could not be both hashed and read
    description = describe(source, text_column=text_column)  # also refuses a bad source
    named, kept, dropped = _named_pairs(tokenizer, handpicked, pairs)  # before the slow part
    encoded = token_stream(
        tokenizer, source, text_column=text_column, max_tokens=max_tokens, progress=progress
    )
    stream = encoded.ids
    windows = _windows(stream, seq_len, n_prompts, description)

    order = np.random.default_rng(seed).permutation(len(windows))
    random_rows = order[:n_prompts]
    # Automatic pairs prefer windows that are not random prompts, so that the three parts
    # are independent samples; the random prompts come last as a fallback for short text.
    candidates = np.concatenate([order[n_prompts:], random_rows])
    similar, used = _similar_pairs(windows, candidates, n_similar)
    dissimilar, used_d = _dissimilar_pairs(windows, candidates, n_dissimilar, exclude=used)
    reused = bool(set(random_rows.tolist()) & (used | used_d))
    if reused:
        logger.warning(
            "source has only %d windows: some similar/dissimilar pairs reuse random prompts",
            len(windows),
        )
    provenance = {
        "regionwatch_version": VERSION,
        "tokenizer_name": tokenizer_name(tokenizer),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "source": description,
        "seed": seed,
        **sizes,
        "max_tokens": max_tokens,
        "separator": dict(encoded.separator),
        "stream_tokens": len(stream),
        "stream_truncated": encoded.truncated,
        "stream_sha256": hashlib.sha256(stream.tobytes()).hexdigest()[:STREAM_HASH_CHARS],
        "windows": len(windows),
        "pairs_reuse_random": reused,
        "named_kept": kept,
        "named_dropped": dropped,
    }
    return Drawn(
        random=torch.from_numpy(windows[random_rows].copy()),
        similar=similar,
        dissimilar=dissimilar,
        named=named,
        triples=torch.tensor(
            [[i, i + 1, i + 2] for i in range(n_triples)], dtype=torch.long
        ).reshape(n_triples, TRIPLE_SIZE),
        provenance=provenance,
    )


def _check_sizes(seed: int, sizes: Mapping[str, int], max_tokens: int | None) -> None:
    hints = {
        "seq_len": "the patched last token needs a prefix to attend to",
        "n_prompts": "for one chained pair",
    }
    minimums = {"seq_len": MIN_SEQ_LEN, "n_prompts": MIN_PROMPTS}
    for name, value in {"seed": seed, **sizes}.items():
        check_int(
            f"ProbeSet.build: {name}",
            value,
            minimum=minimums.get(name, 0),
            hint=hints.get(name, ""),
        )
    most = sizes["n_prompts"] - (TRIPLE_SIZE - 1)
    if sizes["n_triples"] > most:
        raise ConfigError(
            f"ProbeSet.build: n_triples={sizes['n_triples']}: triples are consecutive random "
            f"prompts, so n_prompts={sizes['n_prompts']} allows at most {most}; lower n_triples "
            "or raise n_prompts"
        )
    if max_tokens is not None:
        check_int(
            "ProbeSet.build: max_tokens", max_tokens, minimum=1, hint="or None to read it all"
        )


def _windows(stream: np.ndarray, seq_len: int, n_prompts: int, description: str) -> np.ndarray:
    """Consecutive non-overlapping windows [n_windows, seq_len]; a trailing partial one is cut."""
    count = len(stream) // seq_len
    if count < n_prompts:
        raise ConfigError(
            f"source {description} is too short: {len(stream)} tokens make {count} windows of "
            f"{seq_len} tokens, but n_prompts={n_prompts} needs {n_prompts} (plus more for "
            "similar/dissimilar pairs); give more text or lower n_prompts / seq_len"
        )
    return stream[: count * seq_len].reshape(count, seq_len)


def _similar_pairs(windows: np.ndarray, order: np.ndarray, count: int) -> tuple[Tensor, set[int]]:
    """Pairs of windows with the same final token and different earlier tokens (method.md §6.6).

    Windows are visited in `order`; each waits for the next one ending in its token.
    """
    waiting: dict[int, int] = {}  # final token -> window still looking for a partner
    pairs: list[tuple[int, int]] = []
    for w in order.tolist():
        if len(pairs) == count:
            break
        last = int(windows[w, -1])
        mate = waiting.get(last)
        if mate is None:
            waiting[last] = w
        elif not np.array_equal(windows[mate], windows[w]):  # identical prompts give d = 0
            pairs.append((mate, w))
            del waiting[last]
    if len(pairs) < count:
        raise ConfigError(
            f"source too short for n_similar={count}: its {len(windows)} windows give only "
            f"{len(pairs)} pairs with a shared final token; give more text or lower n_similar"
        )
    ids = windows[np.asarray(pairs, dtype=np.int64).reshape(-1, 2)]  # [n, 2, seq_len]
    return torch.from_numpy(ids.copy()), {w for pair in pairs for w in pair}


def _dissimilar_pairs(
    windows: np.ndarray, order: np.ndarray, count: int, *, exclude: set[int]
) -> tuple[Tensor, set[int]]:
    """A window and itself with the final token of the next window that ends differently."""
    pairs: list[tuple[int, int]] = []
    pending: int | None = None
    for w in order.tolist():
        if len(pairs) == count:
            break
        if w in exclude:
            continue
        if pending is None:
            pending = w
        elif windows[w, -1] != windows[pending, -1]:
            pairs.append((pending, w))
            pending = None
    if len(pairs) < count:
        raise ConfigError(
            f"source too short for n_dissimilar={count}: its {len(windows)} windows give only "
            f"{len(pairs)} pairs with different final tokens; give more text or lower "
            "n_dissimilar"
        )
    ids = np.empty((count, 2, windows.shape[1]), dtype=np.int64)
    for i, (context, donor) in enumerate(pairs):
        ids[i, 0] = ids[i, 1] = windows[context]
        ids[i, 1, -1] = windows[donor, -1]
    return torch.from_numpy(ids), {w for pair in pairs for w in pair}


SHOWN_WORDS = 4  # a hand-picked pair is named by its last words: where A and B differ


def _tail(text: str) -> str:
    words = text.split()
    return (
        " ".join(words[-SHOWN_WORDS:])
        if len(words) <= SHOWN_WORDS
        else "..." + " ".join(words[-SHOWN_WORDS:])
    )


def _named_pairs(
    tokenizer: PreTrainedTokenizerBase, handpicked: bool, pairs: Sequence[UserPair]
) -> tuple[tuple[NamedPair, ...], list[str], list[dict[str, str]]]:
    """Tokenize hand-picked and user pairs; drop hand-picked ones this tokenizer splits badly."""
    if isinstance(pairs, str):
        raise ConfigError("ProbeSet.build(pairs=<a string>): pass a list of (text_a, text_b)")
    wanted: list[tuple[str, PairKind, str, str]] = list(HANDPICKED) if handpicked else []
    for i, pair in enumerate(pairs):
        match pair:
            case (str(text_a), str(text_b)):
                wanted.append((f"U{i + 1}", "user", text_a, text_b))
            case (str(name), str(text_a), str(text_b)):
                wanted.append((name, "user", text_a, text_b))
            case _:
                raise ConfigError(
                    f"ProbeSet.build(pairs[{i}]={pair!r}): need (text_a, text_b) or "
                    "(name, text_a, text_b), all strings"
                )
    names = [name for name, *_ in wanted]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            f"ProbeSet.build(pairs=...): pair names {duplicates} are used twice (S1-S3 and D1-D3 "
            "are the hand-picked pairs); give every pair its own name"
        )
    named: list[NamedPair] = []
    dropped: list[dict[str, str]] = []
    for name, kind, text_a, text_b in wanted:
        ids_a, ids_b = encode(tokenizer, [text_a, text_b])
        problem = _pair_problem(ids_a, ids_b)
        if problem is None:
            named.append(NamedPair(name, kind, tuple(ids_a), tuple(ids_b), text_a, text_b))
            continue
        shown = f"A -> {_pieces(tokenizer, ids_a)}, B -> {_pieces(tokenizer, ids_b)}"
        if kind == "user":
            raise ConfigError(
                f"pair {name!r} ({text_a!r} / {text_b!r}) does not tokenize to equal length "
                f"with only the last token different under tokenizer "
                f"{tokenizer_name(tokenizer)!r}: {problem}; {shown}. Reword it so that only "
                "the final token differs"
            )
        logger.debug("hand-picked pair %s dropped: %s; %s", name, problem, shown)
        dropped.append({"name": name, "reason": problem})
        # One plain line per pair: which one, what it says, and why (token dumps are DEBUG).
        logger.warning(
            "hand-picked pair %s (%r vs %r) left out: this tokenizer splits the two prompts "
            "differently (%s), and a pair must be the same tokens up to a different last one",
            name,
            _tail(text_a),
            _tail(text_b),
            problem,
        )
    return tuple(named), [p.name for p in named], dropped


def _pair_problem(ids_a: Sequence[int], ids_b: Sequence[int]) -> str | None:
    """Why (A, B) is not a same-length, same-prefix pair, or None if it is one."""
    if len(ids_a) != len(ids_b):
        return f"A has {len(ids_a)} tokens and B has {len(ids_b)}"
    if len(ids_a) < MIN_SEQ_LEN:
        return f"the prompts have {len(ids_a)} token(s); a pair needs at least {MIN_SEQ_LEN}"
    differ = [i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=True)) if x != y]
    if not differ:
        return "A and B are the same tokens"
    if differ[0] != len(ids_a) - 1:
        return f"A and B differ at token {differ[0]}, before the last token"
    return None


def _pieces(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]
