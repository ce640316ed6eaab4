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
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from regionwatch.access import check_materialized
from regionwatch.checkpoints import LEGACY_MONITOR_STATE, monitor_state_key
from regionwatch.corpus import Source
from regionwatch.counting import CountTokens, count_batch_tokens, token_count
from regionwatch.distributed import SUPPORTED, fsdp1_root
from regionwatch.errors import ConfigError, UnsupportedModelError
from regionwatch.monitor import Monitor, WatchConfig
from regionwatch.probes import ProbeSet
from regionwatch.sinks import TOKENS_TAG, Sink, headline
from regionwatch.snapshot import Snapshot
from regionwatch.tensorboard import STEP_ROOT, step_tag

logger = logging.getLogger(__name__)

ZERO_PARTITIONED_PARAMS = 3  # the ZeRO stage that shards the parameters themselves


class RegionMonitor(Callback):
    """Measures stable regions during `Trainer.fit` and logs their emergence over tokens seen.

    Snapshots go to a `SnapshotStore` in `run_dir` and to TensorBoard (`<run_dir>/tensorboard`,
    step axis = training tokens), with the loss `training_step` returns copied there onto tokens
    (`regionwatch/train/loss`, every `log_every_n_steps` optimizer steps). Every logger in
    `trainer.loggers` (CSV, TensorBoard, W&B, MLflow, ...) also gets the headline scalars as
    `regionwatch_step/<key>`, with `regionwatch_step/tokens` in the same call, at the trainer's
    global step; W&B, MLflow (and TensorBoardLogger when regionwatch's own TensorBoard run is
    off) also get the curve figures and region maps. W&B charts `regionwatch_step/*` over
    tokens. The setup line and one line per snapshot go through Lightning's `rank_zero_info`.
    Everything but the probe and the scalar copies is written on a background thread; the
    scalars go to each logger while the training thread waits, at most
    `WatchConfig.logger_timeout_s` (a logger that hangs longer is dropped for the run).

    Measured: the LightningModule itself if it is a causal LM, else its one `PreTrainedModel`
    attribute (or `model_attr`). Tokens seen are the non-padding
    tokens of every batch (its attention mask, else all its input ids), summed over ranks and
    micro-batches, counted before each batch so that a batch it cannot count fails before the
    first optimizer step. A measurement happens once at train start (the random-init baseline on
    a fresh run) and after optimizer steps the schedule picks, and at the end of training.

    Resuming with `trainer.fit(..., ckpt_path=...)` continues the run the checkpoint names (its
    state holds the run's id and directory) and cuts back its snapshots after the checkpoint.
    A fresh run (no checkpoint of that run) into a `run_dir` that already holds snapshots is
    refused at train start, before the first optimizer step: nothing of the earlier run is
    deleted or mixed with the new one. Pass a new `run_dir`, or resume from the run's checkpoint.
    The callback's `state_key` includes `run_dir`, so two monitors of one Trainer keep their
    states apart; checkpoints saved under the old key (the class name) are read too.

    Args:
        watch: what to measure and when: the probe, schedules, precision, TensorBoard,
            logger copies and probe-set seed (default `WatchConfig()`: `ProbeConfig()`, 8
            snapshots per decade of tokens, maps at 1 per decade and the first and last, fp32).
        tokenizer: the model's tokenizer (builds the probe set); or pass `probes`.
        probes: a ready probe set.
        run_dir: where the run is stored (default `<trainer.log_dir>/regionwatch`).
        source: text for the probe set (default: the built-in corpus).
        model_attr: name of the attribute holding the causal LM, when ambiguous.
        count_tokens: `count_tokens(batch) -> int` overriding the token count of a batch; it
            must return an integer >= 0 (checked at every batch, the first one before the first
            optimizer step).

    Raises:
        ConfigError: neither tokenizer nor probes, a non-callable `count_tokens`, or a bad
            setting (at construction); a bad model, write layer or probe set (in `setup`); a
            run dir that is not writable or holds another run, or a bad token count (at train
            start, before the first optimizer step).

    Example:
        >>> trainer = L.Trainer(callbacks=[RegionMonitor(tokenizer=tok, run_dir="runs/x")])
    """

    def __init__(
        self,
        watch: WatchConfig | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        probes: ProbeSet | None = None,
        source: Source = None,
        run_dir: str | Path | None = None,
        model_attr: str | None = None,
        count_tokens: CountTokens | None = None,
    ) -> None:
        self.monitor = Monitor(
            WatchConfig() if watch is None else watch,
            tokenizer=tokenizer,
            probes=probes,
            source=source,
            run_dir=run_dir,
        )
        if count_tokens is not None and not callable(count_tokens):
            raise ConfigError(
                f"count_tokens={count_tokens!r} is not callable; pass a function of the batch, "
                "e.g. count_tokens=lambda batch: int(batch['attention_mask'].sum()), or leave it "
                "out to count the batch's attention mask (else its input ids)"
            )
        self._state_key = monitor_state_key(None if run_dir is None else str(Path(run_dir)))
        self._model_attr = model_attr
        self._count = count_tokens or count_batch_tokens
        self._model: nn.Module | None = None
        self._refusal: UnsupportedModelError | None = None  # see `on_exception`
        self.tokens = 0  # tokens seen at the last optimizer step, over all ranks
        self._pending = 0  # this rank's tokens since then
        self._step = 0
        self._loss: Tensor | None = None  # this optimizer step's loss so far (micro-batches)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer.strategy)  # a model sharded later is checked at train start
        self._model = find_model(pl_module, self._model_attr)  # a bad model fails here
        try:
            check_materialized(self._model)
        except UnsupportedModelError as err:
            self._refusal = err
            raise
        self.monitor.setup(
            self._model,
            log_dir=trainer.log_dir,
            rank=trainer.global_rank,
            world=trainer.world_size,
            trainer_precision=trainer.precision_plugin.forward_context,
            info={"driver": "lightning"},
            # regionwatch's own TensorBoard run has the images on tokens: each image appears once.
            sinks=logger_sinks(
                trainer.loggers,
                images_skip=(TensorBoardLogger,) if self.monitor.watch.tensorboard else (),
            ),
            announce=rank_zero_info,  # printed by Lightning's own handler, as its other lines
        )

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Lightning's teardown after an exception moves the module to the CPU, which fails on
        # meta weights and would replace our refusal by "Cannot copy out of meta tensor".
        # Raised from here, the refusal reaches the user before that teardown runs.
        if exception is self._refusal:
            raise exception

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step
        root = fsdp1_root(trainer.strategy.model, self._model)  # FSDPStrategy's wrap
        self.monitor.start(self._model, step=self._step, tokens=self.tokens, root=root)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._pending += token_count(self._count(batch), what="count_tokens returned")

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = _loss(outputs)
        if loss is not None:  # per micro-batch, scaled by 1/accumulation: their sum is the mean
            self._loss = loss if self._loss is None else self._loss + loss
        if trainer.global_step == self._step:
            return  # a gradient-accumulation micro-batch: no optimizer step yet
        self._step = trainer.global_step
        self.tokens += self._reduce(trainer, self._pending)
        self._pending = 0
        if self._loss is not None and self._step % trainer.log_every_n_steps == 0:
            # At the trainer's own logging cadence: one host sync per logged step.
            self.monitor.log_training({"loss": float(self._loss)}, tokens=self.tokens)
        self._loss = None
        last = 0 < trainer.max_steps <= self._step  # known here: measure it with its maps now
        self.monitor.step(self._step, tokens=self.tokens, final=last)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.monitor.step(trainer.global_step, tokens=self.tokens, final=True)
        self.monitor.drain()  # the loggers get every copy before the trainer finalizes them

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.monitor.close()

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, **self.monitor.state_dict()}  # JSON-able, drained

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states and LEGACY_MONITOR_STATE in states:
            # Saved before the callback had its own state_key: Lightning only looks up the new key.
            self.load_state_dict(states[LEGACY_MONITOR_STATE])

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


