"""`RegionMonitor`: the Lightning driver; it says WHEN and HOW MANY TOKENS, `Monitor` the rest."""

from __future__ import annotations

import logging
import operator
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

from regionwatch.checkpoints import LEGACY_MONITOR_STATE, monitor_state_key
from regionwatch.corpus import Source
from regionwatch.distributed import SUPPORTED, fsdp1_root
from regionwatch.errors import ConfigError, UnsupportedModelError
from regionwatch.monitor import (
    TOKENS_TAG,
    Monitor,
    WatchConfig,
    headline,
)
from regionwatch.probes import ProbeSet
from regionwatch.snapshot import Snapshot
from regionwatch.tensorboard import STEP_ROOT, step_tag

logger = logging.getLogger(__name__)

CountTokens = Callable[[Any], int]
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
    Everything but the probe itself is written on a background thread.

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
            snapshots per decade of tokens, maps at 2 per decade and the first and last, fp32).
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
        # regionwatch's own TensorBoard run has the images on tokens: each image appears once.
        skip = (TensorBoardLogger,) if self.monitor.watch.tensorboard else ()
        copies = LoggerCopies(trainer.loggers, images_skip=skip)
        self.monitor.setup(
            self._model,
            log_dir=trainer.log_dir,
            rank=trainer.global_rank,
            world=trainer.world_size,
            trainer_precision=trainer.precision_plugin.forward_context,
            info={"driver": "lightning"},
            log_scalars=copies.scalars,
            log_images=copies.images,
            announce=rank_zero_info,  # printed by Lightning's own handler, as its other lines
        )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step
        root = fsdp1_root(trainer.strategy.model, self._model)  # FSDPStrategy's wrap
        self.monitor.start(self._model, step=self._step, tokens=self.tokens, root=root)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._pending += _token_count(self._count(batch))

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

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    @override
    def state_dict(self) -> dict[str, Any]:
        # A checkpoint is being saved: every snapshot up to it must be on disk first (store and
        # TensorBoard), since a resume from it never retakes them.
        self.monitor.drain()
        return {"tokens": self.tokens, **self.monitor.state_dict()}  # JSON-able

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


def _token_count(value: Any) -> int:
    """A token count as an int: an integer >= 0 (NumPy and 1-element integer tensors too)."""
    try:
        count = None if isinstance(value, bool) else operator.index(value)
    except TypeError:  # a float, a float tensor, None, ...
        count = None
    if isinstance(value, Tensor) and value.dtype == torch.bool:
        count = None
    if count is None or count < 0:
        raise ConfigError(
            f"count_tokens returned {value!r} for a batch; it must return the number of training "
            "tokens in the batch, an int >= 0, e.g. count_tokens=lambda batch: "
            "int(batch['attention_mask'].sum())"
        )
    return count


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

    # Not `log_image`, which gives the row the step alone: W&B charts `regionwatch/*` over
    # tokens (see `LoggerCopies`), so an image's row must hold them too.
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


class LoggerCopies:
    """Copies each snapshot to the trainer's loggers: headline scalars, and images where taken.

    Scalars go through `Logger.log_metrics` at the snapshot's global step (the trainer's own
    axis: loggers refuse steps that go back), with `regionwatch/tokens` in the same call, on the
    training thread (the trainer writes to the same loggers from it). Images go on the monitor's
    background writer, only to loggers that take them (`IMAGE_WRITERS`, all thread-safe). W&B
    additionally charts `regionwatch/*` over tokens.

    Args:
        loggers: the trainer's loggers (`trainer.loggers`).
        images_skip: kinds of logger that get no images (TensorBoardLogger while regionwatch's
            own TensorBoard run has them on tokens: each image once in a TensorBoard view).
    """

    def __init__(
        self, loggers: Sequence[Logger], *, images_skip: tuple[type[Logger], ...] = ()
    ) -> None:
        self._loggers = list(loggers)
        self._images_skip = images_skip
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
            write_image = _image_writer(logger_)
            if write_image is not None and not isinstance(logger_, self._images_skip):
                for name, pixels in rendered.items():
                    write_image(logger_, step_tag(name), pixels, snapshot)

    def _define_axes(self) -> None:
        # W&B draws a chart over its step metric; tokens, not steps, are regionwatch's axis.
        for logger_ in self._loggers:
            if isinstance(logger_, WandbLogger):
                logger_.experiment.define_metric(TOKENS_TAG)
                logger_.experiment.define_metric(f"{STEP_ROOT}/*", step_metric=TOKENS_TAG)
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
