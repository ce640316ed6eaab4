"""`regionwatch demo`: pretrain a small LM from scratch on the built-in corpus, monitored live.

Everything is local: a byte-level BPE tokenizer trained on the built-in corpus (Tiny
Shakespeare), training windows served through `datasets`, a GPT-2- or Llama-style model built from
a config, and `RegionMonitor` (Lightning) or `RegionMonitorCallback` (transformers.Trainer)
attached. This module is an application of the library, like `examples/`: it is the one place
besides the drivers that imports both trainers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_cosine_schedule_with_warmup,
)
from typing_extensions import override

from regionwatch.corpus import builtin_text, token_stream, train_tokenizer
from regionwatch.errors import ConfigError, check_int, check_keys
from regionwatch.hf import RegionMonitorCallback
from regionwatch.lightning import RegionMonitor
from regionwatch.loading import seeded_init
from regionwatch.measurement import ProbeConfig
from regionwatch.monitor import MAPS_PER_DECADE, WatchConfig
from regionwatch.probes import ProbeSet
from regionwatch.schedule import DEFAULT_PER_DECADE, Mark, Schedule
from regionwatch.sizing import check_model_memory
from regionwatch.store import DEFAULT_RUN_NAME

logger = logging.getLogger(__name__)

TRAINERS = ("lightning", "hf")
ARCHITECTURES = ("gpt2", "llama")
MODEL_DIR = "model"  # the final model and tokenizer, saved for `regionwatch replay` / `measure`
LLAMA_FFN_RATIO = 4  # intermediate width / width, as GPT-2's MLP
# Lightning's precision strings, and how transformers.Trainer says each: its own bf16 flag for
# mixed precision (fp32 weights, bf16 autocast); for "bf16-true" it has no flag, so the model
# itself is cast to bf16 before training, which is what Lightning's "bf16-true" does to the module.
PRECISIONS = ("32-true", "bf16-true", "bf16-mixed")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """The demo run: model shape, data, optimisation, and what regionwatch measures and when.

    The defaults are `configs/demo.yaml`: a 4-layer d=256 GPT-2 with a 2k BPE vocabulary,
    batches of 32 x 128 tokens, AdamW 1e-3 with warmup and cosine decay, about 7 minutes on
    2 CPU cores, in float32. `precision` is Lightning's `Trainer(precision=...)`; under
    transformers.Trainer "bf16-mixed" is `bf16=True` and "bf16-true" a model cast to bf16.
    """

    architecture: Literal["gpt2", "llama"] = "gpt2"
    layers: int = 4
    width: int = 256
    heads: int = 4
    vocab_size: int = 2048
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 300
    learning_rate: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    precision: Literal["32-true", "bf16-true", "bf16-mixed"] = "32-true"
    per_decade: int = DEFAULT_PER_DECADE  # snapshots per decade of training tokens
    maps_per_decade: int = MAPS_PER_DECADE
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"DemoConfig.architecture={self.architecture!r}: need one of {ARCHITECTURES}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"DemoConfig.precision={self.precision!r}: need one of {PRECISIONS} "
                "(Lightning's precision strings; fp16 is left out: it needs a GPU and loss scaling)"
            )
        for name in (
            "layers",
            "width",
            "heads",
            "vocab_size",
            "seq_len",
            "batch_size",
            "steps",
            "per_decade",
        ):
            check_int(f"DemoConfig.{name}", getattr(self, name), minimum=1)
        if self.width % self.heads:
            raise ConfigError(
                f"DemoConfig.width={self.width} must be a multiple of heads={self.heads}"
            )
        if isinstance(self.learning_rate, bool) or not (
            isinstance(self.learning_rate, float | int) and self.learning_rate > 0
        ):
            raise ConfigError(f"DemoConfig.learning_rate={self.learning_rate!r}: need a number > 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DemoConfig:
        """From a mapping such as a parsed YAML file; unknown keys are an error."""
        check_keys("demo config", data, (f.name for f in fields(cls)))
        values = dict(data)
        if "probe" in values:
            values["probe"] = ProbeConfig.from_dict(values["probe"])
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> DemoConfig:
        """From a YAML file like configs/demo.yaml."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read demo config {path}: {err}") from err
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"demo config {path}: expected a mapping of settings, got {type(data).__name__}"
            )
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as a YAML file holds it."""
        return {**asdict(self), "probe": self.probe.to_dict()}

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the weights train in: bf16 under "bf16-true", else float32."""
        return torch.bfloat16 if self.precision == "bf16-true" else torch.float32

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step (no padding: windows are full)."""
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class DemoResult:
    """Where a demo run went."""

    out: Path  # everything of this run
    run_dir: Path  # the regionwatch run (store + tensorboard/)
    model_dir: Path  # the final model and tokenizer (save_pretrained)
    seconds: float  # wall time of training (fit), probes included


def model_config(config: DemoConfig) -> PretrainedConfig:
    """The HF config of the demo model (GPT-2 keeps its default dropout of 0.1; Llama has none)."""
    if config.architecture == "gpt2":
        return GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.seq_len,
            n_embd=config.width,
            n_layer=config.layers,
            n_head=config.heads,
            bos_token_id=0,
            eos_token_id=0,
        )
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=LLAMA_FFN_RATIO * config.width,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.seq_len,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )


def new_model(config: DemoConfig) -> PreTrainedModel:
    """A freshly initialised demo model (the caller seeds)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(model_config(config))


