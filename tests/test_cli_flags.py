"""The command line speaks its own flags: every error names a flag the verb has, never only an
internal parameter name (`n_triples`, `num_alphas`) the user cannot set."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from transformers import GPT2Config

from regionwatch.cli import main, name_flags, parser

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2's config.json (for --init-from: no weights, nothing to download)."""
    folder = tmp_path_factory.mktemp("tiny")
    GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=2048, n_positions=64).save_pretrained(
        folder
    )
    return folder


def verb_flags(verb: str) -> set[str]:
    """Every option string of a verb's parser."""
    top = parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {o for action in sub.choices[verb]._actions for o in action.option_strings}


MEASURE = ["measure", "--init-from", "{config}", "--tokenizer", "builtin", "--alphas", "5"]
CASES = {
    "pairs too few": ([*MEASURE, "--pairs", "1"], "--pairs 1: need an int >= 2"),
    "alphas": (["measure", "--init-from", "{config}", "--alphas", "2"], "num_alphas is --alphas"),
    "grid": ([*MEASURE, "--grid", "2"], "grid is --grid"),
    "write layer": ([*MEASURE, "--write-layer", "5"], "write_layer is --write-layer"),
    "seq len short": ([*MEASURE, "--seq-len", "1"], "seq_len is --seq-len"),
    "seq len long": ([*MEASURE, "--seq-len", "1000", "--pairs", "2"], "seq_len is --seq-len"),
    "seed": ([*MEASURE, "--seed", "-1"], "seed is --seed"),
    "replay alphas": (
        ["replay", "{config}", "--out", "{out}", "--alphas", "2"],
        "num_alphas is --alphas",
    ),
    "tokens per step": (
        ["replay", "{config}", "--out", "{out}", "--tokens-per-step", "0"],
        "--tokens-per-step",
    ),
    "report curves": (
        ["report", "{config}", "--out", "{out}", "--max-curves", "1"],
        "--max-curves",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_cli_error_names_a_flag_of_its_verb(
    case: str, config_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Exit 2; the message names the flag to change, and every flag it names exists."""
    argv, expected = CASES[case]
    argv = [a.format(config=config_dir, out=tmp_path / "out") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in err
    named = set(FLAG.findall(err))
    assert named, err
    assert named <= verb_flags(argv[0]), (named - verb_flags(argv[0]), err)


@pytest.mark.slow
def test_measure_with_few_pairs_measures_fewer_triples(
    config_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """The issue's `--pairs 4` (5 prompts: 3 triples): measured, no 'lower n_triples'."""
    code = main([*[a.format(config=config_dir) for a in MEASURE], "--grid", "5", "--pairs", "4"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "4 random pairs" in out.out or "4 pairs" in out.out
    assert "n_triples" not in out.err


def test_name_flags_appends_only_the_names_used() -> None:
    flags = {"num_alphas": "--alphas", "grid": "--grid"}
    assert name_flags("num_alphas=2: need >= 3", flags) == (
        "num_alphas=2: need >= 3 (on the command line: num_alphas is --alphas)"
    )
    assert name_flags("a grid-like word, --grid itself", flags).endswith("itself")