def _loss(outputs: Any) -> Tensor | None:
    """The loss `training_step` returned (a tensor, or a mapping's "loss"), detached; else None."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, Tensor) and outputs.numel() == 1:
        return outputs.detach()
    return None


def check_strategy(strategy: Strategy) -> None:
    """Refuse, before the model is even configured, a strategy the probe cannot measure.

    Raises:
        UnsupportedModelError: DeepSpeed ZeRO-3, tensor parallelism (`ModelParallelStrategy` with
            tensor_parallel_size > 1), or a strategy other than single device, DDP, FSDP
            (`FSDPStrategy`, measured through its wrapper) and `ModelParallelStrategy`.
    """
    name = type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy):
        stage = strategy.config.get("zero_optimization", {}).get("stage", 0)
        if stage == ZERO_PARTITIONED_PARAMS:
            raise UnsupportedModelError(
                f"DeepSpeed ZeRO stage 3 partitions the weights; {SUPPORTED}"
            )
    elif isinstance(strategy, ModelParallelStrategy):
        tensor_parallel = strategy.device_mesh["tensor_parallel"].size()
        if tensor_parallel > 1:
            raise UnsupportedModelError(
                f"ModelParallelStrategy with tensor_parallel_size={tensor_parallel}: tensor "
                f"parallelism splits the residual stream; {SUPPORTED}"
            )
    elif not isinstance(strategy, SingleDeviceStrategy | DDPStrategy | FSDPStrategy):
        raise UnsupportedModelError(f"strategy {name} is not supported; {SUPPORTED}")


def _tensorboard_image(logger: Logger, name: str, pixels: np.ndarray, snapshot: Snapshot) -> None:
    logger.experiment.add_image(name, pixels, snapshot.step, dataformats="HWC")


def _wandb_image(logger: Logger, name: str, pixels: np.ndarray, snapshot: Snapshot) -> None:
    import wandb  # present: a WandbLogger exists

    # Not `log_image`, which gives the row the step alone: W&B charts `regionwatch_step/*` over
    # tokens (see `LoggerCopy`), so an image's row must hold them too.
    row = {name: [wandb.Image(pixels)], TOKENS_TAG: snapshot.tokens}
    logger.log_metrics(row, step=snapshot.step)


def _mlflow_image(logger: Logger, name: str, pixels: np.ndarray, snapshot: Snapshot) -> None:
    logger.experiment.log_image(logger.run_id, pixels, key=name, step=snapshot.step)


# How each logger that takes images takes one (RGB uint8, [height, width, 3]); others get none.
IMAGE_WRITERS = MappingProxyType(
    {TensorBoardLogger: _tensorboard_image, WandbLogger: _wandb_image, MLFlowLogger: _mlflow_image}
)


def _image_writer(logger: Logger) -> Callable[[Logger, str, np.ndarray, Snapshot], None] | None:
    # isinstance, not type(): a user's subclass of these loggers takes images the same way
    kinds = (w for kind, w in IMAGE_WRITERS.items() if isinstance(logger, kind))
    return next(kinds, None)


class LoggerCopy:
    """Copies each snapshot's headline scalars to one of the trainer's loggers.

    Through `Logger.log_metrics` at the snapshot's global step (the trainer's own axis: loggers
    refuse steps that go back), named `regionwatch_step/<key>` (`sinks.headline`) with
    `regionwatch_step/tokens` in the same call. Written while the training thread waits, for at
    most `WatchConfig.logger_timeout_s` (`sinks.Fanout`): the trainer writes to the same logger
    from that thread, and CSVLogger loses rows written from two threads at once. W&B
    additionally charts `regionwatch_step/*` over tokens.

    Args:
        logger: one of `trainer.loggers`.
        name: names it in warnings and failures (see `logger_sinks`).
    """

    placement = "bounded"

    def __init__(self, logger: Logger, name: str) -> None:
        self.name = name
        self._logger = logger
        self._axes_defined = False

    def write(self, snapshot: Snapshot, rendered: Mapping[str, np.ndarray]) -> None:
        """Log one snapshot's headline scalars (`rendered` is not read: no images here)."""
        if not self._axes_defined:
            self._define_axes()
        self._logger.log_metrics(headline(snapshot), step=snapshot.step)

    def close(self) -> None:
        """Nothing to release: the trainer finalizes its own loggers."""

    def _define_axes(self) -> None:
        # W&B draws a chart over its step metric; tokens, not steps, are regionwatch's axis.
        if isinstance(self._logger, WandbLogger):
            self._logger.experiment.define_metric(TOKENS_TAG)
            self._logger.experiment.define_metric(f"{STEP_ROOT}/*", step_metric=TOKENS_TAG)
        self._axes_defined = True