def demo_tokenizer(config: DemoConfig) -> PreTrainedTokenizerFast:
    """The demo's BPE tokenizer: trained on the built-in corpus, `config.vocab_size` tokens."""
    return train_tokenizer([builtin_text()], vocab_size=config.vocab_size)


def training_data(config: DemoConfig, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """The built-in corpus as seq_len-token windows, a torch-format `datasets.Dataset`."""
    ids = token_stream(tokenizer).ids
    count = len(ids) // config.seq_len
    windows = ids[: count * config.seq_len].reshape(count, config.seq_len)
    data = datasets.Dataset.from_dict({"input_ids": windows.tolist()})
    data = data.map(
        lambda row: {"attention_mask": [1] * len(row["input_ids"]), "labels": row["input_ids"]}
    )
    return data.with_format("torch")


class DemoModule(L.LightningModule):
    """A causal LM (`self.model`) trained with AdamW, linear warmup and cosine decay."""

    def __init__(self, config: DemoConfig) -> None:
        super().__init__()
        self.config_ = config
        self.model = new_model(config)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Next-token loss of one batch."""
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        """AdamW with warmup and cosine decay, stepped every optimizer step."""
        c = self.config_
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=c.learning_rate, weight_decay=c.weight_decay
        )
        schedule = get_cosine_schedule_with_warmup(optimizer, c.warmup_steps, c.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def run_demo(
    config: DemoConfig,
    out: str | Path,
    *,
    trainer: Literal["lightning", "hf"] = "lightning",
    progress: bool = True,
) -> DemoResult:
    """Train the demo model with regionwatch attached; return where everything went.

    Args:
        config: the run.
        out: an empty or new directory for everything of the run.
        trainer: "lightning" (RegionMonitor) or "hf" (transformers.Trainer and its callback).
        progress: show progress bars.

    Raises:
        ConfigError: a bad trainer name, an output directory that is not empty, or a model
            too large for the memory available.
    """
    if trainer not in TRAINERS:
        raise ConfigError(f"trainer={trainer!r}: need one of {TRAINERS}")
    check_model_memory(model_config(config), dtype=config.param_dtype, where="the demo config")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty: pass another --out (each demo run needs its own)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tokenizer = demo_tokenizer(config)
    watch = WatchConfig(
        probe=config.probe,
        schedule=Schedule.log_tokens(per_decade=config.per_decade),
        maps_schedule=Schedule.log_tokens(per_decade=config.maps_per_decade),
    )
    probes = ProbeSet.build(tokenizer, seed=config.seed, progress=progress)
    driver = RegionMonitor if trainer == "lightning" else RegionMonitorCallback
    callback = driver(watch, probes=probes, run_dir=out / DEFAULT_RUN_NAME)
    data = training_data(config, tokenizer)
    callbacks: list[Any] = [callback]
    if progress:  # one bar for the whole run, in place of the trainer's per-epoch bar
        bar = RunProgress(config, callback.monitor)
        callbacks.append(bar.lightning() if trainer == "lightning" else bar.hf())
    try:
        model, seconds = train(config, out, data, callbacks, trainer=trainer, progress=False)
    finally:
        if progress:
            bar.close()
    model.save_pretrained(out / MODEL_DIR)
    tokenizer.save_pretrained(out / MODEL_DIR)
    return DemoResult(
        out=out, run_dir=out / DEFAULT_RUN_NAME, model_dir=out / MODEL_DIR, seconds=seconds
    )


class RunProgress:
    """One progress bar for the whole demo run: optimizer steps, tokens seen, snapshots, ETA.

    The trainers' own bars count per epoch (Lightning's reads "Epoch 3/-2" under max_steps);
    the demo's run is a number of steps, so this bar counts those, and shows the tokens and
    snapshots so far beside them.

    Args:
        config: the demo run (its steps and tokens per step).
        monitor: the run's monitor, whose newest mark says when a snapshot was taken.
    """

    def __init__(self, config: DemoConfig, monitor: Any) -> None:
        self._bar = tqdm(total=config.steps, desc="demo", unit="step", dynamic_ncols=True)
        self._tokens_per_step = config.tokens_per_step
        self._monitor = monitor
        self._marks: set[Mark] = set()

    def update(self, step: int) -> None:
        """Move the bar to optimizer step `step`."""
        if self._monitor.last is not None:
            self._marks.add(self._monitor.last)
        self._bar.set_postfix_str(
            f"{step * self._tokens_per_step:,} tokens, {len(self._marks)} snapshots", refresh=False
        )
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Finish the bar."""
        self._bar.close()

    def lightning(self) -> Callback:
        """The bar as a Lightning callback (after the monitor's, so that it sees its snapshot)."""
        progress = self

        class _Bar(Callback):
            @override
            def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
                progress.update(trainer.global_step)  # the baseline snapshot

            @override
            def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
                progress.update(trainer.global_step)

        return _Bar()

    def hf(self) -> TrainerCallback:
        """The bar as a transformers.Trainer callback."""
        progress = self

        class _Bar(TrainerCallback):
            @override
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                progress.update(state.global_step)  # the baseline snapshot

            @override
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                progress.update(state.global_step)

        return _Bar()


