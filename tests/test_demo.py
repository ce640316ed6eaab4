"""The demo: its config files, and an end-to-end run of each trainer at toy size via the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from regionwatch import ConfigError, ProbeConfig, SnapshotStore
from regionwatch.cli import main
from regionwatch.demo import DemoConfig, model_config, new_model, run_demo

ROOT = Path(__file__).resolve().parents[1]
TOY = {  # seconds, not minutes: the shape of the real run, at toy size
    "layers": 2,
    "width": 32,
    "heads": 2,
    "vocab_size": 512,
    "seq_len": 64,  # the hand-picked pairs take up to ~33 tokens of a 512-token vocabulary
    "batch_size": 8,
    "steps": 6,
    "warmup_steps": 2,
    "probe": {"num_alphas": 5, "grid": 7},
}


def test_demo_yaml_is_the_default_config() -> None:
    """configs/demo.yaml and DemoConfig() never drift apart."""
    assert DemoConfig.from_yaml(ROOT / "configs" / "demo.yaml") == DemoConfig()


def test_llama_variant_builds_a_llama() -> None:
    """configs/demo-llama.yaml gives a Llama config of the same size."""
    config = DemoConfig.from_yaml(ROOT / "configs" / "demo-llama.yaml")
    built = model_config(config)
    assert built.model_type == "llama"
    assert (built.num_hidden_layers, built.hidden_size) == (4, 256)


def test_gpu_overhead_config_is_a_100m_bf16_gpt2() -> None:
    """configs/overhead-100m-bf16.yaml has the parameter count its comment states."""
    config = DemoConfig.from_yaml(ROOT / "configs" / "overhead-100m-bf16.yaml")
    assert config.precision == "bf16-true"
    assert config.param_dtype == torch.bfloat16
    with torch.device("meta"):  # the shapes without 400 MB of weights
        model = new_model(config)
    assert sum(p.numel() for p in model.parameters()) == 103_000_064


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"layer": 4}, r"unknown keys \['layer'\]"),
        ({"architecture": "mamba"}, r"architecture='mamba'"),
        ({"width": 30, "heads": 4}, r"multiple of heads"),
        ({"steps": 0}, r"steps=0"),
        ({"probe": {"grid": 1}}, r"ProbeConfig.grid"),
        ({"precision": "16-mixed"}, r"precision='16-mixed': need one of \('32-true', 'bf16-true'"),
        ({"precision": "bf16"}, r"precision='bf16'"),
    ],
)
def test_bad_demo_configs_are_refused(data: dict, match: str) -> None:
    """A typo or an impossible value is refused, naming it."""
    with pytest.raises(ConfigError, match=match):
        DemoConfig.from_dict(data)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["lightning", "hf"])
def test_demo_runs_end_to_end(tmp_path: Path, trainer: str, capsys: pytest.CaptureFixture) -> None:
    """`regionwatch demo` trains, stores every scheduled snapshot, reports, and says where."""
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(TOY))
    out = tmp_path / "demo"
    assert (
        main(["demo", "--config", str(config), "--trainer", trainer, "--out", str(out), "--quiet"])
        == 0
    )
    printed = capsys.readouterr().out
    store = SnapshotStore(out / "regionwatch")
    records = store.records()
    assert records[0]["step"] == 0
    assert records[-1]["step"] == TOY["steps"]
    assert records[-1]["tokens"] == TOY["steps"] * TOY["batch_size"] * TOY["seq_len"]
    assert store.config == ProbeConfig(num_alphas=5, grid=7)
    assert (out / "report" / "index.html").is_file()
    assert "--samples_per_plugin images=" in printed
    assert "median" in printed
    assert str(out / "regionwatch") in printed


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["lightning", "hf"])
def test_demo_piped_shows_a_line_per_snapshot_and_one_bar(tmp_path: Path, trainer: str) -> None:
    """Piped to files, with no flags: a line per snapshot, one whole-run bar, no epoch counter."""
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(TOY))
    out = tmp_path / "demo"
    argv = ["demo", "--config", str(config), "--trainer", trainer, "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "regionwatch", *argv], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    records = SnapshotStore(out / "regionwatch").records()
    lines = [line for line in done.stderr.splitlines() if "max slope median" in line]
    assert len(lines) == len(records) == TOY["steps"] + 1
    assert (
        sum(line.count("view it with: tensorboard --logdir") for line in done.stderr.split("\n"))
        == 1
    )
    bar = done.stderr.replace("\r", "\n").splitlines()
    final = [line for line in bar if line.startswith("demo: 100%")]
    assert final, done.stderr
    tokens = TOY["steps"] * TOY["batch_size"] * TOY["seq_len"]
    assert f"{tokens:,} tokens, {len(records)} snapshots" in final[-1]
    assert "Epoch" not in done.stderr


@pytest.mark.parametrize("trainer", ["lightning", "hf"])
def test_bf16_true_demo_trains_in_bf16_and_stores_every_snapshot(
    tmp_path: Path, trainer: str
) -> None:
    """precision="bf16-true" reaches the trainer (Lightning's precision; a bf16 model under
    transformers.Trainer): the weights it trains, measures and saves are bf16, and every
    scheduled snapshot is stored, measured with fp32 numerics."""
    steps = 2  # each snapshot of a bf16 model upcasts module by module: ~1 s each on a CPU
    config = DemoConfig.from_dict(
        {**TOY, "steps": steps, "warmup_steps": 1, "precision": "bf16-true"}
    )
    result = run_demo(config, tmp_path / "demo", trainer=trainer, progress=False)
    store = SnapshotStore(result.run_dir)
    assert store.steps() == [0, 1, 2]  # a short run's log-spaced schedule takes every step
    final = store.read(steps)
    assert final.info["dtype"] == "torch.bfloat16"
    assert final.info["precision"] == "fp32"
    assert all(torch.isfinite(c.distance).all() for c in final.measurement.curves.values())
    saved = load_file(result.model_dir / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.bfloat16}


def test_demo_refuses_a_used_output_dir(tmp_path: Path) -> None:
    """Each demo run needs its own output directory."""
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    assert main(["demo", "--out", str(tmp_path / "used"), "--steps", "1", "--quiet"]) == 2
