"""`RegionMonitor`: the Lightning driver; it says WHEN and HOW MANY TOKENS, `Monitor` the rest."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from regionwatch.corpus import Source
from regionwatch.errors import ConfigError
from regionwatch.measure import ProbeConfig
from regionwatch.monitor import (
    DEFAULT_MAPS_SCHEDULE,
    DEFAULT_SCHEDULE,
    TOKENS_TAG,
    Monitor,
    Precision,
    headline,
)
from regionwatch.probes import ProbeSet
from regionwatch.schedule import Schedule
from regionwatch.snapshot import Snapshot
from regionwatch.tensorboard import TAG_ROOT

logger = logging.getLogger(__name__)

CountTokens = Callable[[Any], int]


class RegionMonitor(Callback):
    """Measures stable regions during `Trainer.fit` and logs their emergence over tokens seen.

    Snapshots go to a `SnapshotStore` in `run_dir` and to TensorBoard (`<run_dir>/tensorboard`,
    step axis = training tokens). Every logger in `trainer.loggers` (CSV, TensorBoard, W&B,
    MLflow, ...) also gets the headline scalars, named as the TensorBoard tags, with
    `regionwatch/tokens` in the same call, at the trainer's global step; loggers that take images
    also get the curve figures and region maps. W&B charts `regionwatch/*` over tokens.
    Everything but the probe itself is written on a background thread.

    Measured: the LightningModule itself if it is a causal LM, else its one `PreTrainedModel`
    attribute (or `model_attr`). Tokens seen are the non-padding
    tokens of every batch (its attention mask, else all its input ids), summed over ranks and
    micro-batches, counted before each batch so that a batch it cannot count fails before the
    first optimizer step. A measurement happens once at train start (the random-init baseline on
    a fresh run) and after optimizer steps the schedule picks, and at the end of training.

    Args:
        tokenizer: the model's tokenizer (builds the probe set); or pass `probes`.
        probes: a ready probe set.
        config: what each measurement computes (default `ProbeConfig()`).
        schedule: when to measure (default `Schedule.log_tokens(per_decade=8)`).
        maps_schedule: which snapshots also draw region maps (default: 2 per decade of
            tokens, and the first and last); None: every snapshot.
        run_dir: where the run is stored (default `<trainer.log_dir>/regionwatch`).
        source: text for the probe set (default: the built-in corpus).
        seed: seed of the probe set.
        precision: "fp32" (default) or "trainer" (the trainer's precision context).
        tensorboard: also log to TensorBoard.
        copy_to_loggers: also log to the trainer's own loggers (False: only regionwatch's run).
        model_attr: name of the attribute holding the causal LM, when ambiguous.
        count_tokens: `count_tokens(batch) -> int` overriding the token count of a batch.

    Raises:
        ConfigError: neither tokenizer nor probes, or a bad setting (at construction); a bad
            model, write layer, probe set or run dir (in `setup`, before training).

    Example:
        >>> trainer = L.Trainer(callbacks=[RegionMonitor(tokenizer=tok, run_dir="runs/x")])
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        probes: ProbeSet | None = None,
        config: ProbeConfig | None = None,
        schedule: Schedule = DEFAULT_SCHEDULE,
        maps_schedule: Schedule | None = DEFAULT_MAPS_SCHEDULE,
        run_dir: str | Path | None = None,
        source: Source = None,
        seed: int = 0,
        precision: Precision = "fp32",
        tensorboard: bool = True,
        copy_to_loggers: bool = True,
        model_attr: str | None = None,
        count_tokens: CountTokens | None = None,
    ) -> None:
        self.monitor = Monitor.from_options(
            tokenizer=tokenizer,
            probes=probes,
            config=config,
            schedule=schedule,
            maps_schedule=maps_schedule,
            run_dir=run_dir,
            source=source,
            seed=seed,
            precision=precision,
            tensorboard=tensorboard,
            copy_to_loggers=copy_to_loggers,
        )
        self._model_attr = model_attr
        self._count = count_tokens or count_batch_tokens
        self._model: nn.Module | None = None
        self.tokens = 0  # tokens seen at the last optimizer step, over all ranks
        self._pending = 0  # this rank's tokens since then
        self._step = 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._model = find_model(pl_module, self._model_attr)  # a bad model fails here
        copies = LoggerCopies(trainer.loggers)
        self.monitor.setup(
            self._model,
            log_dir=trainer.log_dir,
            rank=trainer.global_rank,
            world=trainer.world_size,
            trainer_precision=trainer.precision_plugin.forward_context,
            info={"driver": "lightning"},
            log_scalars=copies.scalars,
            log_images=copies.images,
        )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step
        self.monitor.start(self._model, step=self._step, tokens=self.tokens)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._pending += int(self._count(batch))

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self._step:
            return  # a gradient-accumulation micro-batch: no optimizer step yet
        self._step = trainer.global_step
        self.tokens += self._reduce(trainer, self._pending)
        self._pending = 0
        last = 0 < trainer.max_steps <= self._step  # known here: measure it with its maps now
        self.monitor.maybe_measure(self._model, step=self._step, tokens=self.tokens, final=last)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.monitor.maybe_measure(
            self._model, step=trainer.global_step, tokens=self.tokens, final=True
        )
        self.monitor.drain()  # the loggers get every copy before the trainer finalizes them

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.monitor.close()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, **self.monitor.state_dict()}  # JSON-able

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens = int(state_dict.get("tokens", 0))
        self.monitor.load_state_dict(state_dict)

    @staticmethod
    def _reduce(trainer: L.Trainer, count: int) -> int:
        """Sum a count over ranks (one scalar collective per optimizer step; none on one rank)."""
        if trainer.world_size == 1:
            return count
        total = trainer.strategy.reduce(
            torch.tensor(count, device=trainer.strategy.root_device), reduce_op="sum"
        )
        return int(total.item())


