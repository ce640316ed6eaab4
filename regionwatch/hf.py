"""`RegionMonitorCallback`: the `transformers.Trainer` driver; `Monitor` does the work.

Tokens seen come from the Trainer's own count (`state.num_input_tokens_seen`, summed over
processes), which it only keeps when asked: `include_num_input_tokens_seen="non_padding"` (or
"all"). Resume reads the run's store and the restored `trainer_state.json` (global step, tokens,
and the run's id and directory, which the callback records there under `STATE_KEY` in
`stateful_callbacks`), so it works whether or not the user sets
`restore_callback_states_from_checkpoint`.

The Trainer's loggers (`report_to`: TensorBoard, W&B, MLflow, ...) get the headline scalars, as
`regionwatch_step/<key>`, through the Trainer's own logging path, `Trainer.log`, right after each
snapshot (at the step it measured), on the training thread (`TrainerLog`). The other way round,
the Trainer's logged loss is copied onto regionwatch's token axis (`regionwatch/train/loss`). The
setup line and one line per snapshot go to the Trainer's own logger, shown at
`TrainingArguments(log_level="info")`. A callback is never handed its Trainer, so the callback
needs `attach(trainer)` for that; without it, only regionwatch's own store and TensorBoard run
are written. The integrations take no images (the Trainer drops non-scalar logs).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from typing_extensions import override

from regionwatch.access import check_materialized
from regionwatch.checkpoints import HF_MONITOR_STATE
from regionwatch.corpus import Source
from regionwatch.distributed import fsdp1_root
from regionwatch.errors import ConfigError
from regionwatch.monitor import Monitor, WatchConfig
from regionwatch.probes import ProbeSet
from regionwatch.sinks import headline
from regionwatch.snapshot import Snapshot

logger = logging.getLogger(__name__)
# The HF Trainer's own channel: a child of the "transformers" logger, whose level the Trainer sets
# from `args.log_level` and whose handler prints. The setup line and one line per snapshot go
# there, so `TrainingArguments(log_level="info")` shows them with nothing else to configure.
host_logger = logging.getLogger("transformers.regionwatch")

COUNTING = ("all", "non_padding", True)  # include_num_input_tokens_seen values that count
# Our entry in `TrainerState.stateful_callbacks`, saved in every checkpoint's trainer_state.json.
# Not a callback class name: `restore_callback_states_from_checkpoint` rebuilds callbacks from
# entries named after their class, and this callback cannot be rebuilt from JSON (it holds a
# tokenizer); the Trainer only warns that it ignores an entry it cannot match.
STATE_KEY = HF_MONITOR_STATE


class RegionMonitorCallback(TrainerCallback):
    """Measures stable regions during `transformers.Trainer.train`, logged over tokens seen.

    Snapshots go to a `SnapshotStore` in `run_dir` (default `<output_dir>/regionwatch`, stable
    across resumes) and to TensorBoard in `<run_dir>/tensorboard`. Measures at train begin (the
    random-init baseline on a fresh run), after optimizer steps the schedule picks, and at the end.
    After `attach(trainer)`, every `report_to` integration gets the headline scalars too.

    `trainer.train(resume_from_checkpoint=...)` continues the run the checkpoint names and cuts
    back its snapshots after the checkpoint. A fresh run (no checkpoint of that run) into a
    `run_dir` that already holds snapshots is refused at train begin, before the first optimizer
    step: nothing of the earlier run is deleted or mixed with the new one. Pass a new `run_dir`
    (or `output_dir`), or resume from the run's checkpoint.

    Args:
        watch: what to measure and when: the probe, schedules, precision, TensorBoard,
            logger copies and probe-set seed (default `WatchConfig()`: `ProbeConfig()`, 8
            snapshots per decade of tokens, maps at 1 per decade and the first and last, fp32).
        tokenizer: the model's tokenizer (builds the probe set); or pass `probes`.
        probes: a ready probe set.
        run_dir: where the run is stored.
        source: text for the probe set (default: the built-in corpus).

    Raises:
        ConfigError: at construction for bad settings; at `on_train_begin` (before the first
            optimizer step) for a bad model, token counting switched off, or a run dir that is
            not writable or holds another run.

    Example:
        >>> args = TrainingArguments("out", include_num_input_tokens_seen="non_padding")
        >>> trainer = Trainer(model, args)
        >>> RegionMonitorCallback(tokenizer=tok).attach(trainer)
    """

    def __init__(
        self,
        watch: WatchConfig | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        probes: ProbeSet | None = None,
        source: Source = None,
        run_dir: str | Path | None = None,
    ) -> None:
        self.monitor = Monitor(
            WatchConfig() if watch is None else watch,
            tokenizer=tokenizer,
            probes=probes,
            source=source,
            run_dir=run_dir,
        )
        self._trainer: Trainer | None = None

    def attach(self, trainer: Trainer) -> RegionMonitorCallback:
        """Add this callback to `trainer` (if not there yet) and log through it.

        The headline scalars then reach every `report_to` integration via `trainer.log`.

        Args:
            trainer: the Trainer that will run this callback.

        Returns:
            self, so that `RegionMonitorCallback(...).attach(trainer)` reads as one step.
        """
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer
        return self

    @override
    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        # Passed in `callbacks=`, the earliest hook: before `train()` places or wraps the model
        # (which fails on meta weights in its own words). A Trainer that places the model on its
        # device does so in its constructor, before any callback runs.
        if model is not None:
            check_materialized(model)

    @override
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if args.include_num_input_tokens_seen not in COUNTING:
            raise ConfigError(
                "RegionMonitorCallback logs over training tokens, and the Trainer counts them only "
                f'when asked: set TrainingArguments(include_num_input_tokens_seen="non_padding") '
                f'(or "all"); got {args.include_num_input_tokens_seen!r}'
            )
        self.monitor.setup(
            model,
            log_dir=args.output_dir,
            rank=args.process_index,
            world=args.world_size,
            trainer_precision=lambda: _autocast(args, model),
            info={"driver": "hf"},
            sinks=() if self._trainer is None else [TrainerLog(self._trainer)],
            announce=host_logger.info,
        )
        saved = state.stateful_callbacks.get(STATE_KEY)
        if isinstance(saved, dict):  # restored from the checkpoint's trainer_state.json
            self.monitor.load_state_dict(saved)
        integrations = [name for name in args.report_to or () if name != "none"]
        if self._trainer is None and integrations and self.monitor.watch.copy_to_loggers:
            logger.warning(
                "regionwatch: report_to=%s gets no regionwatch scalars, as a callback passed in "
                "callbacks=[...] never sees its Trainer; to log them through the Trainer, attach "
                "it instead: RegionMonitorCallback(...).attach(trainer)",
                integrations,
            )
        # HF hands callbacks the unwrapped model; an FSDP1 root is reached through the Trainer.
        root = None if self._trainer is None else fsdp1_root(self._trainer.model_wrapped, model)
        self.monitor.start(
            model, step=state.global_step, tokens=state.num_input_tokens_seen, root=root
        )
        # The run's identity only: a mark saved here would go stale.
        run_dir = None if self.monitor.run_dir is None else str(self.monitor.run_dir)
        state.stateful_callbacks[STATE_KEY] = {"run_id": self.monitor.run_id, "run_dir": run_dir}

    @override
    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        last = 0 < state.max_steps <= state.global_step  # known here: measure it with its maps now
        self.monitor.step(state.global_step, tokens=state.num_input_tokens_seen, final=last)
        if control.should_save:  # decided before us: snapshots up to a checkpoint are written
            self.monitor.drain()  # before it, as a resume from it never retakes them

    @override
    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and "loss" in logs:  # the Trainer's loss, averaged since its last log, on tokens
            self.monitor.log_training({"loss": logs["loss"]}, tokens=state.num_input_tokens_seen)

    @override
    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        self.monitor.step(state.global_step, tokens=state.num_input_tokens_seen, final=True)
        self.monitor.close()


class TrainerLog:
    """Sends each snapshot's headline scalars down the Trainer's own logging path.

    `Trainer.log` reaches every `report_to` integration, on the training thread, as the
    Trainer's own logging does.

    Args:
        trainer: the Trainer the callback is attached to.
    """

    name = "report_to integrations (Trainer.log)"
    # On the training thread itself, unbounded: the integrations keep state per thread (MLflow's
    # active run), so a write from a helper thread would open a second MLflow run.
    placement = "training"

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer

    def write(self, snapshot: Snapshot, rendered: Mapping[str, np.ndarray]) -> None:
        """Log one snapshot's headline scalars (the integrations take no images)."""
        self._trainer.log(headline(snapshot))

    def close(self) -> None:
        """Nothing to release: the Trainer finalizes its own integrations."""


def _autocast(args: TrainingArguments, model: Any) -> contextlib.AbstractContextManager[Any]:
    """The Trainer's mixed-precision context, rebuilt from its flags (callbacks get no Trainer)."""
    device = next(model.parameters()).device.type
    if args.bf16:
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    if args.fp16:
        return torch.autocast(device_type=device, dtype=torch.float16)
    return contextlib.nullcontext()
