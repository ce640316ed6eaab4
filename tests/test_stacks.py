"""Replay beyond Hugging Face: litgpt folders, OLMo-core step folders, nanoGPT `ckpt.pt` files.

Each checkpoint is written by its own stack's code (litgpt's Fabric save and `save_config`, a real
OLMo-core trainer, nanoGPT's checkpoint dict); replaying it equals measuring its weights directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from regionwatch.errors import CheckpointError, ConfigError
from regionwatch.replaying import replay
from regionwatch.stacks import GPT_LAYOUT, OLMO_CORE_DECODER
from regionwatch.store import SnapshotStore
from tests.support.factories import make_watch
from tests.support.lm import SMALL_PROBE, Windows
from tests.support.nanogpt import GPT, GPTConfig, nanogpt
from tests.support.olmo import TOKENS_PER_STEP, olmo_trainer
from tests.support.stacks import require
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB
from tests.test_live_vs_replay import assert_same_numbers

NANO_ARGS = {"block_size": 64, "vocab_size": VOCAB, "n_layer": 2, "n_head": 4, "n_embd": 32}
NANO_RUN = {"batch_size": 4, "block_size": 16, "gradient_accumulation_steps": 2}  # 128 / iter


def build_nanogpt(model_args: dict) -> GPT:
    """The `--model-builder` of the nanoGPT tests (tests.test_stacks:build_nanogpt)."""
    return GPT(GPTConfig(**model_args))


def next_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The loss of a model that returns logits (litgpt's GPT)."""
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train_steps(model: torch.nn.Module, data: Windows, steps: int, *, loss=next_token_loss):
    """A few real AdamW steps on corpus windows, as a plain loop takes them."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        loss(model, data.ids[4 * step : 4 * step + 4]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


@pytest.mark.slow
def test_replay_litgpt_folders_equal_measuring_the_weights(
    tmp_path: Path, lm_probes, lm_data: Windows
) -> None:
    """litgpt step folders replay at their step; tokens only from --tokens-per-step."""
    litgpt = require("litgpt")
    utils = require("litgpt.utils")
    lightning = require("lightning")
    config = litgpt.Config(
        name="tiny", n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, padded_vocab_size=VOCAB,
        block_size=64,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        model = litgpt.GPT(config)
    fabric = lightning.Fabric(accelerator="cpu", devices=1)
    saved = {}
    for step in (1, 2):  # litgpt's pretrain saves `step-{step_count:08d}/lit_model.pth`
        optimizer = train_steps(model, lm_data, 1)
        folder = tmp_path / "out" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        state = {"model": model, "optimizer": optimizer, "iter_num": step, "step_count": step}
        fabric.save(folder / "lit_model.pth", state)  # what litgpt's save_checkpoint does
        utils.save_config(model.config, folder)
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="--tokens-per-step"):
        replay([tmp_path / "out"], out=tmp_path / "run", probes=lm_probes, config=SMALL_PROBE)
    result = replay(
        [tmp_path / "out"],
        out=tmp_path / "run",
        probes=lm_probes,
        config=SMALL_PROBE,
        tokens_per_step=64,
        progress=False,
    )
    assert result.ok, result.failed
    store = SnapshotStore(tmp_path / "run")
    assert [(r["step"], r["tokens"]) for r in store.records()] == [(1, 64), (2, 128)]
    for step, weights in saved.items():
        model.load_state_dict(weights)
        assert_same_numbers(store.read(step), model.eval(), store, decoder=GPT_LAYOUT)


@pytest.mark.slow
def test_replay_olmo_core_checkpoints_equal_the_live_snapshots(
    tmp_path: Path, text_tokenizer, lm_probes
) -> None:
    """A real OLMo-core run's step folders replay to its live callback's snapshots, bitwise."""
    olmo = require("regionwatch.olmo_core")
    watch = make_watch(2, maps_schedule=None)  # every live snapshot has maps, as replay's do
    callback = olmo.RegionMonitorCallback(watch, probes=lm_probes, run_dir=tmp_path / "live")
    trainer = olmo_trainer(
        text_tokenizer, tmp_path, steps=4, save_interval=2, callbacks={"regionwatch": callback}
    )
    trainer.fit()
    result = replay(
        [tmp_path / "save"],
        out=tmp_path / "run",
        probes=lm_probes,
        config=SMALL_PROBE,
        progress=False,
    )
    assert result.ok, result.failed
    live, replayed = SnapshotStore(tmp_path / "live"), SnapshotStore(tmp_path / "run")
    assert [(r["step"], r["tokens"]) for r in replayed.records()] == [
        (step, step * TOKENS_PER_STEP) for step in (0, 2, 4)
    ]
    assert all(c.found == "step and tokens from train/rank0.pt" for c in result.measured)
    for step in (0, 2, 4):
        a, b = live.read(step), replayed.read(step)
        assert a.weights_fingerprint == b.weights_fingerprint
        for part, curves in a.measurement.curves.items():
            assert torch.equal(curves.distance, b.measurement.curves[part].distance), part
        assert torch.equal(a.measurement.maps.distance, b.measurement.maps.distance)
    model = trainer.train_module.model.eval()
    assert_same_numbers(replayed.read(4), model, replayed, decoder=OLMO_CORE_DECODER)


def save_nanogpt(path: Path, model: GPT, optimizer: torch.optim.Optimizer, iters: int) -> None:
    """nanoGPT train.py's checkpoint dict (its `config` holds the run's globals)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "model_args": NANO_ARGS,
        "iter_num": iters,
        "best_val_loss": torch.tensor(3.5),
        "config": {**NANO_RUN, "learning_rate": 1e-2, "dataset": "shakespeare", "compile": False},
    }
    torch.save(checkpoint, path)


