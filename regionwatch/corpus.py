"""Token sources for probe sets and the demo: the built-in corpus, text files, datasets, lists.

A probe set is drawn from text (docs/method.md §3.1); this module turns whatever the user has into
documents and then into one token stream, describes the source and the tokenizer for
provenance, and trains the small local tokenizer the demo and the tests use. Nothing here
downloads: the built-in corpus ships in the package.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from regionwatch.errors import ConfigError, RegionWatchError, check_int

logger = logging.getLogger(__name__)

BUILTIN_NAME = "tinyshakespeare"
BUILTIN_FILE = "tinyshakespeare.txt.gz"  # regionwatch/data/, see its README.md
EOS_TOKEN = "<|endoftext|>"  # GPT-2's spelling, so that users recognise it in decoded windows
DEFAULT_VOCAB_SIZE = 2048  # the demo's model is tiny; 2048 keeps its embedding small
BYTE_ALPHABET_SIZE = 256  # byte-level BPE starts from every byte value
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + 1  # all bytes plus the EOS token, before any merge
TEXT_SUFFIX = ".txt"
DATASET_BATCH_ROWS = 1000  # rows read per Arrow batch: bounded memory, few Python round trips
HASH_CHARS = 12  # enough to tell sources apart in a log line
TOKENIZER_HASH_CHARS = 16  # as many hex digits as `ProbeSet.fingerprint`
TEXT_SEPARATOR = "\n\n"  # joins documents when the tokenizer has no EOS token
ENCODE_BATCH_DOCS = 64  # documents per encode call: the fast tokenizer runs a batch in parallel
# The parts of a fast tokenizer that decide which text gets which id. Padding, truncation and the
# post-processor are left out: HF changes the first two on every call with padding=/truncation=,
# and may rewrite the last on load, without changing any id.
HASHED_TOKENIZER_PARTS = ("model", "added_tokens", "normalizer", "pre_tokenizer")
SHOWN_CHARS = 60  # a mistaken string source may be a whole text; error messages show its start

Source = Any  # None | datasets.Dataset | str | Path | Iterable[str]; see `documents`


def builtin_text() -> str:
    """The built-in corpus (Tiny Shakespeare, public domain, about 1.1 MB) as one string.

    Returns:
        The whole text, decoded as UTF-8.

    Raises:
        RegionWatchError: the package data is missing (a broken install).
    """
    resource = importlib.resources.files("regionwatch") / "data" / BUILTIN_FILE
    try:
        return gzip.decompress(resource.read_bytes()).decode("utf-8")
    except FileNotFoundError as err:
        raise RegionWatchError(
            f"built-in corpus {BUILTIN_FILE} is missing from regionwatch/data/: the package data "
            "was not installed; reinstall regionwatch"
        ) from err


def documents(source: Source = None, *, text_column: str = "text") -> Iterator[str]:
    """Yield the documents of a token source, one string each, in a fixed order.

    Args:
        source: where the text comes from:
            - None: the built-in corpus, as one document;
            - a `datasets.Dataset`: the strings in column `text_column`, row by row;
            - a `str` or `Path` of an existing text file (one document) or folder (every
              `*.txt` below it, recursively, sorted by relative path, one document per file);
            - a list, tuple or other iterable of document strings (read once).
        text_column: the dataset column holding the text; ignored for other sources.

    Returns:
        An iterator over the document strings, in the source's order.

    Raises:
        ConfigError: an unknown source kind, a bare string that is not an existing path, a
            missing dataset column, a missing or empty file or folder, or a non-string
            document. Errors about the source itself are raised before the first document.
    """
    _check_source(source, text_column)  # eager: a bad source fails here, not when first read
    return _documents(source, text_column)


def describe(source: Source = None, *, text_column: str = "text") -> str:
    """A one-line provenance label for a token source, with a content hash where it is cheap.

    Args:
        source: a source as accepted by `documents`.
        text_column: the dataset column, for datasets.

    Returns:
        For example "builtin:tinyshakespeare", "file:/abs/a.txt (sha256 0123456789ab)",
        "folder:/abs/texts (3 .txt files, sha256 ...)", "dataset:wikitext/train column 'text',
        36718 rows" or "documents: 5 strings (sha256 ...)". A one-shot iterator cannot be
        hashed without consuming it and is described by its type only.

    Raises:
        ConfigError: as for `documents`.
    """
    _check_source(source, text_column)
    if source is None:
        return f"builtin:{BUILTIN_NAME}"
    if _is_dataset(source):
        info = source.info
        label = "/".join(n for n in (info.dataset_name, info.config_name) if n) or "in-memory"
        split = f"[{source.split}]" if source.split else ""
        return f"dataset:{label}{split} column {text_column!r}, {source.num_rows} rows"
    if isinstance(source, str | Path):
        path = Path(source).resolve()
        if path.is_file():
            return f"file:{path} (sha256 {_short(hashlib.sha256(path.read_bytes()))})"
        files = _text_files(path)
        digest = hashlib.sha256()
        for file in files:  # names too: renaming a file reorders the documents
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            digest.update(file.read_bytes() + b"\0")
        return f"folder:{path} ({len(files)} {TEXT_SUFFIX} files, sha256 {_short(digest)})"
    if isinstance(source, Iterator):
        return f"documents: one-shot {type(source).__name__} (not hashed; pass a list to hash it)"
    digest = hashlib.sha256()
    count = 0
    for doc in _checked_strings(source):
        digest.update(doc.encode() + b"\0")  # separator: ["ab"] and ["a", "b"] differ
        count += 1
    return f"documents: {count} strings (sha256 {_short(digest)})"


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer locally, deterministically, with the `tokenizers` library.

    The demo and the tests need a tokenizer without the hub. Byte-level BPE (GPT-2's scheme)
    encodes any text without unknown tokens. The same texts and size always give the same
    vocabulary and merges, hence the same `regionwatch.probes.tokenizer_hash`.

    Special tokens: EOS is "<|endoftext|>" (id 0), used to join documents into one stream. The
    pad token is the same EOS token, as for GPT-2: HF data collators need a pad token, and
    padding is masked out, so it never needs an id of its own. No BOS is defined or added
    (docs/method.md §3.1: probe prompts carry no BOS).

    Args:
        texts: training documents, e.g. `documents(source)`; a bare string is refused (it would
            be read character by character).
        vocab_size: final vocabulary size including the EOS token, at least 257 (256 bytes +
            EOS); BPE stops early when the text has no more pairs to merge.

    Returns:
        A `transformers.PreTrainedTokenizerFast` named "regionwatch-bpe-<vocab_size>".

    Raises:
        ConfigError: a bare string, a non-string text, no text at all, or a vocab_size out of
            range.

    Example:
        >>> tokenizer = train_tokenizer(documents(None), vocab_size=2048)
        >>> tokenizer.decode(tokenizer(" to be or not")["input_ids"])
        ' to be or not'
    """
    if isinstance(texts, str | bytes):
        raise ConfigError(
            "train_tokenizer(texts=<a single string>): pass a list of documents, e.g. [text], "
            "not a bare string (it would be read one character at a time)"
        )
    check_int(
        "train_tokenizer: vocab_size",
        vocab_size,
        minimum=MIN_VOCAB_SIZE,
        hint=f"{BYTE_ALPHABET_SIZE} byte tokens plus {EOS_TOKEN}",
    )
    chars = 0

    def counted() -> Iterator[str]:
        nonlocal chars
        for text in _checked_strings(texts):
            chars += len(text)
            yield text

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknown tokens
        show_progress=False,
    )
    backend.train_from_iterator(counted(), trainer=trainer)
    if chars == 0:
        raise ConfigError("train_tokenizer: the texts are empty; give at least one non-empty text")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        name_or_path=f"regionwatch-bpe-{vocab_size}",
    )
    logger.debug("trained byte-level BPE: %d tokens from %d characters", len(tokenizer), chars)
    return tokenizer


