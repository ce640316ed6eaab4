"""Checkpoints loaded: pickled hyper-parameters, state-dict key prefixes, sharded directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from regionwatch import SnapshotStore
from regionwatch.errors import CheckpointError
from regionwatch.loading import init_model, load_state_dict_model
from regionwatch.replaying import replay
from regionwatch.snapshot import weights_fingerprint
from tests.support.lm import SMALL_PROBE, Windows, tiny_gpt2
from tests.support.replay_runs import ConfigLM, lightning_run, same_weights
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB


def test_pickled_checkpoint_needs_trust_pickle(
    tmp_path: Path, data: Windows, probes, caplog
) -> None:
    """Hyper-parameters holding a config object: refused, naming the flag; loaded with it."""
    module = ConfigLM(tiny_gpt2(VOCAB).config)  # the architecture travels as a pickled object
    ckpts = lightning_run(tmp_path, data, max_steps=1, module=module)
    kwargs = {"probes": probes, "config": SMALL_PROBE, "tokens_per_step": 64, "progress": False}
    refused = replay([ckpts], out=tmp_path / "run", **kwargs)
    assert not refused.measured
    assert len(refused.failed) == 1
    assert "--trust-pickle" in refused.failed[0][1]
    assert "GPT2Config" in refused.failed[0][1]
    trusted = replay([ckpts], out=tmp_path / "run", trust_pickle=True, **kwargs)
    assert [c.step for c in trusted.measured] == [1]
    assert trusted.ok
    row = SnapshotStore(tmp_path / "run").records()[0]
    assert row["weights_fingerprint"] == weights_fingerprint(module.lm)


def test_state_dict_prefixes_and_compiled_keys_are_mapped(tmp_path: Path) -> None:
    """`model.`, `_orig_mod.`, a config dict in hyper-parameters and --state-key all load right."""
    model, other = tiny_gpt2(VOCAB, seed=0), tiny_gpt2(VOCAB, seed=1)
    weights = model.state_dict()
    compiled = {f"model._orig_mod.{k}": v for k, v in weights.items()}
    hparams = {"settings": {"config": model.config.to_dict(), "lr": 0.1}}
    torch.save({"state_dict": compiled, "hyper_parameters": hparams}, tmp_path / "a.ckpt")
    assert same_weights(load_state_dict_model(tmp_path / "a.ckpt"), model)
    two = {**{f"lm.{k}": v for k, v in weights.items()}}
    two |= {f"teacher.{k}": v for k, v in other.state_dict().items()}
    (tmp_path / "cfg").mkdir()
    model.config.save_pretrained(tmp_path / "cfg")
    torch.save(two, tmp_path / "two.pt")
    loaded = load_state_dict_model(tmp_path / "two.pt", config_dir=tmp_path / "cfg")
    assert same_weights(loaded, model)  # equal votes: the shortest prefix
    teacher = load_state_dict_model(
        tmp_path / "two.pt", config_dir=tmp_path / "cfg", state_key="teacher"
    )
    assert same_weights(teacher, other)
    torch.save({"x.y": torch.ones(1)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"--state-key PREFIX"):
        load_state_dict_model(tmp_path / "bad.pt", config_dir=tmp_path / "cfg")
    with pytest.raises(CheckpointError, match=r"--config DIR"):
        load_state_dict_model(tmp_path / "two.pt")


def test_sharded_checkpoint_names_the_consolidation_command(
    tmp_path: Path, probes, text_tokenizer
) -> None:
    """An FSDP-style sharded dir fails with the command; the command's output then replays."""
    model = tiny_gpt2(VOCAB, seed=0)
    sharded = tmp_path / "ckpts" / "epoch=0-step=2.ckpt"
    dcp.save(
        {"state_dict": {f"lm.{k}": v for k, v in model.state_dict().items()}}, checkpoint_id=sharded
    )
    model.config.save_pretrained(tmp_path / "ckpts")
    kwargs = {"probes": probes, "config": SMALL_PROBE, "tokens_per_step": 10, "progress": False}
    result = replay([tmp_path / "ckpts"], out=tmp_path / "run", **kwargs)
    assert len(result.failed) == 1
    assert result.failed[0][0].kind == "sharded"
    command = f"torch.distributed.checkpoint.format_utils dcp_to_torch {sharded} {sharded}.pt"
    assert command in result.failed[0][1]
    dcp_to_torch_save(sharded, f"{sharded}.pt")  # what the command runs
    result = replay([Path(f"{sharded}.pt")], out=tmp_path / "run", **kwargs)
    assert [(c.step, c.tokens) for c in result.measured] == [(2, 20)]
    assert SnapshotStore(tmp_path / "run").records()[0]["weights_fingerprint"] == (
        weights_fingerprint(model)
    )


def test_init_model_leaves_the_callers_generators_as_they_were(tmp_path: Path, device: str) -> None:
    """A seeded init (`measure --init-from`) leaves the caller's generator of the device as it
    was: CPU's, and on a GPU CUDA's, which a global reseed would reset; the seed decides."""
    tiny_gpt2(VOCAB).config.save_pretrained(tmp_path)
    get = torch.cuda.get_rng_state if device == "cuda" else torch.random.get_rng_state
    torch.rand(3, device=device)  # a state of the caller's own, not a fresh generator's
    before = get()
    model = init_model(tmp_path, seed=3, device=device)
    assert torch.equal(get(), before)
    assert same_weights(model, init_model(tmp_path, seed=3, device=device))
    assert not same_weights(model, init_model(tmp_path, seed=4, device=device))
