"""RegionMonitor on a real Lightning Trainer: schedule, token counts, store, TensorBoard, errors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from regionwatch import ConfigError, ProbeConfig, RegionMonitor, SnapshotStore
from regionwatch.checkpoints import discover
from regionwatch.counting import count_batch_tokens
from regionwatch.errors import UnsupportedModelError
from regionwatch.lightning import find_model
from tests.conftest import file_states
from tests.support.factories import make_monitor
from tests.support.lm import BATCH, SMALL_PROBE, TinyLM, Windows, loader, trainer
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB


def fit(tmp: Path, lm_probes, lm_data: Windows, **kwargs) -> RegionMonitor:
    trainer_kwargs = {
        k: kwargs.pop(k) for k in ("max_steps", "accumulate_grad_batches", "device") if k in kwargs
    }
    callback = make_monitor("lightning", lm_probes, tmp / "run", every=3, **kwargs)
    trainer(tmp, [callback], **trainer_kwargs).fit(TinyLM(VOCAB), loader(lm_data))
    return callback


def test_snapshots_at_scheduled_steps_with_exact_token_counts(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """Steps 0, 3, 6 and the final 8 are stored with the non-padding tokens seen so far."""
    callback = fit(tmp_path, lm_probes, lm_data, max_steps=8, device=device)
    records = SnapshotStore(tmp_path / "run").records()
    assert [r["step"] for r in records] == [0, 3, 6, 8]
    expected = [lm_data.non_padding(range(step * BATCH)) for step in (0, 3, 6, 8)]
    assert [r["tokens"] for r in records] == expected
    assert expected[1] < 3 * BATCH * 16  # the padding was really left out
    assert callback.tokens == expected[-1]
    assert records[0]["max_slope/median"] < records[-1]["max_slope/median"] + 1  # numbers present


def test_gradient_accumulation_counts_every_micro_batch(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """With 2 micro-batches per optimizer step, step s has seen 2 * s batches' tokens."""
    fit(tmp_path, lm_probes, lm_data, max_steps=6, accumulate_grad_batches=2, device=device)
    records = SnapshotStore(tmp_path / "run").records()
    assert [r["step"] for r in records] == [0, 3, 6]
    assert [r["tokens"] for r in records] == [
        lm_data.non_padding(range(2 * s * BATCH)) for s in (0, 3, 6)
    ]


def test_tensorboard_logs_over_tokens(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """The run's TensorBoard scalars use tokens seen as their step and equal the store's numbers."""
    fit(tmp_path, lm_probes, lm_data, max_steps=6, device=device)
    records = SnapshotStore(tmp_path / "run").records()
    events = EventAccumulator(
        str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "images": 0}
    )
    events.Reload()
    scalars = events.Scalars("regionwatch/max_slope/median")
    assert [e.step for e in scalars] == [r["tokens"] for r in records]
    assert [e.value for e in scalars] == pytest.approx([r["max_slope/median"] for r in records])
    assert len(events.Images("regionwatch/maps/triple_0")) == len(records)


def test_custom_token_counter_overrides(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """A user-given count_tokens(batch) is what gets summed."""
    fit(tmp_path, lm_probes, lm_data, max_steps=3, count_tokens=lambda batch: 1000, device=device)
    assert [r["tokens"] for r in SnapshotStore(tmp_path / "run").records()] == [0, 3000]


def test_run_dir_defaults_into_the_trainer_log_dir(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """Without run_dir the run lives in <trainer.log_dir>/regionwatch."""
    callback = make_monitor("lightning", lm_probes)
    trainer(tmp_path, [callback], max_steps=2, device=device).fit(TinyLM(VOCAB), loader(lm_data))
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
        ("write_layer", UnsupportedModelError, r"write_layer=5: need an int in 0\.\.0"),
        ("context", ConfigError, r"do not fit.*takes at most 8.*seq_len="),
        ("run_dir", ConfigError, r"not writable"),
        ("batch", ConfigError, r"count_tokens=lambda batch"),
    ],
)
def test_bad_configuration_fails_before_the_first_optimizer_step(
    tmp_path: Path, lm_probes, lm_data: Windows, setup: str, error: type, match: str
) -> None:
    """Each bad setting raises in setup / before the first step, with the fix in the message."""
    probe, positions, run_dir, batches = ProbeConfig(), 64, tmp_path / "run", loader(lm_data)
    if setup == "write_layer":
        probe = ProbeConfig(write_layer=5)
    elif setup == "context":
        positions = 8
    elif setup == "run_dir":
        run_dir.parent.mkdir(exist_ok=True)
        run_dir.write_text("a file, not a directory")
    elif setup == "batch":
        batches = torch.utils.data.DataLoader([torch.ones(4).float()] * 8, batch_size=4)
    callback = make_monitor("lightning", lm_probes, run_dir, every=None, probe=probe)
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


