"""RegionMonitor on a real Lightning Trainer: schedule, token counts, store, TensorBoard, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from regionwatch import ConfigError, ProbeConfig, RegionMonitor, Schedule, SnapshotStore
from regionwatch.errors import UnsupportedModelError
from regionwatch.lightning import count_batch_tokens, find_model
from tests.fixtures_text import TEXT_VOCAB_SIZE as VOCAB
from tests.lm import BATCH, SMALL_PROBE, TinyLM, Windows, loader, trainer


def fit(tmp: Path, lm_probes, lm_data: Windows, **kwargs) -> RegionMonitor:
    trainer_kwargs = {
        k: kwargs.pop(k) for k in ("max_steps", "accumulate_grad_batches") if k in kwargs
    }
    callback = RegionMonitor(
        probes=lm_probes,
        config=SMALL_PROBE,
        run_dir=tmp / "run",
        schedule=Schedule.every_steps(3),
        **kwargs,
    )
    trainer(tmp, [callback], **trainer_kwargs).fit(TinyLM(VOCAB), loader(lm_data))
    return callback


def test_snapshots_at_scheduled_steps_with_exact_token_counts(
    tmp_path: Path, lm_probes, lm_data: Windows
) -> None:
    """Steps 0, 3, 6 and the final 8 are stored with the non-padding tokens seen so far."""
    callback = fit(tmp_path, lm_probes, lm_data, max_steps=8)
    records = SnapshotStore(tmp_path / "run").records()
    assert [r["step"] for r in records] == [0, 3, 6, 8]
    expected = [lm_data.non_padding(range(step * BATCH)) for step in (0, 3, 6, 8)]
    assert [r["tokens"] for r in records] == expected
    assert expected[1] < 3 * BATCH * 16  # the padding was really left out
    assert callback.tokens == expected[-1]
    assert records[0]["max_slope/median"] < records[-1]["max_slope/median"] + 1  # numbers present


def test_gradient_accumulation_counts_every_micro_batch(
    tmp_path: Path, lm_probes, lm_data: Windows
) -> None:
    """With 2 micro-batches per optimizer step, step s has seen 2 * s batches' tokens."""
    fit(tmp_path, lm_probes, lm_data, max_steps=6, accumulate_grad_batches=2)
    records = SnapshotStore(tmp_path / "run").records()
    assert [r["step"] for r in records] == [0, 3, 6]
    assert [r["tokens"] for r in records] == [
        lm_data.non_padding(range(2 * s * BATCH)) for s in (0, 3, 6)
    ]


def test_tensorboard_logs_over_tokens(tmp_path: Path, lm_probes, lm_data: Windows) -> None:
    """The run's TensorBoard scalars use tokens seen as their step and equal the store's numbers."""
    fit(tmp_path, lm_probes, lm_data, max_steps=6)
    records = SnapshotStore(tmp_path / "run").records()
    events = EventAccumulator(
        str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "images": 0}
    )
    events.Reload()
    scalars = events.Scalars("regionwatch/max_slope/median")
    assert [e.step for e in scalars] == [r["tokens"] for r in records]
    assert [e.value for e in scalars] == pytest.approx([r["max_slope/median"] for r in records])
    assert len(events.Images("regionwatch/maps/triple_0")) == len(records)


def test_custom_token_counter_overrides(tmp_path: Path, lm_probes, lm_data: Windows) -> None:
    """A user-given count_tokens(batch) is what gets summed."""
    fit(tmp_path, lm_probes, lm_data, max_steps=3, count_tokens=lambda batch: 1000)
    assert [r["tokens"] for r in SnapshotStore(tmp_path / "run").records()] == [0, 3000]


def test_run_dir_defaults_into_the_trainer_log_dir(
    tmp_path: Path, lm_probes, lm_data: Windows
) -> None:
    """Without run_dir the run lives in <trainer.log_dir>/regionwatch."""
    callback = RegionMonitor(probes=lm_probes, config=SMALL_PROBE, schedule=Schedule.every_steps(2))
    trainer(tmp_path, [callback], max_steps=2).fit(TinyLM(VOCAB), loader(lm_data))
    assert SnapshotStore(tmp_path / "regionwatch").steps() == [0, 2]


