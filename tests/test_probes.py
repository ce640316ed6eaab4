"""ProbeSet: building from a token source (method.md §3, §8), invariants, save/load, measuring."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from regionwatch.corpus import tokenizer_hash, train_tokenizer
from regionwatch.errors import ConfigError, StoreError
from regionwatch.measurement import ProbeConfig, measure
from regionwatch.probes import MANIFEST_FILE, TENSORS_FILE, ProbeSet
from regionwatch.sampling import HANDPICKED

SMALL_TEXT_CHARS = 40_000  # about 13k tokens: plenty of windows, encodes in milliseconds


def aligned_windows(tokenizer, docs: list[str], seq_len: int) -> set[tuple[int, ...]]:
    """Every window of the stream at offsets k * seq_len, encoded here independently."""
    stream: list[int] = []
    for doc in docs:
        if stream:
            stream.append(tokenizer.eos_token_id)
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"]
    count = len(stream) // seq_len
    return {tuple(stream[k * seq_len : (k + 1) * seq_len]) for k in range(count)}


def check_invariants(probes: ProbeSet, windows: set[tuple[int, ...]], seq_len: int) -> None:
    """What every built probe set satisfies, whatever the sizes and seed."""
    n_prompts = probes.provenance["n_prompts"]
    assert probes.random.shape == (n_prompts, seq_len)
    assert probes.similar.shape == (probes.provenance["n_similar"], 2, seq_len)
    assert probes.dissimilar.shape == (probes.provenance["n_dissimilar"], 2, seq_len)
    for tensor in (probes.random, probes.similar, probes.dissimilar, probes.triples):
        assert tensor.dtype == torch.int64
    rows = [tuple(r) for r in probes.random.tolist()]
    assert all(r in windows for r in rows)  # real, aligned substrings of the stream
    for a, b in probes.similar.tolist():
        assert tuple(a) in windows
        assert tuple(b) in windows
        assert a[-1] == b[-1]
        assert a[:-1] != b[:-1]
    finals = {w[-1] for w in windows}
    for a, b in probes.dissimilar.tolist():
        assert tuple(a) in windows
        assert a[:-1] == b[:-1]
        assert a[-1] != b[-1]
        assert b[-1] in finals
    n_triples = probes.provenance["n_triples"]
    assert probes.triples.tolist() == [[i, i + 1, i + 2] for i in range(n_triples)]
    contexts, partners = probes.random_pairs
    assert torch.equal(contexts[1:], partners[:-1])  # chained: B of pair i is A of pair i + 1


@pytest.fixture(scope="module")
def small_docs(corpus_text: str) -> list[str]:
    return [corpus_text[:SMALL_TEXT_CHARS]]


@pytest.fixture(scope="module")
def other_tokenizer(corpus_text: str):
    """A tokenizer with another vocabulary size: same text, different ids."""
    return train_tokenizer([corpus_text[:SMALL_TEXT_CHARS]], vocab_size=1024)


def test_build_default_sizes_follow_the_paper(builtin_probes, text_tokenizer, corpus_text):
    """100 windows of 10 tokens, 16 + 16 automatic pairs, 4 triples, all real windows."""
    assert builtin_probes.random.shape == (100, 10)
    assert len(builtin_probes.random_pairs[0]) == 99
    assert builtin_probes.triples.tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]]
    windows = aligned_windows(text_tokenizer, [corpus_text], 10)
    check_invariants(builtin_probes, windows, 10)
    assert len(set(map(tuple, builtin_probes.random.tolist()))) == 100  # without replacement


def test_build_same_seed_gives_identical_probe_set(builtin_probes, text_tokenizer):
    """Building again with the same seed gives equal ids, fingerprint and provenance."""
    again = ProbeSet.build(text_tokenizer, seed=0)
    assert again.equals(builtin_probes)
    assert again.fingerprint == builtin_probes.fingerprint
    assert torch.equal(again.random, builtin_probes.random)
    assert torch.equal(again.similar, builtin_probes.similar)
    assert torch.equal(again.dissimilar, builtin_probes.dissimilar)


def test_build_different_seed_gives_different_prompts(text_tokenizer, small_docs):
    """Another seed draws other windows."""
    one = ProbeSet.build(text_tokenizer, small_docs, seed=0)
    two = ProbeSet.build(text_tokenizer, small_docs, seed=1)
    assert one.fingerprint != two.fingerprint
    assert not torch.equal(one.random, two.random)
    assert not one.equals(two)


def test_build_leaves_global_rngs_alone(text_tokenizer, small_docs):
    """Sampling uses a private generator: torch, numpy and random states are untouched."""
    states = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    ProbeSet.build(text_tokenizer, small_docs, seed=3)
    assert torch.equal(torch.random.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


def test_build_automatic_pairs_avoid_random_prompts(builtin_probes):
    """With enough text, similar/dissimilar pairs come from windows that are not prompts."""
    prompts = {tuple(r) for r in builtin_probes.random.tolist()}
    used = [tuple(a) for a, _ in builtin_probes.dissimilar.tolist()]
    used += [tuple(w) for pair in builtin_probes.similar.tolist() for w in pair]
    assert not prompts & set(used)
    assert builtin_probes.provenance["pairs_reuse_random"] is False


def test_build_reuses_random_prompts_only_when_text_runs_out(text_tokenizer, small_docs):
    """A source with few spare windows still gives its pairs, and says it reused prompts."""
    windows = aligned_windows(text_tokenizer, small_docs, 10)
    probes = ProbeSet.build(text_tokenizer, small_docs, n_prompts=len(windows) - 5)
    assert probes.provenance["pairs_reuse_random"] is True
    check_invariants(probes, windows, 10)


def test_build_pairs_skip_degenerate_partners(text_tokenizer):
    """Identical windows never form a similar pair; a donor ending alike is skipped."""
    # One token per word, so the windows are known: most end in " the", many are identical.
    windows = [" I of the"] * 50 + [" you my the"] * 50 + [" a to and"] * 10
    text = "".join(windows)
    ids = text_tokenizer(text)["input_ids"]
    assert len(ids) == 3 * len(windows)  # the precondition: every word is one token
    probes = ProbeSet.build(
        text_tokenizer, [text], seq_len=3, n_prompts=4, n_similar=8, n_dissimilar=8, n_triples=2
    )
    check_invariants(probes, aligned_windows(text_tokenizer, [text], 3), 3)


def test_build_prompts_carry_no_bos(text_tokenizer, small_docs):
    """A tokenizer that prepends BOS on encode still gives windows without it (method.md §3.1)."""
    backend = Tokenizer.from_str(text_tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    with_bos = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>"
    )
    assert with_bos(" to be")["input_ids"][0] == bos  # the tokenizer really adds one
    probes = ProbeSet.build(with_bos, small_docs)
    ids = [probes.random, probes.similar, probes.dissimilar]
    ids += [torch.tensor(p.a + p.b) for p in probes.named]
    assert all(not (t == bos).any() for t in ids)


def test_build_from_dataset_folder_and_generator(text_tokenizer, small_docs, tmp_path: Path):
    """Every source kind builds; provenance describes it."""
    lines = small_docs[0].split("\n\n")
    dataset = datasets.Dataset.from_dict({"body": lines})
    from_dataset = ProbeSet.build(text_tokenizer, dataset, text_column="body", n_prompts=20)
    assert from_dataset.provenance["source"].startswith("dataset:in-memory column 'body'")
    check_invariants(from_dataset, aligned_windows(text_tokenizer, lines, 10), 10)
    for i, line in enumerate(lines[:50]):
        (tmp_path / f"{i:03d}.txt").write_text(line)
    from_folder = ProbeSet.build(text_tokenizer, tmp_path, n_prompts=20, n_similar=2)
    assert from_folder.provenance["source"].startswith(f"folder:{tmp_path.resolve()}")
    from_generator = ProbeSet.build(text_tokenizer, (doc for doc in small_docs), n_prompts=20)
    from_list = ProbeSet.build(text_tokenizer, small_docs, n_prompts=20)
    assert from_generator.equals(from_list)
    assert from_list.provenance["source"].startswith("documents: 1 strings (sha256 ")


def test_build_provenance_records_how_to_rebuild(builtin_probes, text_tokenizer):
    """Tokenizer name and hash, source, seed, sizes, version and format are recorded."""
    p = builtin_probes.provenance
    assert p["tokenizer_name"] == "regionwatch-bpe-2048"
    assert p["tokenizer_hash"] == tokenizer_hash(text_tokenizer)
    assert p["source"] == "builtin:tinyshakespeare"
    assert (p["seed"], p["seq_len"], p["n_prompts"], p["n_similar"]) == (0, 10, 100, 16)
    assert (p["n_dissimilar"], p["n_triples"], p["format_version"]) == (16, 4, 1)
    assert p["regionwatch_version"] == "0.1.0"
    assert p["separator"]["kind"] == "eos"
    assert p["windows"] == p["stream_tokens"] // 10
    json.dumps(p)  # JSON-native, so that it survives save/load unchanged


def test_build_reports_kept_and_dropped_handpicked_pairs(
    builtin_probes, caplog, text_tokenizer, small_docs
):
    """Each of S1-S3 / D1-D3 is kept (a valid pair) or dropped with a reason and a warning."""
    p = builtin_probes.provenance
    dropped = {d["name"]: d["reason"] for d in p["named_dropped"]}
    assert set(p["named_kept"]) | set(dropped) == {name for name, *_ in HANDPICKED}
    assert not set(p["named_kept"]) & set(dropped)
    assert dropped
    assert all(dropped.values())
    assert [pair.name for pair in builtin_probes.named] == p["named_kept"]
    for pair in builtin_probes.named:
        assert len(pair.a) == len(pair.b)
        assert pair.a[:-1] == pair.b[:-1]
        assert pair.a[-1] != pair.b[-1]
        assert pair.kind == ("similar" if pair.name.startswith("S") else "dissimilar")
    with caplog.at_level("WARNING", logger="regionwatch.probes"):
        ProbeSet.build(text_tokenizer, small_docs, n_prompts=2, n_triples=0)
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    texts = {name: (a, b) for name, _, a, b in HANDPICKED}
    assert len(lines) == len(dropped)  # one plain line per pair
    for line, name in zip(lines, dropped, strict=True):
        a, b = texts[name]
        # Named in plain words: which pair, how it ends, and why it is left out.
        assert line.startswith(f"hand-picked pair {name} ('...{' '.join(a.split()[-4:])}' vs")
        assert " ".join(b.split()[-4:]) in line
        assert "this tokenizer splits the two prompts differently" in line
        assert dropped[name] in line
        assert len(line) < 300  # not the token dumps (those are DEBUG)
    none = ProbeSet.build(text_tokenizer, small_docs, handpicked=False, n_prompts=2, n_triples=0)
    assert none.named == ()
    assert none.provenance["named_kept"] == []


def test_build_user_pairs_named_and_unnamed(text_tokenizer, small_docs):
    """Valid user pairs become named pairs of kind "user"; unnamed ones are U1, U2, ..."""
    probes = ProbeSet.build(
        text_tokenizer,
        small_docs,
        handpicked=False,
        pairs=[
            (" the king is dead", " the king is here"),
            ("mine", " my lord and my", " my lord and thy"),
        ],
    )
    names = [(p.name, p.kind) for p in probes.named]
    assert names == [("U1", "user"), ("mine", "user")]
    first = probes.named[0]
    assert text_tokenizer.decode(list(first.a)) == " the king is dead"
    assert first.a[:-1] == first.b[:-1]
    assert first.a[-1] != first.b[-1]


def test_build_refuses_user_pair_of_unequal_tokenization(text_tokenizer):
    """A user pair that splits unevenly is a ConfigError naming it and showing both encodings."""
    with pytest.raises(ConfigError, match=r"pair 'cloud'.*A has \d+ tokens and B has \d+.*A -> \["):
        ProbeSet.build(
            text_tokenizer, pairs=[("cloud", " a cloud of mist", " a cloud of spectacular")]
        )
    with pytest.raises(ConfigError, match=r"pair 'U1'.*before the last token"):
        ProbeSet.build(text_tokenizer, pairs=[(" the king is dead", " a king is dead")])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 1}, r"seq_len=1: need an int >= 2"),
        ({"n_prompts": 1}, r"n_prompts=1: need an int >= 2"),
        ({"n_triples": 99}, r"n_triples=99: .*at most 98"),
        ({"n_similar": -1}, r"n_similar=-1: need an int >= 0"),
        ({"seed": -1}, r"seed=-1: need an int >= 0"),
        ({"seq_len": 2.5}, r"seq_len=2.5: need an int"),
        ({"max_tokens": 0}, r"max_tokens=0: need an int >= 1"),
        ({"pairs": [(" a",)]}, r"pairs\[0\]=\(' a',\)\): need \(text_a, text_b\)"),
        ({"pairs": [("S1", " a b", " a c")]}, r"\['S1'\] are used twice"),
        ({"pairs": "ab"}, "pass a list"),
        ({"source": "no such file, just words"}, r"pass a list of documents.*or an existing path"),
    ],
)
def test_build_refuses_bad_arguments(text_tokenizer, kwargs, match):
    """Every bad argument is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=match):
        ProbeSet.build(text_tokenizer, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_prompts": 100}, r"too short: \d+ tokens make \d+ windows of 10 tokens.*needs 100"),
        ({"n_prompts": 2, "n_similar": 200}, r"too short for n_similar=200.*only \d+ pairs"),
        ({"n_prompts": 2, "n_similar": 0, "n_dissimilar": 500}, r"n_dissimilar=500.*only \d+"),
    ],
)
def test_build_refuses_a_source_too_short(text_tokenizer, corpus_text, kwargs, match):
    """Too few windows for the prompts or pairs is a ConfigError counting found vs needed."""
    with pytest.raises(ConfigError, match=match):
        ProbeSet.build(text_tokenizer, [corpus_text[:2000]], n_triples=0, **kwargs)