def test_a_tokenizer_where_the_watch_config_goes_is_refused(text_tokenizer) -> None:
    """The first argument is the WatchConfig: a tokenizer there is named, with the keyword fix."""
    with pytest.raises(
        ConfigError,
        match=r"watch: need a regionwatch\.WatchConfig, not \w+, .*keywords \(tokenizer=tok\)",
    ):
        RegionMonitor(text_tokenizer)


# --- re-runs and resumes into a used run_dir --------------------------------------------------


def checkpointed_fit(
    tmp: Path,
    lm_probes,
    lm_data: Windows,
    *,
    max_steps: int,
    device: str,
    ckpt: Path | None = None,
    **kwargs,
) -> tuple[RegionMonitor, L.Trainer]:
    """Fit with a checkpoint saved as <tmp>/ckpt/last.ckpt; resume from `ckpt` if given."""
    monitor = make_monitor("lightning", lm_probes, **kwargs)
    saver = ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=2, save_last=True)
    fit_trainer = trainer(
        tmp,
        [monitor, saver],
        max_steps=max_steps,
        device=device,
        enable_checkpointing=True,
        logger=CSVLogger(tmp),  # a new log dir version per fit, as most loggers make
    )
    fit_trainer.fit(TinyLM(VOCAB), loader(lm_data), ckpt_path=ckpt)
    return monitor, fit_trainer


