"""Token sources, their provenance labels, token streams and the locally trained tokenizer."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from regionwatch.corpus import (
    BUILTIN_NAME,
    EOS_TOKEN,
    builtin_text,
    describe,
    documents,
    token_stream,
    tokenizer_hash,
    train_tokenizer,
)
from regionwatch.errors import ConfigError

BUILTIN_SHA256 = (
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # data/README.md
)
SMALL_VOCAB = 300


@pytest.fixture
def text_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second")
    (folder / "a.txt").write_text("first")
    (folder / "sub" / "c.txt").write_text("third")
    (folder / "notes.md").write_text("not text")
    return folder


def test_builtin_text_is_the_shipped_public_domain_corpus():
    """The package's gzip holds Tiny Shakespeare byte for byte, compressed deterministically."""
    text = builtin_text()
    assert hashlib.sha256(text.encode()).hexdigest() == BUILTIN_SHA256
    assert text.startswith("First Citizen:")
    archive = Path(__file__).parents[1] / "regionwatch" / "data" / "tinyshakespeare.txt.gz"
    assert archive.read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime field is 0
    assert gzip.decompress(archive.read_bytes()).decode() == text


def test_documents_none_is_the_builtin_corpus_as_one_document():
    """source=None yields the built-in text once."""
    assert list(documents(None)) == [builtin_text()]


def test_documents_dataset_reads_the_text_column_in_order():
    """A Dataset yields its text column row by row, across Arrow batches."""
    rows = [f"doc {i}" for i in range(2500)]  # more than one batch of 1000 rows
    dataset = datasets.Dataset.from_dict({"text": rows, "id": list(range(2500))})
    assert list(documents(dataset)) == rows


def test_documents_dataset_other_column():
    """text_column picks the column."""
    dataset = datasets.Dataset.from_dict({"body": ["x", "y"], "title": ["t1", "t2"]})
    assert list(documents(dataset, text_column="body")) == ["x", "y"]


def test_documents_dataset_missing_column_names_the_available_ones():
    """A missing column is a ConfigError listing the dataset's columns, before any read."""
    dataset = datasets.Dataset.from_dict({"body": ["x"], "id": [1]})
    with pytest.raises(ConfigError, match=r"no column 'text'.*\['body', 'id'\].*text_column="):
        documents(dataset)


def test_documents_dataset_non_string_row_is_refused():
    """A non-string cell is refused with its row number."""
    dataset = datasets.Dataset.from_dict({"text": [1, 2]})
    with pytest.raises(ConfigError, match="row 0 is a int"):
        list(documents(dataset))


@pytest.mark.parametrize("as_str", [True, False])
def test_documents_file_is_one_document(tmp_path: Path, as_str: bool):
    """A text file, given as str or Path, is one document."""
    file = tmp_path / "t.txt"
    file.write_text("line one\nline two\n")
    assert list(documents(str(file) if as_str else file)) == ["line one\nline two\n"]


def test_documents_folder_reads_txt_files_sorted_and_recursive(text_folder: Path):
    """A folder yields every .txt below it, sorted by relative path; other files are ignored."""
    assert list(documents(text_folder)) == ["first", "second", "third"]


def test_documents_empty_folder_is_refused(tmp_path: Path):
    """A folder without .txt files is a ConfigError naming it."""
    (tmp_path / "x.md").write_text("x")
    with pytest.raises(ConfigError, match=r"holds no \.txt files"):
        documents(tmp_path)


def test_documents_missing_path_is_refused(tmp_path: Path):
    """A Path that does not exist is a ConfigError."""
    with pytest.raises(ConfigError, match="does not exist"):
        documents(tmp_path / "nope.txt")


@pytest.mark.parametrize("text", ["To be, or not to be", ""])
def test_documents_bare_string_is_not_read_as_characters(text: str):
    """A string that is not an existing path is refused, never iterated character by character."""
    with pytest.raises(ConfigError, match="pass a list of documents"):
        documents(text)


def test_documents_list_tuple_and_generator():
    """Lists, tuples and generators of strings yield their strings in order."""
    assert list(documents(["a", "b"])) == ["a", "b"]
    assert list(documents(("a", "b"))) == ["a", "b"]
    assert list(documents(s for s in ["a", "b"])) == ["a", "b"]


def test_documents_non_string_item_is_refused():
    """A list item that is not a str is refused with its index."""
    with pytest.raises(ConfigError, match="document 1 is a int"):
        list(documents(["a", 3]))


@pytest.mark.parametrize("source", [3, b"bytes", {"text": "a"}])
def test_documents_unknown_source_kind_is_refused(source: object):
    """Anything else is a ConfigError listing the accepted kinds."""
    with pytest.raises(ConfigError, match=r"pass None .*datasets\.Dataset.*path.*list"):
        documents(source)


def test_describe_labels_every_source_kind(tmp_path: Path, text_folder: Path):
    """describe names the kind, the location and a content hash."""
    file = tmp_path / "t.txt"
    file.write_bytes(b"hello")
    file_hash = hashlib.sha256(b"hello").hexdigest()[:12]
    assert describe(None) == f"builtin:{BUILTIN_NAME}"
    assert describe(str(file)) == f"file:{file.resolve()} (sha256 {file_hash})"
    assert describe(text_folder).startswith(f"folder:{text_folder.resolve()} (3 .txt files, sha256")
    dataset = datasets.Dataset.from_dict({"text": ["a", "b", "c"]})
    assert describe(dataset) == "dataset:in-memory column 'text', 3 rows"
    assert describe(["a", "b"]).startswith("documents: 2 strings (sha256 ")


