"""RegionMonitorCallback on a real transformers.Trainer: schedule, tokens, store, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import Trainer

from regionwatch import ConfigError, ProbeConfig, RegionMonitorCallback, Schedule, SnapshotStore
from regionwatch.errors import UnsupportedModelError
from tests.fixtures_text import TEXT_VOCAB_SIZE as VOCAB
from tests.lm import BATCH, SMALL_PROBE, Windows, hf_args, tiny_gpt2


def train(
    tmp: Path,
    lm_probes,
    lm_data: Windows,
    *,
    callback: RegionMonitorCallback | None = None,
    **overrides,
) -> Trainer:
    callback = callback or RegionMonitorCallback(
        probes=lm_probes, config=SMALL_PROBE, run_dir=tmp / "run", schedule=Schedule.every_steps(2)
    )
    trainer = Trainer(
        tiny_gpt2(VOCAB), hf_args(tmp, **overrides), train_dataset=lm_data, callbacks=[callback]
    )
    trainer.train()
    return trainer


def test_snapshots_at_scheduled_steps_with_the_trainers_token_count(
    tmp_path: Path, lm_probes, lm_data: Windows
) -> None:
    """Steps 0, 2, 4, 6 are stored with the Trainer's non-padding token count."""
    trainer = train(tmp_path, lm_probes, lm_data)
    records = SnapshotStore(tmp_path / "run").records()
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    assert records[-1]["tokens"] == trainer.state.num_input_tokens_seen
    assert 0 < records[1]["tokens"] < records[2]["tokens"] < records[3]["tokens"]
    assert records[1]["tokens"] < 2 * BATCH * 16  # padding left out


def test_run_dir_defaults_into_the_output_dir(tmp_path: Path, lm_probes, lm_data: Windows) -> None:
    """Without run_dir the run lives in <output_dir>/regionwatch, stable across resumes."""
    callback = RegionMonitorCallback(
        probes=lm_probes, config=SMALL_PROBE, schedule=Schedule.every_steps(3)
    )
    train(tmp_path, lm_probes, lm_data, callback=callback, max_steps=3)
    assert SnapshotStore(tmp_path / "out" / "regionwatch").steps() == [0, 3]


def test_token_counting_must_be_switched_on(tmp_path: Path, lm_probes, lm_data: Windows) -> None:
    """Without include_num_input_tokens_seen the callback refuses at train begin, naming the fix."""
    with pytest.raises(ConfigError, match=r'include_num_input_tokens_seen="non_padding"'):
        train(tmp_path, lm_probes, lm_data, include_num_input_tokens_seen="no")
    assert not (tmp_path / "run" / "index.jsonl").exists()


def test_bad_write_layer_fails_before_training(tmp_path: Path, lm_probes, lm_data: Windows) -> None:
    """A write layer the model does not have fails at on_train_begin."""
    callback = RegionMonitorCallback(
        probes=lm_probes, config=ProbeConfig(write_layer=3), run_dir=tmp_path / "run"
    )
    with pytest.raises(UnsupportedModelError, match=r"write_layer=3"):
        train(tmp_path, lm_probes, lm_data, callback=callback)