class LoggerImages:
    """Copies each snapshot's images to one of the trainer's loggers that takes them.

    Named `regionwatch_step/...` (`tensorboard.step_tag`), at the trainer's global step. On the
    monitor's background writer: the loggers in `IMAGE_WRITERS` take images from any
    thread. Named as its logger's `LoggerCopy`, so that dropping a hung logger drops both.

    Args:
        logger: one of `trainer.loggers`, of a kind in `IMAGE_WRITERS`.
        name: its `LoggerCopy`'s name.
        write_image: how that logger takes one image.
    """

    placement = "background"

    def __init__(
        self,
        logger: Logger,
        name: str,
        write_image: Callable[[Logger, str, np.ndarray, Snapshot], None],
    ) -> None:
        self.name = name
        self._logger = logger
        self._write_image = write_image

    def write(self, snapshot: Snapshot, rendered: Mapping[str, np.ndarray]) -> None:
        """Log every image of one snapshot at its global step."""
        for tag, pixels in rendered.items():
            self._write_image(self._logger, step_tag(tag), pixels, snapshot)

    def close(self) -> None:
        """Nothing to release: the trainer finalizes its own loggers."""


def logger_sinks(
    loggers: Sequence[Logger], *, images_skip: tuple[type[Logger], ...] = ()
) -> list[Sink]:
    """The sinks that copy every snapshot to the trainer's loggers: scalars, and images where taken.

    Args:
        loggers: the trainer's loggers (`trainer.loggers`).
        images_skip: kinds of logger that get no images (TensorBoardLogger while regionwatch's
            own TensorBoard run has them on tokens: each image once in a TensorBoard view).
    """
    sinks: list[Sink] = []
    for index, logger_ in enumerate(loggers):
        name = f"trainer logger {index} ({type(logger_).__name__})"
        sinks.append(LoggerCopy(logger_, name))
        write_image = _image_writer(logger_)
        if write_image is not None and not isinstance(logger_, images_skip):
            sinks.append(LoggerImages(logger_, name, write_image))
    return sinks


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
