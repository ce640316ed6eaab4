"""RegionMonitorCallback on a real transformers.Trainer: schedule, tokens, store, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from regionwatch import ConfigError, ProbeConfig, RegionMonitorCallback, SnapshotStore
from regionwatch.errors import UnsupportedModelError
from tests.conftest import file_states
from tests.support.factories import make_monitor
from tests.support.lines import Lines
from tests.support.lm import BATCH, SEQ, Windows, hf_args, tiny_gpt2
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB


def train(
    tmp: Path,
    lm_probes,
    lm_data: Windows,
    *,
    callback: RegionMonitorCallback | None = None,
    device: str = "cpu",
    **overrides,
) -> Trainer:
    callback = callback or make_monitor("hf", lm_probes, tmp / "run")
    args = hf_args(tmp, device=device, **overrides)
    trainer = Trainer(tiny_gpt2(VOCAB), args, train_dataset=lm_data, callbacks=[callback])
    trainer.train()
    return trainer


def test_snapshots_at_scheduled_steps_with_the_trainers_token_count(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """Steps 0, 2, 4, 6 are stored with the Trainer's non-padding token count."""
    trainer = train(tmp_path, lm_probes, lm_data, device=device)
    records = SnapshotStore(tmp_path / "run").records()
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    assert records[-1]["tokens"] == trainer.state.num_input_tokens_seen
    assert 0 < records[1]["tokens"] < records[2]["tokens"] < records[3]["tokens"]
    assert records[1]["tokens"] < 2 * BATCH * 16  # padding left out


