"""Bad inputs are refused with one message naming the argument and the fix, before training.

Replay trusts nothing it reads: configs that misdescribe their weights, garbage checkpoint files,
damaged trainer state, folders without a config, custom code and weights outside the folder.
Each case runs on real files and real tiny models built from configs; nothing is mocked.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    FalconMambaConfig,
    GPT2Config,
    GPT2Model,
    Mamba2Config,
    MambaConfig,
    MptConfig,
    RwkvConfig,
)

from regionwatch import (
    ConfigError,
    ProbeConfig,
    ProbeSet,
    RegionMonitor,
    RegionMonitorCallback,
    SnapshotStore,
    measure,
)
from regionwatch.cli import main
from regionwatch.errors import CheckpointError, UnsupportedModelError
from regionwatch.loading import load_model, load_tokenizer
from regionwatch.monitor import Monitor, WatchConfig
from regionwatch.replaying import replay
from tests.support.lm import SMALL_PROBE, small_probes, tiny_gpt2
from tests.support.replay_runs import add_hub_revision, save_model
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB

SMALL = ["--alphas", str(SMALL_PROBE.num_alphas), "--grid", str(SMALL_PROBE.grid)]


@pytest.fixture(scope="module")
def probes(text_tokenizer) -> ProbeSet:
    return small_probes(text_tokenizer)


@pytest.fixture(scope="module")
def probe_dir(probes: ProbeSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return probes.save(tmp_path_factory.mktemp("probe") / "probes")


def fewer_layers(folder: Path) -> None:
    """Rewrite a saved model's config.json to claim one block fewer than its weights hold."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["n_layer"] -= 1
    path.write_text(json.dumps(config))


def replay_kwargs(probes: ProbeSet, tmp_path: Path) -> dict:
    return {"out": tmp_path / "run", "probes": probes, "config": SMALL_PROBE, "progress": False}


# ---- replay: a config must describe the weights, for every source kind ----------------------


def test_fewer_layers_in_config_refused_in_save_pretrained_and_trainer_dirs(
    tmp_path: Path, probes: ProbeSet
) -> None:
    """A config.json claiming 1 block over 2-block weights fails that checkpoint; others go in."""
    save_model(tmp_path / "step1-tokens100", seed=1)
    save_model(tmp_path / "step2-tokens200", seed=2)
    trainer = tmp_path / "checkpoint-3"
    save_model(trainer, seed=3)
    (trainer / "trainer_state.json").write_text(
        json.dumps({"global_step": 3, "num_input_tokens_seen": 300})
    )
    fewer_layers(tmp_path / "step2-tokens200")
    fewer_layers(trainer)
    result = replay([tmp_path], **replay_kwargs(probes, tmp_path))
    assert [c.step for c in result.measured] == [1]
    failed = {c.step: reason for c, reason in result.failed}
    assert sorted(failed) == [2, 3]
    for reason in failed.values():
        assert "unexpected" in reason
        assert "transformer.h.1" in reason
        assert "(1 layers)" in reason


def test_fewer_layers_refused_in_a_state_dict_file(tmp_path: Path, probes: ProbeSet) -> None:
    """A .ckpt whose config.json beside it claims fewer blocks is refused, naming the keys."""
    model = tiny_gpt2(VOCAB)
    model.config.save_pretrained(tmp_path)
    fewer_layers(tmp_path)
    torch.save({"state_dict": model.state_dict(), "global_step": 4}, tmp_path / "last.ckpt")
    result = replay([tmp_path / "last.ckpt"], tokens_per_step=10, **replay_kwargs(probes, tmp_path))
    assert not result.measured
    assert "unexpected" in result.failed[0][1]
    assert "transformer.h.1" in result.failed[0][1]


def test_fewer_layers_refused_in_a_hub_revision_of_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached hub revision loads through its symlinks into blobs/; a misdescribed one fails."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    good = save_model(tmp_path / "good", seed=1)
    add_hub_revision(cache, "org/tiny", "step1", tmp_path / "good")
    save_model(tmp_path / "bad", seed=2)
    fewer_layers(tmp_path / "bad")
    add_hub_revision(cache, "org/tiny", "step2", tmp_path / "bad")
    loaded = load_model("org/tiny", revision="step1")
    assert torch.equal(
        loaded.transformer.h[1].mlp.c_fc.weight, good.transformer.h[1].mlp.c_fc.weight
    )
    with pytest.raises(CheckpointError, match=r"org/tiny \(revision step2\).*unexpected.*h\.1"):
        load_model("org/tiny", revision="step2")


# ---- replay: any checkpoint unreadable while discovered is that checkpoint's failure --------