@dataclass(frozen=True)
class TokenStream:
    """A token source encoded as one stream, the way docs/method.md §3.1 cuts prompts from it.

    Attributes:
        ids: the token ids, [tokens] int64.
        separator: what joins documents: {"kind": "eos" | "text", "text": ..., "ids": [...]}.
        truncated: True if reading stopped at `max_tokens` before the source ended.
    """

    ids: np.ndarray
    separator: Mapping[str, Any]
    truncated: bool


def token_stream(
    tokenizer: PreTrainedTokenizerBase,
    source: Source = None,
    *,
    text_column: str = "text",
    max_tokens: int | None = None,
    progress: bool = False,
) -> TokenStream:
    """Encode a token source without special tokens and join its documents into one stream.

    Documents are joined with the EOS token as TransformerLens's `tokenize_and_concatenate` does
    (docs/method.md §3.1); a tokenizer without EOS joins them with a blank line. No BOS is added.
    Blank documents are skipped: they would only add separators. Documents are encoded in
    batches, which a fast tokenizer runs in parallel.

    Args:
        tokenizer: any HF tokenizer.
        source: a source as accepted by `documents`.
        text_column: the dataset column, for datasets.
        max_tokens: stop reading once the stream has this many tokens (and cut it there); None
            reads the whole source.
        progress: show a progress bar over the documents.

    Returns:
        The stream.

    Raises:
        ConfigError: as for `documents`.
    """
    docs = documents(source, text_column=text_column)
    eos = tokenizer.eos_token_id
    if eos is not None:
        separator = {"kind": "eos", "text": tokenizer.eos_token, "ids": [int(eos)]}
    else:
        ids = encode(tokenizer, [TEXT_SEPARATOR])[0]
        separator = {"kind": "text", "text": TEXT_SEPARATOR, "ids": [int(i) for i in ids]}
    sep = np.asarray(separator["ids"], dtype=np.int64)
    pieces: list[np.ndarray] = []
    total = 0
    truncated = False
    with tqdm(desc="encoding", unit="doc", disable=not progress) as bar:
        for batch in _batches(d for d in docs if d.strip()):
            for ids in encode(tokenizer, batch):
                if pieces:
                    pieces.append(sep)
                    total += len(sep)
                pieces.append(np.asarray(ids, dtype=np.int64))
                total += len(ids)
            bar.update(len(batch))
            if max_tokens is not None and total >= max_tokens:
                truncated = True  # the source may have ended here too; we cannot tell cheaply
                break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    return TokenStream(ids=stream, separator=separator, truncated=truncated)


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (probe prompts carry no BOS, §3.1)."""
    # verbose=False silences "longer than model_max_length": that limit is about model inputs,
    # and a corpus document is not one.
    encoded = tokenizer(
        list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False
    )
    return encoded["input_ids"]


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable hash (16 hex chars) of what maps text to ids: vocabulary, merges, normalization.

    Equal for the same tokenizer across processes and save/load round trips; independent of
    padding and truncation settings.

    Args:
        tokenizer: a fast tokenizer (its backend's JSON is hashed) or a slow one (its class and
            vocabulary are hashed).

    Returns:
        The hash.
    """
    if isinstance(tokenizer, PreTrainedTokenizerFast):
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        content: Any = {part: spec.get(part) for part in HASHED_TOKENIZER_PARTS}
    else:
        content = {
            "class": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
        }
    encoded = json.dumps(content, sort_keys=True, ensure_ascii=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:TOKENIZER_HASH_CHARS]


def tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's `name_or_path`, or its class name if it has none."""
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == ENCODE_BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def _documents(source: Source, text_column: str) -> Iterator[str]:
    if source is None:
        yield builtin_text()
    elif _is_dataset(source):
        for batch in source.select_columns([text_column]).iter(batch_size=DATASET_BATCH_ROWS):
            yield from _checked_strings(batch[text_column], what=f"column {text_column!r} row")
    elif isinstance(source, str | Path):
        path = Path(source)
        for file in [path] if path.is_file() else _text_files(path):
            yield _read_text(file)
    else:
        yield from _checked_strings(source)


def _check_source(source: Source, text_column: str) -> None:
    """Refuse a source that cannot be read, before anything is read from it."""
    if source is None:
        return
    if _is_dataset(source):
        columns = source.column_names
        if text_column not in columns:
            raise ConfigError(
                f"dataset has no column {text_column!r}; its columns are {columns}; pass "
                "text_column=<the column holding the text>"
            )
        return
    if isinstance(source, str | Path):
        if isinstance(source, str) and not source.strip():  # Path("") is the working directory
            raise ConfigError(
                "source='' is an empty string; pass a list of documents or an existing path"
            )
        path = Path(source)
        if path.is_file():
            return
        if path.is_dir():
            _text_files(path)  # raises if empty
            return
        if isinstance(source, str):  # a bare string is never read as an iterable of characters
            shown = source if len(source) <= SHOWN_CHARS else source[: SHOWN_CHARS - 3] + "..."
            raise ConfigError(
                f"source={shown!r} is a string but not an existing file or folder; pass a list "
                "of documents (e.g. [text]) or an existing path"
            )
        raise ConfigError(f"source path {str(path)!r} does not exist; give a text file or folder")
    if isinstance(source, bytes | Mapping) or not isinstance(source, Iterable):
        raise ConfigError(
            f"source of type {type(source).__name__} is not a token source; pass None (the "
            "built-in corpus), a datasets.Dataset, a path to a text file or folder, or a list "
            "of document strings"
        )


def _is_dataset(source: object) -> bool:
    # Checked through sys.modules: if `datasets` was never imported, `source` cannot be one of
    # its datasets, and `import regionwatch` stays free of its ~1 s import.
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(source, datasets.Dataset)


def _text_files(folder: Path) -> list[Path]:
    files = sorted(
        (p for p in folder.rglob(f"*{TEXT_SUFFIX}") if p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise ConfigError(
            f"folder {str(folder.resolve())!r} holds no {TEXT_SUFFIX} files (searched "
            f"recursively); put the text in *{TEXT_SUFFIX} files or pass a file path"
        )
    return files


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{file}: not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8"
        ) from err


def _checked_strings(items: Iterable[Any], *, what: str = "document") -> Iterator[str]:
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigError(
                f"{what} {i} is a {type(item).__name__}, not a str; every document must be text"
            )
        yield item


def _short(digest: Any) -> str:
    return digest.hexdigest()[:HASH_CHARS]