def test_run_dir_defaults_into_the_output_dir(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """Without run_dir the run lives in <output_dir>/regionwatch, stable across resumes."""
    callback = make_monitor("hf", lm_probes, every=3)
    train(tmp_path, lm_probes, lm_data, callback=callback, max_steps=3, device=device)
    assert SnapshotStore(tmp_path / "out" / "regionwatch").steps() == [0, 3]


def test_token_counting_must_be_switched_on(tmp_path: Path, lm_probes, lm_data: Windows) -> None:
    """Without include_num_input_tokens_seen the callback refuses at train begin, naming the fix."""
    with pytest.raises(ConfigError, match=r'include_num_input_tokens_seen="non_padding"'):
        train(tmp_path, lm_probes, lm_data, include_num_input_tokens_seen="no")
    assert not (tmp_path / "run" / "index.jsonl").exists()


def test_bad_write_layer_fails_before_training(tmp_path: Path, lm_probes, lm_data: Windows) -> None:
    """A write layer the model does not have fails at on_train_begin."""
    callback = make_monitor(
        "hf", lm_probes, tmp_path / "run", every=None, probe=ProbeConfig(write_layer=3)
    )
    with pytest.raises(UnsupportedModelError, match=r"write_layer=3"):
        train(tmp_path, lm_probes, lm_data, callback=callback)


# --- re-runs and resumes into a used run_dir --------------------------------------------------


def hf_trainer(
    tmp: Path, lm_probes, lm_data: Windows, run: Path, *, device: str, seed: int = 0, **overrides
):
    callback = make_monitor("hf", lm_probes, run)
    args = hf_args(tmp, device=device, save_strategy="steps", save_steps=2, **overrides)
    return Trainer(tiny_gpt2(VOCAB, seed=seed), args, train_dataset=lm_data, callbacks=[callback])


def test_a_fresh_run_into_a_used_run_dir_is_refused_and_the_old_run_untouched(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """Another seed, no checkpoint, same run_dir: refused before step 0; not a file changes."""
    run = tmp_path / "run"
    train(tmp_path, lm_probes, lm_data, max_steps=4, device=device)
    before = file_states(run, skip=("writer.lock",))
    again = hf_trainer(
        tmp_path / "again", lm_probes, lm_data, run, device=device, seed=1, max_steps=4
    )
    with pytest.raises(ConfigError, match=r"already holds run \w+ \(3 snapshots, steps 0\.\.4"):
        again.train()
    assert again.state.global_step == 0
    assert file_states(run, skip=("writer.lock",)) == before
    assert SnapshotStore(run).steps() == [0, 2, 4]


@pytest.mark.slow
@pytest.mark.parametrize("restore_callbacks", [False, True])
def test_resume_continues_the_run_its_checkpoint_names(
    tmp_path: Path, lm_probes, lm_data: Windows, restore_callbacks: bool, device: str
) -> None:
    """trainer_state.json names the run; resuming from it continues that run, whether or not the
    Trainer restores callback states."""
    run, flag = tmp_path / "run", {"restore_callback_states_from_checkpoint": restore_callbacks}
    hf_trainer(tmp_path, lm_probes, lm_data, run, device=device, max_steps=4, **flag).train()
    saved = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["regionwatch"] == {
        "run_id": SnapshotStore(run).run_id,
        "run_dir": str(run),
    }
    resumed = hf_trainer(tmp_path, lm_probes, lm_data, run, device=device, max_steps=6, **flag)
    resumed.train(resume_from_checkpoint=True)
    records = SnapshotStore(run).records()
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    assert records[-1]["tokens"] == resumed.state.num_input_tokens_seen


@pytest.mark.slow
def test_a_checkpoint_of_another_run_is_refused(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """Resuming run A's checkpoint into run B's directory: refused, B left as it was."""
    run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
    hf_trainer(tmp_path / "a", lm_probes, lm_data, run_a, device=device, max_steps=2).train()
    hf_trainer(tmp_path / "b", lm_probes, lm_data, run_b, device=device, max_steps=2).train()
    before = file_states(run_b, skip=("writer.lock",))
    wrong = hf_trainer(tmp_path / "a", lm_probes, lm_data, run_b, device=device, max_steps=4)
    run_a_id = SnapshotStore(run_a).run_id
    with pytest.raises(
        ConfigError, match=rf"the checkpoint this run resumed from belongs to run {run_a_id}"
    ):
        wrong.train(resume_from_checkpoint=True)
    assert file_states(run_b, skip=("writer.lock",)) == before


class Packed(torch.utils.data.Dataset):
    """Full windows, packed: input ids and labels, with or without an all-ones attention mask."""

    def __init__(self, windows: Windows, *, mask: bool) -> None:
        self.windows, self.mask = windows, mask

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.windows[i]
        return row if self.mask else {k: v for k, v in row.items() if k != "attention_mask"}


@pytest.mark.parametrize(
    ("mask", "counting"), [(True, "non_padding"), (False, "all")], ids=["masked", "packed"]
)
def test_readme_recipe_counts_packed_batches_exactly_and_quietly(
    tmp_path: Path, lm_probes, text_tokenizer, mask: bool, counting: str
) -> None:
    """The README's recipe: with masks "non_padding", packed without "all": exact, no flood;
    log_level="info" shows the setup line and one line per snapshot in the Trainer's channel."""
    data = Packed(Windows(text_tokenizer, pad=False), mask=mask)
    lines = Lines()
    channel = logging.getLogger("transformers")  # the Trainer's own, with its own handler
    channel.addHandler(lines)
    try:
        trainer = train(
            tmp_path, lm_probes, data, include_num_input_tokens_seen=counting, log_level="info"
        )
    finally:
        channel.removeHandler(lines)
    records = SnapshotStore(tmp_path / "run").records()
    assert [r["tokens"] for r in records] == [r["step"] * BATCH * SEQ for r in records]
    assert trainer.state.num_input_tokens_seen == 6 * BATCH * SEQ
    assert not [m for m in lines.messages if "Could not determine" in m]
    assert len([m for m in lines.messages if "max slope median" in m]) == len(records)
    assert sum("view it with: tensorboard --logdir" in m for m in lines.messages) == 1


def test_a_callback_passed_without_attach_warns_when_report_to_has_integrations(
    tmp_path: Path, lm_probes, lm_data: Windows, caplog: pytest.LogCaptureFixture
) -> None:
    """callbacks=[cb] never sees its Trainer: report_to's integrations get nothing, and a
    WARNING says so with the one-line fix (attach)."""
    with caplog.at_level(logging.WARNING, logger="regionwatch"):
        train(tmp_path, lm_probes, lm_data, max_steps=1, report_to=["tensorboard"])
    [warning] = [r for r in caplog.records if "report_to" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "['tensorboard']" in warning.getMessage()
    assert "RegionMonitorCallback(...).attach(trainer)" in warning.getMessage()


class KeepOnHost(TrainingArguments):
    """Arguments of a Trainer that leaves device placement to `train()` (as FSDP, DeepSpeed and
    model parallelism do): HF's documented way is to override this property."""

    @property
    def place_model_on_device(self) -> bool:
        return False


def test_meta_weights_are_refused_when_the_trainer_is_built(tmp_path: Path, lm_probes) -> None:
    """A model on the meta device is refused at the Trainer's construction (on_init_end), in
    regionwatch's words, before train() would place it and fail in torch's."""
    with torch.device("meta"):
        model = tiny_gpt2(VOCAB)
    values = hf_args(tmp_path).to_dict()
    args = KeepOnHost(**{k: v for k, v in values.items() if k in KeepOnHost.__dataclass_fields__})
    callback = make_monitor("hf", lm_probes, tmp_path / "run")
    with pytest.raises(UnsupportedModelError, match=r"meta device.*load the weights first"):
        Trainer(model, args, callbacks=[callback])
    assert not (tmp_path / "run").exists()