def test_describe_hash_follows_content(text_folder: Path):
    """Different documents (or a renamed file) give a different label; equal ones the same."""
    assert describe(["a", "b"]) == describe(("a", "b"))
    assert describe(["a", "b"]) != describe(["ab"])
    before = describe(text_folder)
    (text_folder / "a.txt").rename(text_folder / "z.txt")
    assert describe(text_folder) != before


def test_describe_does_not_consume_a_one_shot_iterator():
    """An iterator is described by type; it can still be read afterwards."""
    docs = iter(["a", "b"])
    assert "one-shot" in describe(docs)
    assert list(docs) == ["a", "b"]


def test_train_tokenizer_is_deterministic(corpus_text: str, text_tokenizer):
    """Training twice on the same text gives the same vocabulary, merges and hash."""
    again = train_tokenizer([corpus_text], vocab_size=2048)
    assert tokenizer_hash(again) == tokenizer_hash(text_tokenizer)
    assert again.get_vocab() == text_tokenizer.get_vocab()
    smaller = train_tokenizer([corpus_text], vocab_size=1024)
    assert tokenizer_hash(smaller) != tokenizer_hash(text_tokenizer)


def test_train_tokenizer_special_tokens(text_tokenizer):
    """EOS is <|endoftext|>, pad is EOS, there is no BOS and encoding adds no special token."""
    assert len(text_tokenizer) == 2048
    assert text_tokenizer.eos_token == EOS_TOKEN
    assert text_tokenizer.pad_token_id == text_tokenizer.eos_token_id
    assert text_tokenizer.bos_token is None
    ids = text_tokenizer(" to be or not")["input_ids"]
    assert text_tokenizer.eos_token_id not in ids
    assert text_tokenizer.convert_tokens_to_ids(EOS_TOKEN) == text_tokenizer.eos_token_id


def test_train_tokenizer_round_trips_any_text(corpus_text: str, text_tokenizer):
    """Byte-level BPE decodes to exactly the input, also for characters it never saw."""
    text = corpus_text[:5000] + " café \u2013 naïve ✓ 東京\r\n\ttabs"
    ids = text_tokenizer(text)["input_ids"]
    assert text_tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2  # merges were learned: about 3 characters per token


def test_train_tokenizer_refuses_bad_input():
    """A bare string, a tiny vocabulary or no text at all is a ConfigError."""
    with pytest.raises(ConfigError, match="not a bare string"):
        train_tokenizer("some text")
    with pytest.raises(ConfigError, match=r"vocab_size=10.*>= 257"):
        train_tokenizer(["some text"], vocab_size=10)
    with pytest.raises(ConfigError, match="empty"):
        train_tokenizer([], vocab_size=SMALL_VOCAB)


def test_tokenizer_hash_survives_save_load_and_padding(tmp_path: Path, text_tokenizer):
    """The hash is the same after save_pretrained/from_pretrained and after padded calls."""
    before = tokenizer_hash(text_tokenizer)
    text_tokenizer.save_pretrained(tmp_path)
    assert tokenizer_hash(AutoTokenizer.from_pretrained(tmp_path)) == before
    text_tokenizer(["a b c d", "a"], padding=True, truncation=True, max_length=2)
    assert tokenizer_hash(text_tokenizer) == before


def test_tokenizer_hash_is_equal_across_processes():
    """Another Python process trains the same tokenizer with the same hash."""
    code = (
        "from regionwatch.corpus import builtin_text, train_tokenizer, tokenizer_hash; "
        "print(tokenizer_hash(train_tokenizer([builtin_text()[:50000]], vocab_size=300)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = tokenizer_hash(train_tokenizer([builtin_text()[:50000]], vocab_size=SMALL_VOCAB))
    assert out.stdout.strip() == here


def test_token_stream_joins_documents_with_eos_and_skips_blank_ones(text_tokenizer):
    """Documents are encoded without special tokens and joined by one EOS; blank ones vanish."""
    docs = [" to be", "", "   \n", " or not"]
    stream = token_stream(text_tokenizer, docs)
    eos = text_tokenizer.eos_token_id
    one, two = (
        text_tokenizer(d, add_special_tokens=False)["input_ids"] for d in (" to be", " or not")
    )
    assert stream.ids.tolist() == [*one, eos, *two]
    assert stream.separator == {"kind": "eos", "text": EOS_TOKEN, "ids": [eos]}
    assert not stream.truncated


def test_token_stream_stops_at_max_tokens(text_tokenizer):
    """max_tokens cuts the stream and says so."""
    stream = token_stream(text_tokenizer, [" to be or not to be"] * 500, max_tokens=50)
    assert len(stream.ids) == 50
    assert stream.truncated


def test_token_stream_without_eos_joins_with_a_blank_line(text_tokenizer):
    """A tokenizer without EOS joins documents with the ids of a blank line and records it."""
    backend = Tokenizer.from_str(text_tokenizer.backend_tokenizer.to_str())
    plain = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert plain.eos_token_id is None
    stream = token_stream(plain, [" a", " b"])
    blank = plain("\n\n", add_special_tokens=False)["input_ids"]
    assert stream.separator == {"kind": "text", "text": "\n\n", "ids": blank}
    assert stream.ids.tolist() == [*plain(" a")["input_ids"], *blank, *plain(" b")["input_ids"]]