def test_replay_nanogpt_ckpt_through_the_named_builder(
    tmp_path: Path, lm_probes, lm_data: Windows
) -> None:
    """ckpt.pt replays at iter_num and its config's tokens, through --model-builder only."""
    model = nanogpt(seed=0, dropout=0.0, **NANO_ARGS)
    optimizer = train_steps(
        model, lm_data, 3, loss=lambda m, ids: m(ids[:, :-1], ids[:, 1:].contiguous())[1]
    )
    save_nanogpt(tmp_path / "out" / "ckpt.pt", model, optimizer, iters=3)
    run = {"out": tmp_path / "run", "probes": lm_probes, "config": SMALL_PROBE, "progress": False}
    unnamed = replay([tmp_path / "out"], **run)
    assert not unnamed.measured
    assert "--model-builder" in unnamed.failed[0][1]
    result = replay([tmp_path / "out"], model_builder="tests.test_stacks:build_nanogpt", **run)
    assert result.ok, result.failed
    store = SnapshotStore(tmp_path / "run")
    assert [(r["step"], r["tokens"]) for r in store.records()] == [(3, 3 * 128)]
    assert_same_numbers(store.read(3), model.eval(), store, decoder=GPT_LAYOUT)
    renamed = tmp_path / "iter3.pt"  # named by hand: known by its model_args, not its name
    (tmp_path / "out" / "ckpt.pt").rename(renamed)
    again = replay(
        [renamed], into=tmp_path / "run", model_builder="tests.test_stacks:build_nanogpt"
    )
    assert [c.kind for c in again.skipped] == ["nanogpt"]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("tests.test_stacks.build_nanogpt", "need pkg.module:function"),
        ("tests.no_such_module:build", "cannot import tests.no_such_module"),
        ("tests.test_stacks:no_such_function", "has no function 'no_such_function'"),
    ],
)
def test_replay_bad_model_builder_is_refused_first(tmp_path: Path, spec: str, match: str) -> None:
    """A builder that cannot be imported is refused before any checkpoint is looked at."""
    with pytest.raises(ConfigError, match=match):
        replay([tmp_path / "nothing here"], out=tmp_path / "run", model_builder=spec)


def test_replay_litgpt_config_claiming_a_huge_model_is_refused_unallocated(
    tmp_path: Path, lm_probes
) -> None:
    """A config far larger than its weights fails on the meta device, before any allocation."""
    litgpt = require("litgpt")
    utils = require("litgpt.utils")
    config = litgpt.Config(name="tiny", n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB)
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    torch.save({"model": litgpt.GPT(config).state_dict()}, folder / "lit_model.pth")
    # ~4 TB of fp32 weights if built: the test would die of memory, not fail, were it allocated
    utils.save_config(litgpt.Config(name="huge", n_layer=512, n_embd=32768, n_head=256), folder)
    result = replay(
        [folder], out=tmp_path / "run", probes=lm_probes, tokens_per_step=64, progress=False
    )
    assert not result.measured
    assert "do not fit the GPT built for it" in result.failed[0][1]