def test_count_batch_tokens_reads_the_usual_batch_forms() -> None:
    """Attention masks count non-padding tokens; id tensors, tuples and lists count all."""
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert count_batch_tokens({"input_ids": ids, "attention_mask": mask}) == 8
    assert count_batch_tokens({"input_ids": ids}) == 10
    assert count_batch_tokens(ids) == 10
    assert count_batch_tokens((ids, ids)) == 10
    with pytest.raises(ConfigError, match="count_tokens=lambda batch"):
        count_batch_tokens({"pixels": torch.ones(2, 3)})


def test_find_model_is_unambiguous(text_tokenizer) -> None:
    """The one PreTrainedModel attribute is found; none or several is an error naming the fix."""
    module = TinyLM(VOCAB)
    assert find_model(module, None) is module.lm
    module.other = module.lm.__class__(module.lm.config)
    with pytest.raises(ConfigError, match=r"several: lm, other.*model_attr="):
        find_model(module, None)
    assert find_model(module, "other") is module.other
    with pytest.raises(ConfigError, match="no PreTrainedModel attribute"):
        find_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), None)


@pytest.mark.parametrize(
    ("setup", "error", "match"),
    [
        ("write_layer", UnsupportedModelError, r"write_layer=5 .*allowed 0\.\.0"),
        ("context", ConfigError, r"does not fit.*takes at most 8.*seq_len="),
        ("run_dir", ConfigError, r"not writable"),
        ("batch", ConfigError, r"count_tokens=lambda batch"),
    ],
)
def test_bad_configuration_fails_before_the_first_optimizer_step(
    tmp_path: Path, lm_probes, lm_data: Windows, setup: str, error: type, match: str
) -> None:
    """Each bad setting raises in setup / before the first step, with the fix in the message."""
    kwargs, positions, run_dir, batches = {}, 64, tmp_path / "run", loader(lm_data)
    if setup == "write_layer":
        kwargs["config"] = ProbeConfig(write_layer=5)
    elif setup == "context":
        positions = 8
    elif setup == "run_dir":
        run_dir.parent.mkdir(exist_ok=True)
        run_dir.write_text("a file, not a directory")
    elif setup == "batch":
        batches = torch.utils.data.DataLoader([torch.ones(4).float()] * 8, batch_size=4)
    callback = RegionMonitor(probes=lm_probes, run_dir=run_dir, **kwargs)
    model = TinyLM(VOCAB, positions=positions)
    if setup == "batch":
        model.training_step = lambda batch, i: model.lm(
            input_ids=torch.ones(4, 4, dtype=torch.long)
        ).logits.sum()
    fit_trainer = trainer(tmp_path, [callback], max_steps=4)
    with pytest.raises(error, match=match):
        fit_trainer.fit(model, batches)
    assert fit_trainer.global_step == 0


def test_neither_tokenizer_nor_probes_is_refused() -> None:
    """Constructing the callback without a way to get prompts fails at once."""
    with pytest.raises(ConfigError, match=r"tokenizer=\.\.\..*probes=ProbeSet"):
        RegionMonitor()


def test_last_step_carries_region_maps_when_the_schedule_lands_on_it(
    tmp_path: Path, lm_probes, lm_data: Windows
) -> None:
    """every_steps(4), max_steps=12: the snapshot at 12 has maps, as the first one does."""
    callback = RegionMonitor(
        probes=lm_probes,
        config=SMALL_PROBE,
        run_dir=tmp_path / "run",
        schedule=Schedule.every_steps(4),
    )
    trainer(tmp_path, [callback], max_steps=12).fit(TinyLM(VOCAB), loader(lm_data))
    records = SnapshotStore(tmp_path / "run").records()
    assert [r["step"] for r in records] == [0, 4, 8, 12]
    assert "maps" in records[0]["parts"]
    assert "maps" in records[-1]["parts"]