def _tensorboard_image(logger: Logger, name: str, pixels: np.ndarray, step: int) -> None:
    logger.experiment.add_image(name, pixels, step, dataformats="HWC")


def _wandb_image(logger: Logger, name: str, pixels: np.ndarray, step: int) -> None:
    logger.log_image(key=name, images=[pixels], step=step)


def _mlflow_image(logger: Logger, name: str, pixels: np.ndarray, step: int) -> None:
    logger.experiment.log_image(logger.run_id, pixels, key=name, step=step)


# How each logger that takes images takes one (RGB uint8, [height, width, 3]); others get none.
IMAGE_WRITERS = MappingProxyType(
    {TensorBoardLogger: _tensorboard_image, WandbLogger: _wandb_image, MLFlowLogger: _mlflow_image}
)


class LoggerCopies:
    """Copies each snapshot to the trainer's loggers: headline scalars, and images where taken.

    Scalars go through `Logger.log_metrics` at the snapshot's global step (the trainer's own
    axis: loggers refuse steps that go back), with `regionwatch/tokens` in the same call, on the
    training thread (the trainer writes to the same loggers from it). Images go on the monitor's
    background writer, only to loggers that take them (`IMAGE_WRITERS`, all thread-safe). W&B
    additionally charts `regionwatch/*` over tokens.

    Args:
        loggers: the trainer's loggers (`trainer.loggers`).
    """

    def __init__(self, loggers: Sequence[Logger]) -> None:
        self._loggers = list(loggers)
        self._axes_defined = False

    def scalars(self, snapshot: Snapshot) -> None:
        """Log one snapshot's headline scalars to every logger."""
        if not self._axes_defined:
            self._define_axes()
        values = headline(snapshot)
        for logger_ in self._loggers:
            logger_.log_metrics(values, step=snapshot.step)

    def images(self, snapshot: Snapshot, rendered: Mapping[str, np.ndarray]) -> None:
        """Log one snapshot's images to the loggers that take them."""
        for logger_ in self._loggers:
            write_image = IMAGE_WRITERS.get(type(logger_))
            if write_image is not None:
                for name, pixels in rendered.items():
                    write_image(logger_, name, pixels, snapshot.step)

    def _define_axes(self) -> None:
        # W&B draws a chart over its step metric; tokens, not steps, are regionwatch's axis.
        for logger_ in self._loggers:
            if isinstance(logger_, WandbLogger):
                logger_.experiment.define_metric(TOKENS_TAG)
                logger_.experiment.define_metric(f"{TAG_ROOT}/*", step_metric=TOKENS_TAG)
        self._axes_defined = True


def count_batch_tokens(batch: Any) -> int:
    """Non-padding tokens of a batch: its attention mask's sum, else the size of its input ids.

    Understands dicts (`attention_mask`, `input_ids`), a bare id tensor, and a tuple/list whose
    first item is the id tensor.

    Raises:
        ConfigError: a batch it cannot read, with the fix (pass `count_tokens=`).
    """
    if isinstance(batch, Mapping):
        if isinstance(batch.get("attention_mask"), Tensor):
            return int(batch["attention_mask"].sum())
        if isinstance(batch.get("input_ids"), Tensor):
            return batch["input_ids"].numel()
    if isinstance(batch, Tensor) and not batch.is_floating_point():
        return batch.numel()
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
        return batch[0].numel()
    raise ConfigError(
        f"RegionMonitor cannot count the tokens of a {type(batch).__name__} batch; pass "
        "count_tokens=lambda batch: <number of training tokens in it>"
    )


def find_model(pl_module: nn.Module, attr: str | None) -> nn.Module:
    """The causal LM inside a LightningModule: itself, its one PreTrainedModel, or `attr`.

    Raises:
        ConfigError: `attr` missing, or no or several PreTrainedModel attributes.
    """
    if attr is not None:
        model = getattr(pl_module, attr, None)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"model_attr={attr!r}: {type(pl_module).__name__} has no module attribute {attr!r}"
            )
        return model
    if isinstance(pl_module, PreTrainedModel):
        return pl_module
    found = [
        name for name, child in pl_module.named_children() if isinstance(child, PreTrainedModel)
    ]
    if len(found) != 1:
        what = "no PreTrainedModel attribute" if not found else f"several: {', '.join(found)}"
        raise ConfigError(
            f"RegionMonitor measures a causal LM, and {type(pl_module).__name__} has {what}; "
            'pass model_attr="<attribute name>"'
        )
    return getattr(pl_module, found[0])
