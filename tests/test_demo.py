"""The demo: its config files, and an end-to-end run of each trainer at toy size via the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from regionwatch import ConfigError, ProbeConfig, SnapshotStore
from regionwatch.cli import main
from regionwatch.demo import DemoConfig, model_config

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


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"layer": 4}, r"unknown keys \['layer'\]"),
        ({"architecture": "mamba"}, r"architecture='mamba'"),
        ({"width": 30, "heads": 4}, r"multiple of heads"),
        ({"steps": 0}, r"steps=0"),
        ({"probe": {"grid": 1}}, r"ProbeConfig.grid"),
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


def test_demo_refuses_a_used_output_dir(tmp_path: Path) -> None:
    """Each demo run needs its own output directory."""
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    assert main(["demo", "--out", str(tmp_path / "used"), "--steps", "1", "--quiet"]) == 2