def test_save_load_round_trip_is_exact(builtin_probes, text_tokenizer, tmp_path: Path):
    """A loaded probe set equals the saved one: ids, named pairs, provenance, fingerprint."""
    path = builtin_probes.save(tmp_path / "probes")
    assert sorted(f.name for f in path.iterdir()) == [MANIFEST_FILE, TENSORS_FILE]
    assert [f.name for f in tmp_path.iterdir()] == ["probes"]  # no temporary left behind
    loaded = ProbeSet.load(path, tokenizer=text_tokenizer)
    assert loaded.equals(builtin_probes)
    assert loaded.fingerprint == builtin_probes.fingerprint
    assert loaded.named == builtin_probes.named
    assert dict(loaded.provenance) == dict(builtin_probes.provenance)
    for name in ("random", "similar", "dissimilar", "triples"):
        assert torch.equal(getattr(loaded, name), getattr(builtin_probes, name))


def test_save_is_idempotent_and_never_overwrites_another_set(
    builtin_probes, text_tokenizer, small_docs, tmp_path
):
    """Saving the same set again is a no-op; a different set at that path is refused."""
    path = builtin_probes.save(tmp_path / "probes")
    stamp = (path / TENSORS_FILE).stat().st_mtime_ns
    builtin_probes.save(path)
    assert (path / TENSORS_FILE).stat().st_mtime_ns == stamp
    other = ProbeSet.build(text_tokenizer, small_docs, n_prompts=5, n_triples=0)
    with pytest.raises(StoreError, match="refusing to overwrite"):
        other.save(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ProbeSet.load(other.save(empty)).equals(other)


def test_load_refuses_another_tokenizer(builtin_probes, other_tokenizer, tmp_path):
    """Loading with a tokenizer whose hash differs is a ConfigError naming both."""
    path = builtin_probes.save(tmp_path / "probes")
    recorded = builtin_probes.provenance["tokenizer_hash"]
    with pytest.raises(
        ConfigError,
        match=rf"built with tokenizer 'regionwatch-bpe-2048' \(hash {recorded}\).*"
        r"'regionwatch-bpe-1024'",
    ):
        ProbeSet.load(path, tokenizer=other_tokenizer)


@pytest.mark.parametrize("damage", ["truncate", "flip_header", "flip_ids"])
def test_load_refuses_damaged_tensors(builtin_probes, tmp_path, damage):
    """A truncated or bit-flipped probes.safetensors is a StoreError naming the file."""
    path = builtin_probes.save(tmp_path / "probes")
    file = path / TENSORS_FILE
    data = bytearray(file.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[12 if damage == "flip_header" else len(data) - 3] ^= 0x04
    file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=TENSORS_FILE):
        ProbeSet.load(path)


def test_load_refuses_ids_that_do_not_match_the_fingerprint(builtin_probes, tmp_path):
    """Consistent but altered files (hash updated, ids changed) fail the fingerprint check."""
    path = builtin_probes.save(tmp_path / "probes")
    import hashlib

    import safetensors.torch

    tensors = safetensors.torch.load_file(path / TENSORS_FILE)
    tensors["random"][0, 0] += 1
    data = safetensors.torch.save(tensors)
    (path / TENSORS_FILE).write_bytes(data)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["tensors_sha256"] = hashlib.sha256(data).hexdigest()
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=rf"{TENSORS_FILE}: its token ids give fingerprint"):
        ProbeSet.load(path)


