"""Shared fixtures: tiny seeded random causal LMs of every supported architecture, built locally."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import settings
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# The corpus, its tokenizer and probe set; the replay tests' probe set and live runs.
pytest_plugins = [
    "tests.support.text",
    "tests.support.replay_runs",
    "tests.support.disk",
    "tests.support.gguf_files",
]

# Repeatable cuBLAS on CUDA: deterministic mode (Lightning's deterministic=True, which the
# `trainer` of tests/support/lm.py sets) needs this workspace size, and torch reads it once, at
# the process's first cuBLAS call. Lightning sets it only when a Trainer is built, too late after
# an earlier test's CUDA matmul; so it is set here, at import, before any test touches the GPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.register_profile("dev", deadline=None, max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TINY_ARCHS = (
    "gpt2",
    "gpt_neox",
    "llama",
    "qwen2",
    "mistral",
    "olmo",
    "olmo2",
    "gemma",
    "gemma2",
    "phi",
    "phi3",
)
TINY_VOCAB = 128
TINY_WIDTH = 32

# One set of sizes, spelled in each config family's own names (GPT-2 has n_embd, the rest
# hidden_size...). Only names a config already has are set.
_TINY_SIZES = {
    "hidden_size": TINY_WIDTH,
    "n_embd": TINY_WIDTH,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_key_value_heads": 2,
    "head_dim": TINY_WIDTH // 4,
    "intermediate_size": 2 * TINY_WIDTH,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "pad_token_id": 0,
    "vocab_size": TINY_VOCAB,
}


def tiny_config(arch: str, *, layers: int = 3, **overrides: object) -> object:
    """A tiny config of `arch` (model_type), `layers` blocks, width 32, vocabulary 128.

    Skips the calling test when the installed transformers predates the architecture (OLMo2
    arrived in 4.47; the 4.x CI job runs an older release too).
    """
    if arch not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {arch!r} architecture")
    config = AutoConfig.for_model(arch)
    for name, value in {**_TINY_SIZES, "num_hidden_layers": layers, "n_layer": layers}.items():
        if hasattr(config, name) or name == "head_dim":
            setattr(config, name, value)
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def tiny_model(
    arch: str,
    *,
    layers: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: object,
) -> PreTrainedModel:
    """A seeded random causal LM; the global RNG is saved and restored around its init."""
    state = torch.random.get_rng_state()
    try:
        torch.default_generator.manual_seed(seed)  # the CPU's alone, the one restored below
        model = AutoModelForCausalLM.from_config(tiny_config(arch, layers=layers, **overrides))
    finally:
        torch.random.set_rng_state(state)
    return model.to(dtype).eval()


def random_prompts(
    count: int, length: int, *, seed: int = 0, vocab: int = TINY_VOCAB
) -> torch.Tensor:
    """Random token ids [count, length] from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu`-marked tests run where CUDA is, and are skipped elsewhere (CI's CPU jobs)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> str:
    """Where a test's model and trainer run: the CPU always, CUDA under the `gpu` marker."""
    return request.param


@pytest.fixture(params=TINY_ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


def file_states(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, tuple[bytes, int]]:
    """Every regular file under `root` (links not followed) with its bytes and mtime in ns.

    Equal before and after an operation: it wrote, truncated or deleted nothing there.
    """
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.lstat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.name not in skip
    }


@pytest.fixture(autouse=True)
def _transformers_logging_as_found() -> object:
    """A Trainer run with `log_level="info"` sets transformers' verbosity for the whole process
    (and its logger may propagate): later tests would capture its INFO lines as their own."""
    root = logging.getLogger("transformers")
    verbosity, propagate = transformers.logging.get_verbosity(), root.propagate
    yield
    transformers.logging.set_verbosity(verbosity)
    root.propagate = propagate
