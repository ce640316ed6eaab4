"""Absurd model configs are refused before any allocation, by every verb, in regionwatch's words."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from regionwatch.cli import main
from regionwatch.demo import DemoConfig, run_demo
from regionwatch.errors import ConfigError
from regionwatch.loading import load_state_dict_model
from regionwatch.sizing import available_bytes, check_model_memory, implied_parameters
from tests.conftest import TINY_ARCHS, tiny_model
from tests.support.lm import SMALL_PROBE
from tests.support.replay_runs import save_model

SMALL = ["--alphas", str(SMALL_PROBE.num_alphas), "--grid", str(SMALL_PROBE.grid)]
# The config: a GPT-2 with n_embd=2^20, n_layer=4096 and a vocabulary of 10^7.
ABSURD = {"n_embd": 1_048_576, "n_layer": 4096, "n_head": 16, "vocab_size": 10_000_000}
# One absurd size each, the rest tiny: every one alone needs far more than any machine has.
ONE_ABSURD = {
    "vocab only": {"vocab_size": 10**12},
    "layers only": {"n_layer": 10**9},
    "width only": {"n_embd": 2**24, "n_head": 1},
}
TINY = {"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 64, "n_positions": 32}
COUNT_SLACK = 0.95  # norms and biases are left out: a tiny model's count is within 5% below


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_implied_parameters_match_the_built_model(arch: str) -> None:
    """The count from the config alone is the built model's, less its norms and biases."""
    model = tiny_model(arch)
    actual = sum(p.numel() for p in model.parameters())
    implied = implied_parameters(model.config)
    assert COUNT_SLACK * actual <= implied <= actual


def test_implied_parameters_of_large_known_models() -> None:
    """GPT-2 small (124M) and a Llama-2-7B-shaped config (6.7B), from their configs alone."""
    assert implied_parameters(GPT2Config()) == pytest.approx(124.4e6, rel=0.01)
    llama = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, vocab_size=32000
    )
    llama.tie_word_embeddings = False
    assert implied_parameters(llama) == pytest.approx(6.738e9, rel=0.01)


def absurd_folder(path: Path, sizes: dict, *, weights: bool = True) -> Path:
    """A save_pretrained folder of a tiny GPT-2 whose config.json claims `sizes`."""
    if weights:
        save_model(path, seed=0)
    path.mkdir(parents=True, exist_ok=True)
    config = GPT2Config(**{**TINY, **sizes}).to_dict()
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("case", list(ONE_ABSURD))
def test_check_model_memory_refuses_any_one_absurd_size(case: str) -> None:
    """Vocabulary, depth or width alone: the count, the bytes needed and available are named."""
    config = GPT2Config(**{**TINY, **ONE_ABSURD[case]})
    params = implied_parameters(config)
    with pytest.raises(ConfigError, match=rf"implies {params:,} parameters") as err:
        check_model_memory(config, where="test")
    message = str(err.value)
    assert f"need {params * 4 / 2**30:,.1f} GiB in float32" in message
    assert f"cpu has {available_bytes('cpu') / 2**30:,.1f} GiB available".split(".")[0] in message


def test_a_sane_config_passes_and_returns_its_count() -> None:
    config = GPT2Config(**TINY)
    assert check_model_memory(config, where="test") == implied_parameters(config)


def test_measure_init_from_refuses_an_absurd_config(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The issue's case: exit 2 with regionwatch's message, not a 42 TB allocation."""
    folder = absurd_folder(tmp_path / "absurd", ABSURD, weights=False)
    code = main(["measure", "--init-from", str(folder), "--tokenizer", "builtin", *SMALL])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--init-from {folder}: its config implies" in err
    assert "GiB available" in err
    assert "Traceback" not in err


def test_measure_refuses_a_model_dir_whose_config_is_absurd(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A save_pretrained folder whose config.json was blown up: refused before from_pretrained."""
    folder = absurd_folder(tmp_path / "absurd", ONE_ABSURD["vocab only"])
    code = main(["measure", str(folder), "--tokenizer", "builtin", *SMALL])
    err = capsys.readouterr().err
    assert code == 2
    assert "its config implies" in err
    assert "ignore_mismatched_sizes" not in err


def test_a_state_dict_with_an_absurd_config_is_refused(tmp_path: Path) -> None:
    """A .pt file beside an absurd config.json: refused before `from_config` allocates."""
    model = save_model(tmp_path / "tiny", seed=0)
    folder = absurd_folder(tmp_path / "absurd", ONE_ABSURD["layers only"], weights=False)
    torch.save(model.state_dict(), folder / "weights.pt")
    with pytest.raises(ConfigError, match="its config implies"):
        load_state_dict_model(folder / "weights.pt")


@pytest.mark.slow
def test_replay_fails_an_absurd_checkpoint_in_its_own_words(
    tmp_path: Path, text_tokenizer, capsys: pytest.CaptureFixture, caplog
) -> None:
    """Replay: the absurd checkpoint FAILED with the count and memory; the good one measured."""
    save_model(tmp_path / "ckpts" / "step1-tokens100", seed=0, tokenizer=text_tokenizer)
    absurd_folder(tmp_path / "ckpts" / "step2-tokens200", ABSURD)
    text_tokenizer.save_pretrained(tmp_path / "ckpts" / "step2-tokens200")
    with caplog.at_level(logging.WARNING, logger="regionwatch"):
        code = main(["replay", str(tmp_path / "ckpts"), "--out", str(tmp_path / "run"), *SMALL])
    out = capsys.readouterr().out
    assert code == 1
    assert "1 measured, 0 already there, 1 failed" in out
    assert "ConfigError" in out
    assert "its config implies" in out
    assert "ignore_mismatched_sizes" not in out


def test_an_absurd_demo_config_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """The demo's own sizes: refused before the tokenizer, the data or the output folder."""
    config = DemoConfig(layers=100_000, width=4096, heads=16)
    with pytest.raises(ConfigError, match="the demo config: its config implies"):
        run_demo(config, tmp_path / "demo")
    assert not (tmp_path / "demo").exists()