def test_garbage_checkpoints_fail_alone_without_a_traceback(
    tmp_path: Path, probe_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """Text and random bytes as .ckpt, a non-numeric step, no config.json: named, exit 1."""
    save_model(tmp_path / "step1-tokens100", seed=1)
    (tmp_path / "epoch=0-step=2.ckpt").write_text("not a checkpoint\n")
    noise = random.Random(0).randbytes(4096)
    assert noise[0] != pickle.PROTO[0]  # pickle's first opcode would make it a damaged pickle
    (tmp_path / "epoch=0-step=3.ckpt").write_bytes(noise)
    trainer = tmp_path / "checkpoint-4"
    save_model(trainer, seed=4)
    (trainer / "trainer_state.json").write_text(json.dumps({"global_step": "four"}))
    orphan = tmp_path / "checkpoint-5"
    save_model(orphan, seed=5)
    (orphan / "config.json").unlink()
    argv = ["replay", str(tmp_path), "--out", str(tmp_path / "run"), "--probe", str(probe_dir)]
    assert main([*argv, "--tokens-per-step", "100", *SMALL]) == 1
    out, err = capsys.readouterr()
    assert "1 measured, 0 already there, 4 failed" in out
    failed = {line.split()[1].rstrip(":"): line for line in out.splitlines() if "FAILED" in line}
    assert sorted(failed) == sorted(
        str(tmp_path / name)
        for name in ("epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt", "checkpoint-4", "checkpoint-5")
    )
    for name in ("epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt"):
        assert "not a torch checkpoint: neither a zip archive" in failed[str(tmp_path / name)]
    assert "global_step is 'four'" in failed[str(trainer)]
    assert "without config.json" in failed[str(orphan)]
    assert "Traceback" not in err
    assert SnapshotStore(tmp_path / "run").steps() == [1]


# ---- replay: no custom code, no weights from outside the folder -----------------------------


@pytest.mark.parametrize("model_type", ["gpt2", "evil_arch"])
def test_a_config_asking_for_custom_code_is_refused_without_a_prompt(
    tmp_path: Path, model_type: str, text_tokenizer, capsys: pytest.CaptureFixture
) -> None:
    """auto_map in config.json: refused by name; transformers' y/N prompt is never reached."""
    save_model(tmp_path, seed=0)
    config = json.loads((tmp_path / "config.json").read_text())
    config |= {"model_type": model_type, "auto_map": {"AutoModelForCausalLM": "evil.Model"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "evil.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(CheckpointError, match=r"names custom code.*never runs"):
        load_model(tmp_path)
    assert main(["measure", "--init-from", str(tmp_path), "--tokenizer", "builtin"]) == 2
    out, err = capsys.readouterr()
    assert "names custom code" in err
    assert "Do you wish" not in out


def test_a_tokenizer_asking_for_custom_code_is_not_run(
    tmp_path: Path, text_tokenizer, capsys: pytest.CaptureFixture
) -> None:
    """A tokenizer_config.json naming custom code gives a CheckpointError, no prompt, no code."""
    text_tokenizer.save_pretrained(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config |= {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.T", None]}}
    path.write_text(json.dumps(config))
    (tmp_path / "evil.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(CheckpointError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    assert "Do you wish" not in capsys.readouterr().out


def sharded(folder: Path) -> list[str]:
    """Save a tiny GPT-2 in several shards; the shard file names, from the index."""
    tiny_gpt2(VOCAB).save_pretrained(folder, max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def point_index(folder: Path, old: str, new: str) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"] = {k: new if v == old else v for k, v in index["weight_map"].items()}
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("escape", ["parent", "absolute", "symlink", "single_file_symlink"])
def test_weights_are_read_only_from_inside_the_folder(tmp_path: Path, escape: str) -> None:
    """An index or a symlink naming a file outside the checkpoint folder is refused."""
    folder = tmp_path / "ckpt"
    shards = sharded(folder)
    assert len(shards) > 1
    assert load_model(folder).config.n_layer == 2  # intact, the sharded save loads
    outside = tmp_path / "x.safetensors"
    shutil.move(folder / shards[0], outside)
    if escape == "parent":
        point_index(folder, shards[0], "../x.safetensors")
    elif escape == "absolute":
        point_index(folder, shards[0], str(outside))
    elif escape == "symlink":
        (folder / shards[0]).symlink_to(outside)
    else:
        single = tmp_path / "single"
        tiny_gpt2(VOCAB).save_pretrained(single)
        shutil.move(single / "model.safetensors", outside.with_name("y.safetensors"))
        (single / "model.safetensors").symlink_to(outside.with_name("y.safetensors"))
        folder = single
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_model(folder)


# ---- clear errors: arguments of the drivers, checked once in the Monitor ---------------------


@pytest.mark.parametrize("driver", [Monitor, RegionMonitor, RegionMonitorCallback])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tokenizer": "gpt2"}, r"tokenizer='gpt2': need the tokenizer object.*AutoTokenizer"),
        ({"probes": "dir/"}, r"probes='dir/': need a ProbeSet.*ProbeSet.load\('dir/'\)"),
        ({"run_dir": 123}, r"run_dir=123: need a path"),
    ],
)
def test_driver_arguments_of_the_wrong_kind_are_refused(
    driver: type, kwargs: dict, match: str, probes: ProbeSet
) -> None:
    """A name where an object belongs, or a number for a path: ConfigError at construction."""
    given = {"probes": probes, **kwargs}
    with pytest.raises(ConfigError, match=match):
        driver(WatchConfig(), **given) if driver is Monitor else driver(**given)


@pytest.mark.parametrize(
    ("span", "match"),
    [
        ((0, 1, 2), "need two numbers"),
        ("ab", "need two numbers"),
        ((-math.inf, math.inf), "need finite low < high"),
        ((0.0, math.nan), "need finite low < high"),
        ((1.0, 0.0), "need finite low < high"),
    ],
)
def test_probe_config_span_must_be_two_finite_increasing_numbers(span: object, match: str) -> None:
    """span is refused at construction, naming the field."""
    with pytest.raises(ConfigError, match=rf"ProbeConfig\.span: span=.*{match}"):
        ProbeConfig(span=span)


@pytest.mark.parametrize(
    ("triples", "match"),
    [
        ([[0, 1, 13]], r"index 13.*0\.\.12"),
        ([[-1, 0, 1]], r"index -1.*0\.\.12"),
        ([[0, 1]], r"\[n, 3\]"),
    ],
)
def test_probe_set_triples_must_index_its_prompts(
    probes: ProbeSet, triples: list, match: str
) -> None:
    """Map triples that are negative or past the 13 random prompts: ConfigError at construction."""
    with pytest.raises(ConfigError, match=match):
        ProbeSet(probes.random, probes.similar, probes.dissimilar, (), torch.tensor(triples))


# ---- clear errors: models the probe cannot measure, refused by name at setup ----------------


def tiny(config: object) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        return AutoModelForCausalLM.from_config(config)


REFUSED = {
    "bloom": (
        lambda: tiny(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
        "ALiBi",
    ),
    "falcon_alibi": (
        lambda: tiny(
            FalconConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                alibi=True,
            )
        ),
        "ALiBi",
    ),
    "mamba": (
        lambda: tiny(MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2)),
        "no attention layers",
    ),
    "mpt": (lambda: tiny(MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB)), "ALiBi"),
    "mamba2": (
        lambda: tiny(
            Mamba2Config(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_heads=4,
                head_dim=16,
                n_groups=1,
                expand=2,
            )
        ),
        "no attention layers",
    ),
    "falcon_mamba": (
        lambda: tiny(FalconMambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2)),
        "no attention layers",
    ),
    "rwkv": (
        lambda: tiny(
            RwkvConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                attention_hidden_size=32,
                intermediate_size=64,
            )
        ),
        "no attention layers",
    ),
    "gpt2_no_head": (
        lambda: GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)),
        r"GPT2Model has no LM head.*AutoModelForCausalLM",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_models_the_probe_cannot_drive_are_refused_by_name_at_setup(
    name: str, probes: ProbeSet, tmp_path: Path
) -> None:
    """ALiBi, state-space and head-less models: UnsupportedModelError at setup, any block_path."""
    build, match = REFUSED[name]
    model = build()
    monitor = Monitor(WatchConfig(probe=ProbeConfig(block_path="h")), probes=probes)
    with pytest.raises(UnsupportedModelError, match=match):
        monitor.setup(model, log_dir=tmp_path)
    assert not (tmp_path / "regionwatch").exists()


def test_a_model_on_the_meta_device_is_refused(probes: ProbeSet) -> None:
    """Parameters without values (meta device) cannot be measured: refused before any pass."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)
        )
    with pytest.raises(UnsupportedModelError, match=r"meta device.*load the weights first"):
        measure(model, probes, SMALL_PROBE)


# ---- clear errors: the command line ---------------------------------------------------------


def test_cli_usage_conflicts_exit_2_with_the_fix(
    tmp_path: Path, probe_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """A missing model folder, a file as report folder, flags --probe ignores: exit 2."""
    assert main(["measure", str(tmp_path / "nonexistent")]) == 2
    assert "no such directory" in capsys.readouterr().err
    config_dir = tmp_path / "cfg"
    GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4).save_pretrained(config_dir)
    argv = ["measure", "--init-from", str(config_dir), "--probe", str(probe_dir)]
    assert main([*argv, "--seq-len", "5"]) == 2
    assert "--seq-len with --probe" in capsys.readouterr().err
    assert main(["measure", str(config_dir), "--probe", str(probe_dir), "--seed", "3"]) == 2
    assert "--seed would be ignored" in capsys.readouterr().err
    (tmp_path / "file.html").write_text("")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "file.html")]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_cuda_without_cuda_exits_2(
    tmp_path: Path, probe_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """--device cuda on a CPU-only machine says so, for measure and replay, before loading."""
    assert main(["measure", "--init-from", str(tmp_path), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    argv = ["replay", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cuda:0"]
    assert main(argv) == 2
    assert "--device cuda:0: CUDA is not available" in capsys.readouterr().err
