"""The fixed prompts of a run (`ProbeSet`): built once, saved with the run, reused on resume/replay.

Every snapshot of a run must measure exactly the same token ids, so a probe set holds ids, not
text, and carries a fingerprint that snapshots record (docs/method.md §3, §8). This module owns the
set as a value and a file: checking its ids against a tokenizer, handing out each part's
prompts (`ProbeSet.prompts`), and writing and reading them (`save`, `load`). Drawing the ids
from a token source is `sampling`'s; `ProbeSet.build` is its public face.
It stays one module past our usual size because the value and its file format change together.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from regionwatch.atomic import sync_dir, temp_path, write_atomic
from regionwatch.corpus import (
    Source,
    tokenizer_hash,
    tokenizer_name,
)
from regionwatch.errors import ConfigError, StoreError
from regionwatch.sampling import (
    DEFAULT_DISSIMILAR,
    DEFAULT_MAX_TOKENS,
    DEFAULT_PROMPTS,
    DEFAULT_SEQ_LEN,
    DEFAULT_SIMILAR,
    DEFAULT_TRIPLES,
    MIN_SEQ_LEN,
    TRIPLE_SIZE,
    NamedPair,
    UserPair,
    draw,
)

logger = logging.getLogger(__name__)

Prompt = tuple[int, ...]  # token ids, the form the engine takes: prompts may differ in length
PromptIds = Tensor | Sequence[Sequence[int]]

PROBES_FORMAT = "regionwatch.probes"
FORMAT_VERSION = 1  # bump, and keep a reader for the old one, whenever the files change
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "probes.safetensors"
TENSOR_NAMES = ("random", "similar", "dissimilar", "triples", "named_ids", "named_lengths")


@dataclass(frozen=True, eq=False)
class ProbeSet:
    """The prompts every snapshot of a run measures.

    `==` is identity (the fields hold tensors); `equals` compares content. Build one with
    `ProbeSet.build`, store it with `save` and read it back with `ProbeSet.load`.

    Attributes:
        random: prompt windows, [prompts, seq_len] int64; chained into pairs (i, i+1), so 100
            prompts give 99 pairs whose context is the first (docs/method.md §3.1).
        similar: automatic similar pairs (distinct windows, same final token), [n, 2, seq_len].
        dissimilar: automatic dissimilar pairs (same prefix, final token swapped), [n, 2, seq_len].
        named: hand-picked and user pairs given as text.
        triples: region-map triples as indices into `random`, [n, 3] int64.
        provenance: tokenizer name and hash, source, seed, sizes, regionwatch version.

    Example:
        >>> probes = ProbeSet.build(tokenizer)  # the built-in corpus, seed 0, method.md §8 sizes
        >>> probes.save(run_dir / "probes")
        >>> ProbeSet.load(run_dir / "probes", tokenizer=tokenizer).equals(probes)
        True
    """

    random: Tensor
    similar: Tensor
    dissimilar: Tensor
    named: tuple[NamedPair, ...] = ()
    triples: Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse region-map triples that are not indices into `random`.

        Indexing does not stop a negative index (it counts from the end) and an index past the
        end fails only deep inside the measurement: either would measure other prompts than
        the ones meant.
        """
        triples, count = self.triples, len(self.random)
        if (
            not isinstance(triples, Tensor)
            or triples.dtype.is_floating_point
            or triples.dtype == torch.bool
            or triples.dim() != 2  # noqa: PLR2004
            or triples.shape[1] != TRIPLE_SIZE
        ):
            shape = tuple(triples.shape) if isinstance(triples, Tensor) else type(triples).__name__
            raise ConfigError(
                f"ProbeSet.triples: need an integer tensor [n, {TRIPLE_SIZE}] of indices into "
                f"`random`, got {shape}"
            )
        bad = triples[(triples < 0) | (triples >= count)]
        if bad.numel():
            raise ConfigError(
                f"ProbeSet.triples holds index {int(bad[0])}; each must index one of the "
                f"{count} random prompts (0..{count - 1}): fix the triples, or build the set "
                "with ProbeSet.build(n_triples=...)"
            )

    def prompts(self) -> dict[str, list[tuple[Prompt, ...]]]:
        """Every part's prompts as token-id tuples, in probe-set order, each part's once.

        Returns:
            {"random": the chained (A, B) pairs, "similar", "dissimilar", "named": their (A, B)
            pairs, "maps": the region-map (A, B, C) triples}; a part without prompts is [].

        Raises:
            ConfigError: a prompt tensor that is not integer [prompts, tokens], or a prompt
                shorter than `MIN_SEQ_LEN`.
        """
        rows = prompt_list(self.random, "random")
        out: dict[str, list[tuple[Prompt, ...]]] = {"random": list(itertools.pairwise(rows))}
        for name, tensor in (("similar", self.similar), ("dissimilar", self.dissimilar)):
            flat = prompt_list(tensor.flatten(0, 1), name) if len(tensor) else []
            out[name] = list(zip(flat[0::2], flat[1::2], strict=True))
        out["named"] = [(pair.a, pair.b) for pair in self.named]
        out["maps"] = [tuple(rows[i] for i in triple) for triple in self.triples.tolist()]
        return out

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

    @classmethod
    def build(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        source: Source = None,
        *,
        seed: int = 0,
        seq_len: int = DEFAULT_SEQ_LEN,
        n_prompts: int = DEFAULT_PROMPTS,
        n_similar: int = DEFAULT_SIMILAR,
        n_dissimilar: int = DEFAULT_DISSIMILAR,
        n_triples: int = DEFAULT_TRIPLES,
        handpicked: bool = True,
        pairs: Sequence[UserPair] = (),
        text_column: str = "text",
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        progress: bool = False,
    ) -> ProbeSet:
        """Draw a probe set from a token source, as docs/method.md §3.1 and §8 describe.

        The documents are encoded without special tokens (no BOS) and joined with the EOS token
        (or a blank line if the tokenizer has none; blank documents are skipped) into one stream,
        cut into consecutive non-overlapping windows of `seq_len` tokens. A private generator
        seeded with `seed` shuffles the windows: the first `n_prompts` are the random prompts,
        in that order, chained into pairs. Similar and dissimilar pairs come from the remaining
        windows in the same shuffled order, and from the random prompts only if those run out:
        - similar: two windows with the same final token and different earlier tokens;
        - dissimilar: a window, and the same window with its final token replaced by the
          (different) final token of the next unused window.
        Triples are (i, i+1, i+2) into the random prompts. The hand-picked pairs S1-S3 / D1-D3
        that survive this tokenizer and the user's `pairs` become `named`.

        Args:
            tokenizer: the tokenizer of the model(s) to be measured.
            source: a token source as accepted by `regionwatch.corpus.documents`; None for the
                built-in corpus. A one-shot iterator is read into a list first.
            seed: seeds the private generator; the global RNGs are never touched.
            seq_len: tokens per prompt, at least 2.
            n_prompts: random prompts, at least 2 (n_prompts - 1 chained pairs).
            n_similar: automatic similar pairs, >= 0.
            n_dissimilar: automatic dissimilar pairs, >= 0.
            n_triples: region-map triples, 0..n_prompts - 2.
            handpicked: include the paper's S1-S3 / D1-D3 pairs where this tokenizer allows.
            pairs: user pairs as (text_a, text_b) (named "U1", "U2", ...) or
                (name, text_a, text_b); each must tokenize to equal length with only the last
                token different.
            text_column: the text column of a `datasets.Dataset` source.
            max_tokens: stop reading the source once the stream has this many tokens; None
                reads it all. Windows are drawn from what was read.
            progress: show a progress bar over the documents while encoding.

        Returns:
            The probe set, with provenance recording how to rebuild it.

        Raises:
            ConfigError: a bad size or source, a source too short for the requested windows
                and pairs, or a user pair that does not tokenize as required.
        """
        drawn = draw(
            tokenizer,
            source,
            seed=seed,
            seq_len=seq_len,
            n_prompts=n_prompts,
            n_similar=n_similar,
            n_dissimilar=n_dissimilar,
            n_triples=n_triples,
            handpicked=handpicked,
            pairs=pairs,
            text_column=text_column,
            max_tokens=max_tokens,
            progress=progress,
        )
        probes = cls(
            random=drawn.random,
            similar=drawn.similar,
            dissimilar=drawn.dissimilar,
            named=drawn.named,
            triples=drawn.triples,
            provenance={"format_version": FORMAT_VERSION, **drawn.provenance},
        )
        logger.info("built %s", probes.summary())
        return probes

    def equals(self, other: object) -> bool:
        """Content equality: same ids (and dtypes), named pairs (with texts) and provenance.

        `==` stays identity, because a dataclass `__eq__` over tensors has no truth value and
        would make probe sets unhashable. Provenance is compared in its JSON form, the form it
        is saved in.
        """
        if not isinstance(other, ProbeSet):
            return False
        tensors = ("random", "similar", "dissimilar", "triples")
        return (
            all(_same_tensor(getattr(self, t), getattr(other, t)) for t in tensors)
            and self.named == other.named
            and _json_form(self.provenance) == _json_form(other.provenance)
        )

    def summary(self) -> str:
        """One readable line for logs and the CLI: counts, sizes, source and tokenizer."""
        p = self.provenance
        named = ", ".join(pair.name for pair in self.named) or "none"
        return (
            f"probe set {self.fingerprint}: {len(self.random)} prompts x "
            f"{self.random.shape[1]} tokens ({max(len(self.random) - 1, 0)} random pairs), "
            f"{len(self.similar)} similar, {len(self.dissimilar)} dissimilar, "
            f"{len(self.named)} named ({named}), {len(self.triples)} triples; "
            f"source {p.get('source', 'unknown')}; tokenizer {p.get('tokenizer_name', 'unknown')}"
            f" ({p.get('tokenizer_hash', 'no hash')}); seed {p.get('seed', 'unknown')}"
        )

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Refuse a tokenizer other than the one the probe set was built with.

        Token ids mean nothing under another vocabulary, so a run must measure with the
        tokenizer its probe set came from. A probe set without a recorded hash (made by hand)
        cannot be checked; that is logged, not refused.

        Raises:
            ConfigError: the tokenizer's hash differs from the recorded one.
        """
        recorded = self.provenance.get("tokenizer_hash")
        if recorded is None:
            logger.warning("probe set %s records no tokenizer hash; not checked", self.fingerprint)
            return
        current = tokenizer_hash(tokenizer)
        if current != recorded:
            raise ConfigError(
                f"probe set {self.fingerprint} was built with tokenizer "
                f"{self.provenance.get('tokenizer_name', 'unknown')!r} (hash {recorded}); this "
                f"run uses {tokenizer_name(tokenizer)!r} (hash {current}). Use the run's "
                "original tokenizer, or build a new probe set with this one (a new run)"
            )

    def save(self, path: str | Path) -> Path:
        """Write the probe set to a directory: `probes.safetensors` (ids) + `manifest.json`.

        The files are written to a temporary sibling directory that is renamed into place, so a
        crash never leaves a half probe set. Saving to a directory that already holds an equal
        probe set writes nothing (resume saves again); a different one is refused.

        Args:
            path: the directory to create; it may exist if empty.

        Returns:
            The directory.

        Raises:
            StoreError: `path` holds something else, or cannot be written.
            ConfigError: provenance that is not JSON-serializable, or a named pair whose
                prompts differ in length.
        """
        path = Path(path)
        if path.exists():
            if path.is_dir() and not any(path.iterdir()):
                pass  # an empty directory is replaced by the rename below
            elif (path / MANIFEST_FILE).is_file() and ProbeSet.load(path).equals(self):
                logger.debug("probe set %s already saved at %s", self.fingerprint, path)
                return path
            else:
                raise StoreError(
                    f"{path} already exists and does not hold this probe set "
                    f"({self.fingerprint}); refusing to overwrite it: delete it or save elsewhere"
                )
        data = safetensors.torch.save(self._tensors())
        manifest = {
            "format": PROBES_FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "tensors_sha256": hashlib.sha256(data).hexdigest(),
            "named": [
                {"name": p.name, "kind": p.kind, "text_a": p.text_a, "text_b": p.text_b}
                for p in self.named
            ],
            "provenance": _json_form(self.provenance),
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Not tempfile.mkdtemp: its 0o700 mode would stay on the probe set after the rename.
            # temp_path's mark lets a store's crash cleanup recognise a half-saved probe set.
            tmp = temp_path(path)
            tmp.mkdir()
        except OSError as err:
            raise StoreError(f"cannot create {path}: {err}") from err
        try:
            write_atomic(tmp / TENSORS_FILE, data)
            write_atomic(tmp / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
            tmp.rename(path)  # atomic: readers see no directory or a whole one
        except (OSError, StoreError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"cannot write probe set to {path}: {err}") from err
        sync_dir(path.parent)
        logger.debug("saved probe set %s to %s", self.fingerprint, path)
        return path

    @classmethod
    def load(
        cls, path: str | Path, *, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> ProbeSet:
        """Read a probe set written by `save`; it `equals` the saved one.

        Args:
            path: the directory `save` wrote.
            tokenizer: the run's tokenizer; if given, it must be the one the set was built with.

        Returns:
            The probe set.

        Raises:
            StoreError: a missing or damaged file (named in the message), a format this version
                cannot read, or ids that do not match the manifest's fingerprint.
            ConfigError: `tokenizer` differs from the one the probe set was built with.
        """
        path = Path(path)
        manifest_path, tensors_path = path / MANIFEST_FILE, path / TENSORS_FILE
        manifest = _read_manifest(manifest_path)
        try:
            data = tensors_path.read_bytes()
        except OSError as err:
            raise StoreError(f"{tensors_path}: cannot read the probe set's ids ({err})") from err
        expected = manifest.get("tensors_sha256")
        if hashlib.sha256(data).hexdigest() != expected:
            raise StoreError(
                f"{tensors_path}: damaged: its sha256 differs from the one in {MANIFEST_FILE} "
                f"({expected}); restore the file or rebuild the probe set"
            )
        probes = _from_files(manifest, _read_tensors(tensors_path, data), manifest_path)
        if probes.fingerprint != manifest.get("fingerprint"):
            raise StoreError(
                f"{tensors_path}: its token ids give fingerprint {probes.fingerprint}, but "
                f"{manifest_path} says {manifest.get('fingerprint')}; the files do not belong "
                "together"
            )
        if tokenizer is not None:
            probes.check_tokenizer(tokenizer)
        return probes

    def _tensors(self) -> dict[str, Tensor]:
        # Named pairs vary in length; A and B of one pair never do, so their ids are stacked as
        # columns of one [total_tokens, 2] tensor, split back by `named_lengths`.
        for p in self.named:
            if len(p.a) != len(p.b):
                raise ConfigError(
                    f"named pair {p.name!r}: A has {len(p.a)} token ids and B has {len(p.b)}; "
                    "a pair's prompts must have equal length"
                )
        lengths = [len(p.a) for p in self.named]
        ids = [[x, y] for p in self.named for x, y in zip(p.a, p.b, strict=True)]
        return {
            "random": self.random.to(torch.int64).contiguous(),
            "similar": self.similar.to(torch.int64).contiguous(),
            "dissimilar": self.dissimilar.to(torch.int64).contiguous(),
            "triples": self.triples.to(torch.int64).contiguous(),
            "named_ids": torch.tensor(ids, dtype=torch.int64).reshape(-1, 2),
            "named_lengths": torch.tensor(lengths, dtype=torch.int64),
        }


def prompt_list(ids: PromptIds, name: str) -> list[Prompt]:
    """Normalize prompts given as a LongTensor [P, S] or token-id lists into tuples of ints.

    Raises:
        ConfigError: not 2-D, not integers, no prompts, or a prompt shorter than 2 tokens.
    """
    if isinstance(ids, Tensor):
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:  # noqa: PLR2004
            raise ConfigError(
                f"{name}: a tensor of prompts must be an integer tensor [prompts, tokens], "
                f"got dtype {ids.dtype} shape {tuple(ids.shape)}"
            )
        prompts = [tuple(int(t) for t in row) for row in ids.tolist()]
    else:
        try:
            prompts = [tuple(int(t) for t in p) for p in ids]
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"{name}: expected a LongTensor [prompts, tokens] or lists of token "
                f"ids, got {type(ids).__name__}: {err}"
            ) from err
        if any(float(t) != int(t) for p in ids for t in p):
            raise ConfigError(f"{name}: token ids must be integers")
    if not prompts:
        raise ConfigError(f"{name}: no prompts given")
    for i, p in enumerate(prompts):
        if len(p) < MIN_SEQ_LEN:
            raise ConfigError(
                f"{name}[{i}] has {len(p)} token(s); a prompt needs at least "
                f"{MIN_SEQ_LEN}: the patched last token attends to the ones before it"
            )
    return prompts


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _json_form(value: Mapping[str, Any]) -> Any:
    try:
        return json.loads(json.dumps(dict(value), sort_keys=True))
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"ProbeSet.provenance must be JSON-serializable (it is saved as JSON): {err}"
        ) from err


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise StoreError(
            f"{path}: missing; {path.parent} is not a saved probe set (it needs {MANIFEST_FILE} "
            f"and {TENSORS_FILE})"
        ) from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{path}: damaged, not readable JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != PROBES_FORMAT:
        raise StoreError(
            f"{path}: not a regionwatch probe-set manifest (no format {PROBES_FORMAT!r})"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"{path}: format_version {version!r}; this regionwatch reads up to {FORMAT_VERSION}; "
            "upgrade regionwatch"
        )
    return manifest


def _read_tensors(path: Path, data: bytes) -> dict[str, Tensor]:
    try:
        tensors = safetensors.torch.load(data)
    except SafetensorError as err:
        raise StoreError(f"{path}: damaged safetensors file ({err})") from err
    missing = [name for name in TENSOR_NAMES if name not in tensors]
    if missing:
        raise StoreError(f"{path}: missing tensors {missing}; expected {list(TENSOR_NAMES)}")
    wrong = [name for name in TENSOR_NAMES if tensors[name].dtype != torch.int64]
    if wrong:
        raise StoreError(f"{path}: tensors {wrong} are not int64 token ids")
    return tensors


def _from_files(
    manifest: Mapping[str, Any], tensors: Mapping[str, Tensor], manifest_path: Path
) -> ProbeSet:
    try:
        entries = manifest["named"]
        lengths = tensors["named_lengths"].tolist()
        if len(lengths) != len(entries) or sum(lengths) != len(tensors["named_ids"]):
            raise ValueError(
                f"{len(entries)} named pairs in the manifest, {len(lengths)} with "
                f"{sum(lengths)} tokens in {TENSORS_FILE}"
            )
        named, start = [], 0
        for entry, length in zip(entries, lengths, strict=True):
            ids = tensors["named_ids"][start : start + length].tolist()
            start += length
            named.append(
                NamedPair(
                    name=entry["name"],
                    kind=entry["kind"],
                    a=tuple(x for x, _ in ids),
                    b=tuple(y for _, y in ids),
                    text_a=entry["text_a"],
                    text_b=entry["text_b"],
                )
            )
        provenance = dict(manifest["provenance"])
    except (KeyError, TypeError, ValueError) as err:
        raise StoreError(f"{manifest_path}: malformed ({err!r})") from err
    return ProbeSet(
        random=tensors["random"],
        similar=tensors["similar"],
        dissimilar=tensors["dissimilar"],
        named=tuple(named),
        triples=tensors["triples"],
        provenance=provenance,
    )