def test_load_refuses_missing_or_damaged_manifest(builtin_probes, tmp_path):
    """A missing or unreadable manifest.json is a StoreError naming it."""
    with pytest.raises(StoreError, match=rf"{MANIFEST_FILE}: missing"):
        ProbeSet.load(tmp_path / "nothing")
    path = builtin_probes.save(tmp_path / "probes")
    (path / MANIFEST_FILE).write_text('{"format": "regionwatch.pro')
    with pytest.raises(StoreError, match=rf"{MANIFEST_FILE}: damaged"):
        ProbeSet.load(path)
    (path / MANIFEST_FILE).write_text(
        json.dumps({"format": "regionwatch.probes", "format_version": 99})
    )
    with pytest.raises(StoreError, match=r"format_version 99.*upgrade"):
        ProbeSet.load(path)


def test_summary_names_counts_source_and_tokenizer(builtin_probes):
    """summary() is one line with the counts, source and tokenizer."""
    line = builtin_probes.summary()
    assert "\n" not in line
    for part in ("100 prompts x 10 tokens", "99 random pairs", "16 similar", "4 triples"):
        assert part in line
    assert "builtin:tinyshakespeare" in line
    assert "regionwatch-bpe-2048" in line


@settings(max_examples=8, deadline=None)
@given(
    seq_len=st.integers(2, 8),
    n_prompts=st.integers(2, 40),
    n_pairs=st.integers(0, 6),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_build_invariants_hold_for_any_sizes(
    text_tokenizer,
    small_docs,
    seq_len,
    n_prompts,
    n_pairs,
    seed,
    data,
):
    """Any sizes and seed give real windows, valid similar/dissimilar pairs and chained triples."""
    n_triples = data.draw(st.integers(0, n_prompts - 2))
    probes = ProbeSet.build(
        text_tokenizer,
        small_docs,
        seed=seed,
        seq_len=seq_len,
        n_prompts=n_prompts,
        n_similar=n_pairs,
        n_dissimilar=n_pairs,
        n_triples=n_triples,
    )
    check_invariants(probes, aligned_windows(text_tokenizer, small_docs, seq_len), seq_len)


def test_measure_runs_on_a_built_probe_set(builtin_probes, text_tokenizer):
    """measure() takes a built probe set end to end on a tiny random GPT-2 of its vocabulary."""
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=len(text_tokenizer), n_positions=64
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
    result = measure(model, builtin_probes, ProbeConfig(num_alphas=5, grid=5))
    assert result.curves["random"].relative.shape == (99, 5)
    assert result.curves["similar"].max_slope.shape == (16,)
    assert result.curves["dissimilar"].max_slope.shape == (16,)
    assert result.curves["named"].max_slope.shape == (len(builtin_probes.named),)
    assert result.maps is not None
    assert result.maps.distance.shape == (4, 3, 5, 5)
    assert torch.isfinite(result.curves["random"].max_slope).all()


def test_prompts_give_every_part_as_token_id_groups(builtin_probes):
    """`prompts()` holds each part's prompts once, as the tensors and named pairs hold them."""
    prompts = builtin_probes.prompts()
    rows = [tuple(r) for r in builtin_probes.random.tolist()]
    assert prompts["random"] == [(rows[i], rows[i + 1]) for i in range(len(rows) - 1)]
    for part in ("similar", "dissimilar"):
        tensor = getattr(builtin_probes, part)
        assert prompts[part] == [(tuple(a), tuple(b)) for a, b in tensor.tolist()]
    assert prompts["named"] == [(p.a, p.b) for p in builtin_probes.named]
    assert prompts["maps"] == [tuple(rows[i] for i in t) for t in builtin_probes.triples.tolist()]
    assert len(prompts["maps"]) == 4
    assert all(isinstance(t, int) for group in prompts["similar"] for p in group for t in p)


def test_prompts_refuse_a_probe_set_of_non_integer_ids():
    """A hand-made probe set of floats is refused by name before anything is measured."""
    probes = ProbeSet(torch.rand(3, 4), torch.zeros(0, 2, 4), torch.zeros(0, 2, 4))
    with pytest.raises(ConfigError, match=r"random: a tensor of prompts must be an integer"):
        probes.prompts()