def train(
    config: DemoConfig,
    out: Path,
    data: datasets.Dataset,
    callbacks: list[Any],
    *,
    trainer: Literal["lightning", "hf"],
    progress: bool,
) -> tuple[PreTrainedModel, float]:
    """Train the demo model on `data` with the trainer's own `callbacks` (`run_demo`'s step).

    Public so that a run without regionwatch (the overhead benchmark's baseline) trains exactly
    as the demo does.

    Returns:
        The trained model and the wall time of training (fit) in seconds.
    """
    train_with = _train_lightning if trainer == "lightning" else _train_hf
    return train_with(config, out, data, callbacks, progress)


def _train_lightning(
    config: DemoConfig,
    out: Path,
    data: datasets.Dataset,
    callbacks: list[Any],
    progress: bool,
) -> tuple[PreTrainedModel, float]:
    L.seed_everything(config.seed, verbose=False)  # the demo owns its run: seeding it is its job
    module = DemoModule(config)
    loader = DataLoader(
        data,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        generator=_generator(config),
    )
    trainer = L.Trainer(
        accelerator="cpu" if not torch.cuda.is_available() else "auto",
        max_steps=config.steps,
        callbacks=callbacks,
        default_root_dir=str(out),
        logger=L.pytorch.loggers.TensorBoardLogger(str(out), name="lightning"),
        enable_progress_bar=progress,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
        precision=config.precision,
    )
    started = time.perf_counter()
    trainer.fit(module, loader)
    return module.model, time.perf_counter() - started


def _train_hf(
    config: DemoConfig,
    out: Path,
    data: datasets.Dataset,
    callbacks: list[Any],
    progress: bool,
) -> tuple[PreTrainedModel, float]:
    args = TrainingArguments(
        output_dir=str(out / "hf"),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type="cosine",
        logging_steps=10,
        save_strategy="no",
        report_to=["tensorboard"],
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=not progress,
        dataloader_drop_last=True,
        seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=config.precision == "bf16-mixed",
    )
    with seeded_init(config.seed):
        model = new_model(config).to(config.param_dtype)
    trainer = Trainer(model, args, train_dataset=data, callbacks=callbacks)
    for callback in callbacks:
        if isinstance(callback, RegionMonitorCallback):
            callback.attach(trainer)  # its scalars then also reach report_to
    started = time.perf_counter()
    trainer.train()
    return model, time.perf_counter() - started


def _generator(config: DemoConfig) -> torch.Generator:
    return torch.Generator().manual_seed(config.seed)
