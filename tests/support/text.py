"""Text fixtures: the built-in corpus, a tokenizer trained on it, and the default probe set.

Registered for every test module by `pytest_plugins` in conftest.py.
Nothing here touches the Hugging Face hub: the tokenizer is trained locally in about half a
second.
"""

from __future__ import annotations

import pytest

from regionwatch.corpus import builtin_text, train_tokenizer
from regionwatch.probes import ProbeSet
from tests.support.lm import Windows, small_probes

TEXT_VOCAB_SIZE = 2048  # the demo's size: trains in under a second, still whole common words


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """The built-in public-domain corpus (Tiny Shakespeare) as one string."""
    return builtin_text()


@pytest.fixture(scope="session")
def text_tokenizer(corpus_text: str):
    """A byte-level BPE tokenizer (vocab 2048) trained on the built-in corpus."""
    return train_tokenizer([corpus_text], vocab_size=TEXT_VOCAB_SIZE)


@pytest.fixture(scope="session")
def builtin_probes(text_tokenizer) -> ProbeSet:
    """The default probe set (seed 0, docs/method.md §8 sizes) of the built-in corpus."""
    return ProbeSet.build(text_tokenizer)


@pytest.fixture(scope="session")
def lm_probes(text_tokenizer) -> ProbeSet:
    """The small probe set the driver tests measure (13 prompts, 4 + 4 pairs, 2 triples)."""
    return small_probes(text_tokenizer)


@pytest.fixture(scope="session")
def lm_data(text_tokenizer) -> Windows:
    """Corpus windows for tiny training runs; every third one padded."""
    return Windows(text_tokenizer)
