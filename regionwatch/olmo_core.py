"""`RegionMonitorCallback` for OLMo-core: its `Trainer` says WHEN and HOW MANY TOKENS.

OLMo-core's trainer keeps both of regionwatch's axes itself: `trainer.global_step` and
`trainer.global_train_tokens_seen` (the tokens of every batch, summed over the data-parallel
ranks), so this driver counts nothing. Its state (the run's id and directory) rides in every
OLMo-core checkpoint through the callback state hooks (`Callback.state_dict`, saved in
`train/rank0.pt`), and a trainer that loads a checkpoint of the run continues it exactly.

The measured model is the train module's `model` (OLMo-core's `Transformer`), read through
`OLMO_CORE_DECODER`: blocks `blocks` (a ModuleDict "0".."N-1"), the readout `lm_head.norm`,
the head `lm_head.w_out`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from olmo_core.distributed.utils import get_rank, get_world_size
from olmo_core.train import Trainer
from olmo_core.train.callbacks import Callback
from torch import nn
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from regionwatch.corpus import Source
from regionwatch.decoder import Decoder
from regionwatch.errors import ConfigError
from regionwatch.monitor import Monitor, WatchConfig
from regionwatch.probes import ProbeSet
from regionwatch.stacks import OLMO_CORE_DECODER

logger = logging.getLogger(__name__)


class RegionMonitorCallback(Callback):
    """Measures stable regions during an OLMo-core `Trainer.fit`, logged over tokens seen.

    Snapshots go to a `SnapshotStore` in `run_dir` (default `<trainer.work_dir>/regionwatch`)
    and to TensorBoard in `<run_dir>/tensorboard`. Measures when training starts (the
    random-init baseline on a fresh run), after the optimizer steps the schedule picks, and at
    the end. Runs before OLMo-core's checkpointer (a higher `priority`), so that a checkpoint of
    a step holds the snapshot of that step; every snapshot is on disk before a checkpoint's
    state is taken.

    A trainer that loads a checkpoint of the run (from its `save_folder` or `load_path`)
    continues it and cuts back its snapshots after the checkpoint. A fresh run into a `run_dir`
    that already holds snapshots is refused when training starts, before the first optimizer
    step: nothing of the earlier run is deleted or mixed with the new one.

    Args:
        watch: what to measure and when (default `WatchConfig()`).
        tokenizer: the model's tokenizer (builds the probe set); or pass `probes`.
        probes: a ready probe set.
        source: text for the probe set (default: the built-in corpus).
        run_dir: where the run is stored.
        decoder: where the probe finds the blocks, final norm and head (default
            `OLMO_CORE_DECODER`, OLMo-core's `Transformer`).

    Raises:
        ConfigError: at construction for bad settings; when attached to a trainer for a train
            module without a `model` or a model the decoder does not fit; when training starts
            (before the first optimizer step) for a run dir that is not writable or holds
            another run.

    Example:
        >>> trainer_config.with_callback("regionwatch", RegionMonitorCallback(tokenizer=tok))
    """

    priority: ClassVar[int] = 2  # before the checkpointer (1): a checkpoint holds its snapshot

    def __init__(
        self,
        watch: WatchConfig | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        probes: ProbeSet | None = None,
        source: Source = None,
        run_dir: str | Path | None = None,
        decoder: Decoder = OLMO_CORE_DECODER,
    ) -> None:
        self.monitor = Monitor(
            WatchConfig() if watch is None else watch,
            tokenizer=tokenizer,
            probes=probes,
            source=source,
            run_dir=run_dir,
            decoder=decoder,
        )
        self._model: nn.Module | None = None

    @override
    def post_attach(self) -> None:
        trainer = self.trainer
        self._model = _train_model(trainer)  # a bad model or write layer fails here
        self.monitor.setup(
            self._model,
            log_dir=trainer.work_dir,  # always local; `save_folder` may be a URL
            rank=get_rank(),
            world=get_world_size(),
            trainer_precision=lambda: _autocast(trainer),
            info={"driver": "olmo_core"},
        )

    @override
    def pre_train(self) -> None:
        trainer = self.trainer  # a checkpoint, if any, is loaded by now
        self.monitor.start(
            self._model, step=trainer.global_step, tokens=trainer.global_train_tokens_seen
        )

    @override
    def post_step(self) -> None:
        trainer = self.trainer
        last = trainer.max_steps is not None and trainer.global_step >= trainer.max_steps
        self.monitor.maybe_measure(
            self._model,
            step=trainer.global_step,
            tokens=trainer.global_train_tokens_seen,
            final=last,
        )

    @override
    def post_train(self) -> None:
        trainer = self.trainer
        self.monitor.maybe_measure(
            self._model,
            step=trainer.global_step,
            tokens=trainer.global_train_tokens_seen,
            final=True,
        )
        self.monitor.drain()

    @override
    def close(self) -> None:
        self.monitor.close()  # also after an error: the store's writer lock is released

    @override
    def state_dict(self) -> dict[str, Any]:
        # A checkpoint is being saved: every snapshot up to it must be on disk first, since a
        # resume from it never retakes them.
        self.monitor.drain()
        return self.monitor.state_dict()  # JSON-able: the run's directory, id and newest mark

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict)


def _train_model(trainer: Trainer) -> nn.Module:
    """The model the trainer trains: its train module's `model` (TransformerTrainModule's)."""
    model = getattr(trainer.train_module, "model", None)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"RegionMonitorCallback measures the train module's `model`, and "
            f"{type(trainer.train_module).__name__} has none; use a TransformerTrainModule, or "
            "give your train module a `model` attribute holding the language model"
        )
    return model


def _autocast(trainer: Trainer) -> contextlib.AbstractContextManager[Any]:
    """The train module's autocast context (precision="trainer"); none when it uses none."""
    dtype = getattr(trainer.train_module, "autocast_precision", None)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=trainer.device.type, dtype=dtype)
