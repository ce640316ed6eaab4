"""Checkpoints found and placed in training: names, the Pythia schedule, discovery, the hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regionwatch import SnapshotStore
from regionwatch.checkpoints import discover
from regionwatch.cli import main
from regionwatch.errors import CheckpointError
from regionwatch.revisions import (
    PYTHIA_REVISIONS,
    PYTHIA_TOKENS_PER_STEP,
    REVISION_SCHEDULES,
    parse_revision,
    revision_name,
)
from regionwatch.snapshot import weights_fingerprint
from tests.support.lm import SMALL_PROBE
from tests.support.replay_runs import add_hub_revision, save_model

SMALL = ["--alphas", str(SMALL_PROBE.num_alphas), "--grid", str(SMALL_PROBE.grid)]
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("checkpoint-500", (500, None)),
        ("step1000", (1000, None)),
        ("step0", (0, None)),
        ("step1000-tokens4B", (1000, 4_000_000_000)),
        ("step20-tokens41943040", (20, 41_943_040)),
        ("step7-tokens12K", (7, 12_000)),
        ("step7-tokens3M", (7, 3_000_000)),
        ("stage1-step140000-tokens588B", (140_000, 588_000_000_000)),
        ("epoch=0-step=4", (4, None)),
        ("epoch=2-step=300-val_loss=0.51-v1", (300, None)),
        ("epoch=0-step=2.ckpt", (2, None)),
        ("last", None),
        ("final", None),
        ("steps100", None),
        ("checkpoint-best", None),
    ],
)
def test_parse_revision_reads_every_naming_scheme(name: str, expected) -> None:
    """Trainer, Pythia, OLMo and Lightning names give (step, tokens); other names give None."""
    assert parse_revision(name) == expected


def test_pythia_schedule_is_the_published_one() -> None:
    """154 revisions: step0, 1..512 doubling, then every 1000 to 143000; 2M tokens per step."""
    assert len(PYTHIA_REVISIONS) == 154
    assert PYTHIA_REVISIONS[:4] == ("step0", "step1", "step2", "step4")
    assert PYTHIA_REVISIONS[10:13] == ("step512", "step1000", "step2000")
    assert PYTHIA_REVISIONS[-1] == "step143000"
    assert PYTHIA_TOKENS_PER_STEP == 2_097_152
    assert REVISION_SCHEDULES["pythia"].revisions == PYTHIA_REVISIONS
    assert all(parse_revision(revision_name(s)) == (s, None) for s in (0, 512, 143_000))


def test_discover_orders_by_tokens_and_counts_each_checkpoint_once(
    tmp_path: Path, trainer_live: Path
) -> None:
    """Order follows tokens, not steps or names; a path given twice or via a symlink counts once."""
    save_model(tmp_path / "b" / "step9-tokens100", seed=0)
    save_model(tmp_path / "a" / "step1-tokens900", seed=1)
    (tmp_path / "link").symlink_to(tmp_path / "a" / "step1-tokens900")
    sources = [tmp_path / "a", tmp_path / "b", tmp_path / "link", trainer_live / "out"]
    found = discover([*sources, tmp_path / "b" / "step9-tokens100"])
    live = SnapshotStore(trainer_live / "live").records()
    assert [(c.step, c.tokens) for c in found] == [
        (9, 100),
        (2, live[1]["tokens"]),
        (4, live[2]["tokens"]),
        (1, 900),
    ]
    assert [c.kind for c in found] == ["pretrained"] * 4
    assert found[0].found == "step and tokens from the name"
    assert found[1].found == "step and tokens from trainer_state.json"


def test_unknown_tokens_are_refused_naming_the_flag(tmp_path: Path, capsys) -> None:
    """No token count anywhere: refused before measuring, naming --tokens-per-step; then used."""
    model = save_model(tmp_path / "step3", seed=0)
    state = {"global_step": 5, "state_dict": {f"lm.{k}": v for k, v in model.state_dict().items()}}
    torch.save(state, tmp_path / "weights.ckpt")  # a .ckpt's own step: 5
    save_model(tmp_path / "final", seed=1)
    with pytest.raises(CheckpointError, match=r"--tokens-per-step N") as err:
        discover([tmp_path / "step3", tmp_path / "weights.ckpt", tmp_path / "final"])
    assert "step 3 (step from the name), tokens unknown" in str(err.value)
    assert "final: no step" in str(err.value)
    code = main(["replay", str(tmp_path / "step3"), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "--tokens-per-step" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    found = discover([tmp_path / "step3", tmp_path / "weights.ckpt"], tokens_per_step=64)
    assert [(c.step, c.tokens) for c in found] == [(3, 192), (5, 320)]
    assert (
        found[1].found
        == "step from the checkpoint's global_step, tokens from step x 64 tokens per step"
    )


@pytest.mark.slow
def test_hub_revisions_resolve_offline_through_a_real_cache(
    tmp_path: Path, text_tokenizer, probe_dir: Path
) -> None:
    """`from_pretrained(repo, revision=...)` finds each revision in a hub cache, offline."""
    cache, prints = tmp_path / "hub", {}
    for seed, revision in enumerate(("step0", "step2", "step4")):
        model = save_model(tmp_path / "src" / revision, seed=seed, tokenizer=text_tokenizer)
        add_hub_revision(cache, "org/tiny", revision, tmp_path / "src" / revision)
        prints[revision] = weights_fingerprint(model)
    local = save_model(tmp_path / "step3-tokens3500", seed=7)
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
    }
    argv = [
        *("replay", str(tmp_path / "step3-tokens3500"), "--repo", "org/tiny"),
        *("--revisions", "step*,step9", "--tokens-per-step", "1000"),
        *("--out", str(tmp_path / "run"), "--probe", str(probe_dir), *SMALL),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "regionwatch", *argv],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]  # step9 is not in the cache
    assert "from the local cache" in done.stderr
    assert "FAILED org/tiny@step9" in done.stdout
    rows = SnapshotStore(tmp_path / "run").records()
    assert [(r["step"], r["tokens"]) for r in rows] == [(0, 0), (2, 2000), (3, 3500), (4, 4000)]
    assert [r["weights_fingerprint"] for r in rows] == [
        prints["step0"],
        prints["step2"],
        weights_fingerprint(local),
        prints["step4"],
    ]