@pytest.mark.slow
def test_a_fresh_run_into_a_used_run_dir_is_refused_and_the_old_run_untouched(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """Another seed, no checkpoint, same run_dir: refused before step 0; not a file changes."""
    run = tmp_path / "run"
    fit(tmp_path, lm_probes, lm_data, max_steps=6, device=device)
    before = file_states(run, skip=("writer.lock",))
    callback = make_monitor("lightning", lm_probes, run, every=3)
    again = trainer(tmp_path, [callback], max_steps=6, device=device)
    with pytest.raises(ConfigError, match=r"already holds run \w+ \(3 snapshots, steps 0\.\.6.*"):
        again.fit(TinyLM(VOCAB, seed=1), loader(lm_data))
    assert again.global_step == 0
    # every snapshot, the index, TensorBoard: byte for byte
    assert file_states(run, skip=("writer.lock",)) == before
    assert SnapshotStore(run).steps() == [0, 3, 6]
    assert SnapshotStore(run).verify() == []


@pytest.mark.slow
def test_a_restart_of_the_same_seeded_run_before_its_first_checkpoint_goes_on(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """Only a step-0 baseline of the very same initial weights: the restart continues the run."""
    run = tmp_path / "run"

    def killed_after_the_baseline() -> None:
        with SnapshotStore.create(run, probes=lm_probes, config=SMALL_PROBE) as store:
            store.truncate_after(0)
        assert SnapshotStore(run).steps() == [0]

    # the baseline at 0, the final step 1
    fit(tmp_path, lm_probes, lm_data, max_steps=1, device=device)
    killed_after_the_baseline()
    # the same seeded model: its own baseline
    fit(tmp_path, lm_probes, lm_data, max_steps=3, device=device)
    assert SnapshotStore(run).steps() == [0, 3]
    killed_after_the_baseline()
    callback = make_monitor("lightning", lm_probes, run, every=None)
    with pytest.raises(ConfigError, match=r"already holds run \w+ \(1 snapshots, steps 0\.\.0"):
        trainer(tmp_path, [callback], max_steps=3, device=device).fit(
            TinyLM(VOCAB, seed=1), loader(lm_data)
        )
    assert SnapshotStore(run).steps() == [0]


@pytest.mark.slow
def test_resume_continues_the_run_its_checkpoint_names_without_a_stray_dir(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """Default run dir, a new logger version on resume: the run goes on where it was, and the
    resumed fit leaves no empty run dir in its own log dir."""
    first, _ = checkpointed_fit(tmp_path, lm_probes, lm_data, max_steps=4, device=device)
    old_run = tmp_path / "lightning_logs" / "version_0" / "regionwatch"
    assert SnapshotStore(old_run).steps() == [0, 2, 4]
    _, resumed = checkpointed_fit(
        tmp_path,
        lm_probes,
        lm_data,
        max_steps=8,
        device=device,
        ckpt=tmp_path / "ckpt" / "last.ckpt",
    )
    assert Path(resumed.log_dir).name == "version_1"
    assert not (Path(resumed.log_dir) / "regionwatch").exists()
    records = SnapshotStore(old_run).records()
    assert [r["step"] for r in records] == [0, 2, 4, 6, 8]
    assert len({r["run_id"] for r in records}) == 1
    assert records[2]["tokens"] == first.tokens


def test_state_key_names_the_run_dir_and_old_checkpoints_still_resume(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """The state sits under the state_key; a checkpoint with the old key (the class name, no run
    id) resumes the same way and gives replay its tokens."""
    run = tmp_path / "run"
    first, _ = checkpointed_fit(
        tmp_path, lm_probes, lm_data, max_steps=4, device=device, run_dir=run
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert first.state_key == f"regionwatch.RegionMonitor[{run}]"
    state = checkpoint["callbacks"].pop(first.state_key)
    assert state["run_id"] == SnapshotStore(run).run_id
    assert state["tokens"] == first.tokens
    assert [(c.step, c.tokens) for c in discover([last])] == [(4, first.tokens)]
    checkpoint["callbacks"]["RegionMonitor"] = {k: v for k, v in state.items() if k != "run_id"}
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    assert [(c.step, c.tokens) for c in discover([old])] == [(4, first.tokens)]
    resumed, _ = checkpointed_fit(
        tmp_path, lm_probes, lm_data, max_steps=6, device=device, run_dir=run, ckpt=old
    )
    records = SnapshotStore(run).records()
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    assert records[2]["tokens"] == first.tokens < records[3]["tokens"] == resumed.tokens


@pytest.mark.parametrize(
    ("count_tokens", "match"),
    [
        (lambda batch: -5, r"count_tokens returned -5 .*an int >= 0"),
        (lambda batch: 12.5, r"count_tokens returned 12\.5 .*an int >= 0"),
        (lambda batch: True, r"count_tokens returned True .*an int >= 0"),
        (lambda batch: torch.tensor(3.0), r"count_tokens returned tensor\(3\.\) .*an int >= 0"),
    ],
)
def test_a_bad_token_count_fails_before_the_first_optimizer_step(
    tmp_path: Path, lm_probes, lm_data: Windows, count_tokens, match: str
) -> None:
    """What count_tokens returns is checked at the first batch, before any optimizer step."""
    callback = make_monitor(
        "lightning", lm_probes, tmp_path / "run", every=None, count_tokens=count_tokens
    )
    fit_trainer = trainer(tmp_path, [callback], max_steps=4)
    with pytest.raises(ConfigError, match=match):
        fit_trainer.fit(TinyLM(VOCAB), loader(lm_data))
    assert fit_trainer.global_step == 0


def test_a_token_count_that_is_not_callable_is_refused_at_construction(lm_probes) -> None:
    """count_tokens=42 fails when the callback is made, naming the argument and the fix."""
    with pytest.raises(ConfigError, match=r"count_tokens=42 is not callable.*lambda batch"):
        make_monitor("lightning", lm_probes, every=None, probe=ProbeConfig(), count_tokens=42)


def test_last_step_carries_region_maps_when_the_schedule_lands_on_it(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """every_steps(4), max_steps=12: the snapshot at 12 has maps, as the first one does."""
    callback = make_monitor("lightning", lm_probes, tmp_path / "run", every=4)
    trainer(tmp_path, [callback], max_steps=12, device=device).fit(TinyLM(VOCAB), loader(lm_data))
    records = SnapshotStore(tmp_path / "run").records()
    assert [r["step"] for r in records] == [0, 4, 8, 12]
    assert "maps" in records[0]["parts"]
    assert "maps" in records[-1]["parts"]


class LossRecorder(L.Callback):
    """Lightning's own view of each optimizer step's loss: global step -> the returned loss."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def test_training_loss_is_copied_onto_the_token_axis(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """regionwatch/train/loss: training_step's loss every log_every_n_steps, on tokens."""
    callback = make_monitor("lightning", lm_probes, tmp_path / "run", every=100)
    recorder = LossRecorder()
    fit_trainer = trainer(
        tmp_path, [callback, recorder], max_steps=6, device=device, log_every_n_steps=2
    )
    fit_trainer.fit(TinyLM(VOCAB), loader(lm_data))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    loss = events.Scalars("regionwatch/train/loss")
    tokens = {s: lm_data.non_padding(range(s * BATCH)) for s in (2, 4, 6)}
    assert [e.step for e in loss] == list(tokens.values())
    assert [e.value for e in loss] == pytest.approx([recorder.losses[s] for s in tokens])


class MetaLM(TinyLM):
    """A LightningModule whose GPT-2 was built on the meta device and never loaded."""

    def __init__(self, vocab: int) -> None:
        super().__init__(vocab)
        with torch.device("meta"):
            self.lm = type(self.lm)(self.lm.config)


def test_meta_weights_are_refused_in_setup_in_regionwatchs_words(
    tmp_path: Path, lm_probes, lm_data: Windows
) -> None:
    """A meta-device model is refused in the callback's setup, and that refusal is what the
    user gets: not Lightning's teardown failing to move the meta model to the CPU."""
    callback = make_monitor("lightning", lm_probes, tmp_path / "run")
    with pytest.raises(UnsupportedModelError, match=r"meta device.*load the weights first"):
        trainer(tmp_path, [callback], max_steps=1).fit(MetaLM(VOCAB), loader(lm_data))
    assert not (tmp_path / "run").exists()
