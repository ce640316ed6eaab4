"""`Monitor`: schedule, measure, record: the one object every host drives, a plain loop included.

A plain training loop uses it directly (`with Monitor(watch, model, ...) as monitor:` and
`monitor.step(step, tokens=...)` after each optimizer step); the drivers (Lightning, the HF
Trainer, replay) host the same object and only say WHEN (a step and the tokens seen). The Monitor
decides whether a snapshot is due, measures, stamps, and writes it to the run's `SnapshotStore`
and its sinks (`sinks`: TensorBoard, the trainer's loggers). The run claim and resume proof live
in `claim`. Its guarantees:

- a probe never stops training: an exception inside a measurement is logged with its traceback
  and recorded as a failed snapshot; an out-of-memory error first retries with half the memory
  budget;
- no stalls: only the probe runs on the training thread. Storing the snapshot, TensorBoard events
  and figures, and the images sent to the trainer's loggers are jobs for a bounded
  `BackgroundWriter`, drained by `drain` (end of training) and `close` (teardown). The headline
  scalars reach the trainer's loggers while the training thread waits, right after the probe
  (their writes never overlap the trainer's own: Lightning's CSVLogger, for one, loses rows
  written from two threads at once); the wait is bounded by `WatchConfig.logger_timeout_s`, after
  which that logger is dropped for the run (`sinks.Fanout`). A failed job is logged, kept in
  `sink_failures` and never reaches training; a failed store write is recorded in failures.jsonl
  (which so lists exactly the snapshots that are not stored), a failed sink write is not;
- resume is exact: the store is the record. On a proven resume (the restored driver state names
  this run's id) the store is cut back to the restored step, and the schedule continues from the
  newest snapshot at or before it, so every scheduled snapshot exists exactly once, whatever the
  crash point;
- nothing is lost or mixed: a training run that starts without such proof into a run directory
  already holding another run's snapshots is refused before its first step (`claim`); only a
  proven resume ever deletes a snapshot;
- a diverged model (non-finite outputs) is a failed snapshot with that reason, never a snapshot;
- distributed: every rank measures its shard of the probe set (the probe is a collective: no
  rank may skip it), rank zero merges, stamps and writes; the schedule's inputs (global step,
  tokens summed over ranks) are the same on every rank, so every rank takes the same decisions.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from regionwatch import distributed, onset
from regionwatch.access import ResidualSite, resolve
from regionwatch.background import BackgroundWriter, Failure
from regionwatch.claim import check_writable, claim
from regionwatch.corpus import Source
from regionwatch.counting import token_count
from regionwatch.decoder import Decoder
from regionwatch.engine import DEFAULT_MAX_BATCH_TOKENS
from regionwatch.errors import ConfigError, check_int
from regionwatch.loading import MODEL_FILES_DIR, keep_model_files
from regionwatch.measurement import check_prompts, measure, merge_shards
from regionwatch.probes import ProbeSet
from regionwatch.results import Measurement, ProbeConfig
from regionwatch.schedule import Mark, Schedule
from regionwatch.sinks import Fanout, Sink
from regionwatch.snapshot import Snapshot, weights_fingerprint
from regionwatch.store import DEFAULT_RUN_NAME, FAILURES_FILE, SnapshotStore, check_free_space
from regionwatch.tensorboard import TB_SUBDIR, TRAIN_GROUP, TensorBoardSink, view_hint
from regionwatch.wrappers import unwrap

logger = logging.getLogger(__name__)

# Region maps cost 3 x grid^2 patched points per triple: at grid 25 over twice the rest of the
# probe set. One per decade of tokens (plus the first and the last snapshot) shows each stage the
# curves show: on the demo, maps within one decade looked alike (solid fraction 0.096-0.111 from
# 0 to 33K tokens, 0.164-0.166 at 1.0M-1.23M), and the 3% budget has no room for the second.
MAPS_PER_DECADE = 1
# Schedules are frozen, so these defaults are safe to share as argument defaults.
DEFAULT_SCHEDULE = Schedule.log_tokens()  # 8 per decade of tokens: regions form early
DEFAULT_MAPS_SCHEDULE = Schedule.log_tokens(per_decade=MAPS_PER_DECADE)
PRECISIONS = ("fp32", "trainer", "weights")
Precision = Literal["fp32", "trainer", "weights"]
ContextFactory = Callable[[], AbstractContextManager[Any]]
# A logger that has not taken a few numbers in a minute hangs (a dead connection, a full pipe):
# long enough for a slow network logger, short enough that a stalled run shows in its progress.
DEFAULT_LOGGER_TIMEOUT_S = 60.0
# How a driver shows its one line per snapshot: the host's own channel (Lightning's rank-zero
# info, the HF Trainer's logger), which the user sees without configuring anything.
Announce = Callable[[str], object]
# A snapshot of weights bitwise equal to the last measured ones reuses that measurement: its
# info names the step measured, and its probe time is 0.
SAME_WEIGHTS_KEY = "same_weights_as_step"


class _Measured(NamedTuple):
    """A measurement, the step it was taken at and the fingerprint of the weights it measured."""

    weights: str
    step: int
    measurement: Measurement


@dataclass(frozen=True, kw_only=True)
class WatchConfig:
    """What a monitor measures and when; saved with the run's resume state.

    Attributes:
        probe: what one measurement computes.
        schedule: when to measure (default: log-spaced, 8 per decade of tokens).
        maps_schedule: which of those snapshots also draw region maps (default: log-spaced, 2
            per decade, and always the first and the last); None: every snapshot.
        precision: "fp32" measures in float32 with autocast off (a model trained in half
            precision is upcast module by module in place, never copied); "weights" measures
            in the weights' own dtype with autocast off; "trainer" measures in the weights' own
            dtype under the trainer's
            own precision context. Recorded in every snapshot.
        tensorboard: also log every snapshot to `<run_dir>/tensorboard`.
        copy_to_loggers: also send the headline scalars (and, where a logger takes them, the
            images) to the trainer's own loggers (Lightning's `trainer.loggers`, the HF
            Trainer's `report_to` integrations). regionwatch's own TensorBoard run stays.
        seed: seed of the probe set built from a tokenizer.
        logger_timeout_s: the longest the training thread waits for one copy to one of the
            trainer's loggers; a logger that takes longer is dropped for the rest of the run
            (named in a warning), and training goes on.
    """

    probe: ProbeConfig = field(default_factory=ProbeConfig)
    schedule: Schedule = DEFAULT_SCHEDULE
    maps_schedule: Schedule | None = DEFAULT_MAPS_SCHEDULE
    precision: Precision = "fp32"
    tensorboard: bool = True
    copy_to_loggers: bool = True
    seed: int = 0
    logger_timeout_s: float = DEFAULT_LOGGER_TIMEOUT_S

    def __post_init__(self) -> None:
        if not isinstance(self.probe, ProbeConfig):
            raise ConfigError(f"WatchConfig.probe={self.probe!r}: need a regionwatch.ProbeConfig")
        if not isinstance(self.schedule, Schedule):
            raise ConfigError(
                f"WatchConfig.schedule={self.schedule!r}: need a regionwatch.Schedule, "
                "e.g. Schedule.every_steps(50) or Schedule.log_tokens(per_decade=8)"
            )
        if self.maps_schedule is not None and not isinstance(self.maps_schedule, Schedule):
            raise ConfigError(
                f"WatchConfig.maps_schedule={self.maps_schedule!r}: need a Schedule or None"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: need one of {PRECISIONS}")
        for name in ("tensorboard", "copy_to_loggers"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"WatchConfig.{name}={getattr(self, name)!r}: need True or False")
        check_int("WatchConfig.seed", self.seed)
        timeout = self.logger_timeout_s
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout < math.inf
        ):
            raise ConfigError(
                f"WatchConfig.logger_timeout_s={timeout!r}: need seconds > 0, e.g. 60.0"
            )


def _check_arguments(tokenizer: Any, probes: Any, run_dir: Any) -> None:
    """Refuse a tokenizer, probe set or run dir of the wrong kind, naming the fix (all drivers)."""
    if tokenizer is not None and not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ConfigError(
            f"tokenizer={tokenizer!r}: need the tokenizer object, not "
            f"{type(tokenizer).__name__}; load it first, e.g. "
            f"tokenizer=AutoTokenizer.from_pretrained({str(tokenizer)!r})"
        )
    if probes is not None and not isinstance(probes, ProbeSet):
        raise ConfigError(
            f"probes={probes!r}: need a ProbeSet, not {type(probes).__name__}; for a saved one "
            f"pass probes=ProbeSet.load({str(probes)!r})"
        )
    if run_dir is not None and not isinstance(run_dir, str | PathLike):
        raise ConfigError(
            f"run_dir={run_dir!r}: need a path (str or pathlib.Path) or None, not "
            f"{type(run_dir).__name__}"
        )


class Monitor:
    """Schedule, measure and record stable-region snapshots of one training run.

    In a plain training loop, give it the model and use it as a context manager: entering sets
    it up (every refusal comes here, before the first step) and opens the run, taking the
    step-0 baseline of a new run; `step` after each optimizer step measures when the schedule
    says so; leaving takes the final snapshot (with region maps) and closes the run. Under DDP
    or FSDP every rank runs the same loop and calls `step` (rank zero writes). For an exact
    resume, save `state_dict()` in the training checkpoint and give it to `load_state_dict`
    before entering. Drivers host the same object through `setup`, `start` and `step`.

    Args:
        watch: what to measure and when.
        model: the model being trained, for a plain loop (wrapped or not: DDP, FSDP,
            `torch.compile`, Lightning Fabric); hosts that get it later pass it to `setup`.
        tokenizer: the model's tokenizer, to build the probe set (or to check a given one).
        probes: a ready probe set (instead of, or checked against, the tokenizer).
        source: text to draw the probe set from (see `regionwatch.corpus.documents`); None for
            the built-in corpus.
        run_dir: the run directory; None: `<log dir>/regionwatch` (given at `setup`).
        decoder: where a model that is not a Hugging Face one keeps its blocks, final norm and
            head (`Decoder`); None for Hugging Face models.

    Raises:
        ConfigError: neither a tokenizer nor a probe set, or an argument of the wrong kind (a
            tokenizer where the watch config goes, a tokenizer's name instead of the tokenizer,
            a probe folder instead of the set, a model wrapper regionwatch cannot unwrap, a
            decoder that is not a `Decoder`).

    Example:
        >>> with Monitor(WatchConfig(schedule=Schedule.every_steps(50)), model, tokenizer=tok,
        ...              run_dir="runs/x") as monitor:  # a new run: the step-0 baseline here
        ...     for step, batch in enumerate(loader, start=1):
        ...         ...  # forward, backward, optimizer.step()
        ...         monitor.step(step, tokens=tokens_seen)
    """

    def __init__(
        self,
        watch: WatchConfig,
        model: nn.Module | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        probes: ProbeSet | None = None,
        source: Source = None,
        run_dir: str | Path | None = None,
        decoder: Decoder | None = None,
    ) -> None:
        if not isinstance(watch, WatchConfig):
            raise ConfigError(
                f"watch: need a regionwatch.WatchConfig, not {type(watch).__name__}, e.g. "
                "WatchConfig(schedule=Schedule.every_steps(50)); the tokenizer and probe set are "
                "keywords (tokenizer=tok)"
            )
        if tokenizer is None and probes is None:
            raise ConfigError(
                "regionwatch needs the model's tokenizer (tokenizer=...) to build its probe set, "
                "or a ready probe set (probes=ProbeSet.build(tokenizer) or ProbeSet.load(dir))"
            )
        _check_arguments(tokenizer, probes, run_dir)
        if decoder is not None and not isinstance(decoder, Decoder):
            raise ConfigError(
                f"decoder={decoder!r}: need a regionwatch.Decoder naming the model's modules, "
                'e.g. Decoder(blocks="layers", final_norm="norm", head="lm_head")'
            )
        self.watch = watch
        self._decoder = decoder
        # The causal LM to measure (wrappers peeled) and an FSDP1 wrapper's root, if any.
        self._model, self._root = (None, None) if model is None else unwrap(model)
        self._tokenizer, self._probes, self._source = tokenizer, probes, source
        self.run_dir: Path | None = None if run_dir is None else Path(run_dir)
        self._explicit_run_dir = run_dir is not None
        self._rank, self._world = 0, 1
        self._context: ContextFactory = contextlib.nullcontext
        self._store: SnapshotStore | None = None
        self._onset: onset.OnsetTracker | None = None  # the run's onset, rank zero
        self._last: Mark | None = None
        self._last_maps: Mark | None = None
        # The newest measurement with maps (True) and without (False), each with its weights.
        self._measured: dict[bool, _Measured] = {}
        self._site: ResidualSite | None = None  # the model as resolved and checked by `setup`
        self._info: dict[str, Any] = {}
        self._log_dir: Path | None = None
        self._restored: dict[str, Any] | None = None  # the driver's restored `state_dict()`
        self._run_id: str | None = None  # the store's, known on every rank once opened
        self._writer = BackgroundWriter("regionwatch-writer")
        self._host_sinks: list[Sink] = []  # the driver's, from `setup`
        self._fanout: Fanout | None = None  # every sink, from `start` (rank zero)
        self._tensorboard: TensorBoardSink | None = None  # in the fan-out; the loss copy too
        self._position: Mark | None = None  # the newest (step, tokens) seen, from `start`
        self._announce: Announce = logger.info
        self.failures = 0
        self._unstored: set[int] = set()  # scheduled steps with no stored snapshot (so far)

    def __enter__(self) -> Monitor:
        """Set up and open the run (a plain loop): refusals here, then the step-0 baseline.

        Resumes at the step and tokens of a state given to `load_state_dict` before.

        Raises:
            ConfigError, UnsupportedModelError, StoreError: as `setup` and `start` do.
        """
        if self._model is None:
            raise ConfigError(
                "`with Monitor(...)` needs the model: Monitor(watch, model, tokenizer=..., "
                "run_dir=...)"
            )
        rank, world = distributed.rank_and_world()
        self.setup(self._model, log_dir=None, rank=rank, world=world, info={"driver": "loop"})
        restored = self._restored or {}
        self.start(
            self._model,
            step=int(restored.get("step", 0)),
            tokens=int(restored.get("tokens", 0)),
            root=self._root,
        )
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Take the final snapshot (with region maps) if training ended normally; then close."""
        try:
            if error is None and self._position is not None:
                self.step(self._position.step, tokens=self._position.tokens, final=True)
        finally:
            self.close()

    def step(self, step: int, *, tokens: int, final: bool = False) -> Snapshot | None:
        """Measure if a snapshot is due after optimizer step `step`; every rank must call it.

        Costs a comparison when nothing is due. Call it after each optimizer step with the
        global step and the training tokens seen so far (summed over ranks and micro-batches,
        the same on every rank).

        Args:
            step: the global optimizer step just taken (>= the previous call's).
            tokens: training tokens seen, over all ranks (>= the previous call's).
            final: the last step of training: measure it (with region maps) even if the
                schedule does not pick it.

        Returns:
            The snapshot on rank zero when one was taken, else None.

        Raises:
            ConfigError: the run is not open (`with monitor:` or `start` first), or a step or
                token count that is not an int >= 0 or goes back; each with the fix.
        """
        if self._position is None:
            raise ConfigError(
                "Monitor.step before the run is open: use `with Monitor(watch, model, ...) as "
                "monitor:` around the training loop (a driver calls start first)"
            )
        step = check_int("Monitor.step: step", step, hint="the global step", integral=True)
        tokens = token_count(tokens, what="Monitor.step got tokens")
        previous = self._position
        if step < previous.step or tokens < previous.tokens:
            went = "step" if step < previous.step else "tokens"
            raise ConfigError(
                f"Monitor.step(step={step}, tokens={tokens}) after step={previous.step}, "
                f"tokens={previous.tokens}: the {went} went back. Pass the global optimizer "
                "step and the tokens seen so far, both counted from the start of training; on "
                "a resume, give the checkpoint's monitor.state_dict() to monitor.load_state_dict "
                "before `with monitor:`"
            )
        self._position = Mark(step, tokens)
        return self.maybe_measure(self._model, step=step, tokens=tokens, final=final)

    @property
    def probes(self) -> ProbeSet:
        """The run's probe set (built or loaded at `setup`)."""
        if self._probes is None:
            raise ConfigError("the monitor is not set up yet: call setup(model, ...) first")
        return self._probes

    @property
    def store(self) -> SnapshotStore | None:
        """The run's store on the writing rank (None elsewhere, and before `start`)."""
        return self._store

    @property
    def sink_failures(self) -> list[Failure]:
        """Background writes that failed (store, TensorBoard, logger copies), oldest first."""
        return list(self._writer.failures)

    @property
    def writer(self) -> BackgroundWriter:
        """The background writer (its `busy_seconds` and `blocked_seconds` for benchmarks)."""
        return self._writer

    @property
    def last(self) -> Mark | None:
        """(step, tokens) of the newest scheduled snapshot, taken or failed."""
        return self._last

    @property
    def run_id(self) -> str | None:
        """The run's id, known on every rank once the run is open (the proof of a resume)."""
        return self._run_id

    def setup(
        self,
        model: nn.Module,
        *,
        log_dir: str | Path | None,
        rank: int = 0,
        world: int = 1,
        trainer_precision: ContextFactory | None = None,
        info: Mapping[str, Any] | None = None,
        sinks: Sequence[Sink] = (),
        announce: Announce | None = None,
    ) -> None:
        """Check everything that can be checked before training: raises here, never mid-run.

        Resolves the model (architecture, write layer), builds or checks the probe set and that
        it fits the model's context. Rank zero builds the probe set and the others receive it, so
        every rank measures the same prompts. The run directory is resolved and checked by
        `start`, once a resuming driver has restored its state (which names the run directory):
        checking it here would create a stray directory for every resume.

        Args:
            model: the causal LM to measure, or a wrapper of it (see `wrappers.unwrap`); the
                same one every later call measures.
            log_dir: the trainer's log directory (the default run dir's parent).
            rank: this process's global rank.
            world: number of processes.
            trainer_precision: the trainer's precision context (for precision="trainer").
            info: facts recorded in every snapshot (e.g. {"driver": "lightning"}).
            sinks: the driver's copies to the trainer's loggers (rank zero writes them); left
                out when `copy_to_loggers` is off. regionwatch's TensorBoard run is added at
                `start`.
            announce: shows the run's setup line and one line per snapshot through the host's
                own channel; None: this module's logger at INFO.

        Raises:
            ConfigError, UnsupportedModelError: with a message saying how to fix it.
        """
        self._rank, self._world = rank, world
        model, root = unwrap(model)
        self._model, self._root = model, root or self._root
        site = resolve(
            model,
            write_layer=self.watch.probe.write_layer,
            block_path=self.watch.probe.block_path,
            decoder=self._decoder,
        )
        if self.run_dir is None and log_dir is None:
            raise ConfigError("no run_dir given and no trainer log directory: pass run_dir=...")
        self._log_dir = None if log_dir is None else Path(log_dir)
        if self._probes is None:
            built = self._build_probes() if rank == 0 else None
            self._probes = distributed.broadcast_object(built, world)
        elif self._tokenizer is not None:
            self._probes.check_tokenizer(self._tokenizer)
        _check_fits(site, self._probes)
        self._site = site
        if self.watch.precision == "trainer":
            if trainer_precision is None:
                raise ConfigError(
                    'precision="trainer": this driver has no trainer precision context'
                )
            self._context = trainer_precision
        self._info = {"precision": self.watch.precision, "world_size": world, **(info or {})}
        self._host_sinks = list(sinks) if self.watch.copy_to_loggers else []
        self._announce = announce or logger.info

    def start(
        self, model: nn.Module, *, step: int, tokens: int, root: nn.Module | None = None
    ) -> Snapshot | None:
        """Open the run at the (restored) step and tokens, and take the baseline if it is due.

        On a fresh run this measures step 0 (the random-init baseline). On a proven resume (the
        state given to `load_state_dict` names the run's id) it cuts the store back to `step`
        (snapshots after the restored checkpoint are of weights that no longer exist), continues
        the schedule from the newest snapshot left, and retakes the snapshot of this very step
        if a crash lost it. Every rank must call it, before the first optimizer step. A model
        sharded after `setup` (Lightning's `configure_model`) is checked here too.

        A run directory that already holds snapshots of a run this one did not resume is
        refused (`claim.claim` says when a start needs no proof).

        How the model is spread over the ranks is checked here, once the driver has wrapped or
        sharded it (Lightning's `configure_model` and strategy run after `setup`).

        Args:
            model: the causal LM given to `setup` (or a wrapper of it).
            step: the global step the run starts or resumes at.
            tokens: training tokens seen by then.
            root: the FSDP1 module wrapping `model` (see `measure`), for every measurement.

        Raises:
            ConfigError: a model other than the one given to `setup`.
            UnsupportedModelError: a layout that cannot be measured (`distributed.layout`).
            ConfigError: the run directory is not writable, or holds another run's snapshots
                (the message says how to resume that run or start a new one).
            StoreError: the run directory holds a run measured differently, or a live writer.
        """
        model = self._resolved(model).model  # before the first step: a changed model raises
        self._root = root or self._root
        self._info["layout"] = distributed.layout(model, self._root)  # how it was measured
        self._open(tokens=tokens, starting=(step, model))
        if self._store is not None:  # the writing rank: keep what replay needs beside the probes
            try:
                keep_model_files(self.run_dir / MODEL_FILES_DIR, model, self._tokenizer)
            except OSError as err:  # replay then needs --config / --tokenizer; training goes on
                logger.warning("regionwatch: could not keep the model's config for replay: %s", err)
        self._position = Mark(step, tokens)
        return self.maybe_measure(model, step=step, tokens=tokens)

    def open(self, *, run_info: Mapping[str, Any] | None = None) -> None:
        """Create or reopen the run's store and sinks (rank zero) and share the newest mark.

        For adding points to a run (replay): nothing is cut back. Training runs call `start`.
        `run_info` joins the run's info when the run is created (replay: `live_run`).
        """
        self._open(tokens=None, starting=None, run_info=run_info)

    def _open(
        self,
        *,
        tokens: int | None,
        starting: tuple[int, nn.Module] | None,
        run_info: Mapping[str, Any] | None = None,
    ) -> None:
        last = last_maps = refusal = run_id = None
        if self.run_dir is None:  # `setup` made sure there is a log dir
            self.run_dir = self._log_dir / DEFAULT_RUN_NAME
        self._writer.drain()  # the store is the writer thread's while jobs are queued
        if self._rank == 0:
            check_writable(self.run_dir)
            check_free_space(self.run_dir, probes=self.probes, config=self.watch.probe)
            self._store = SnapshotStore.create(
                self.run_dir,
                probes=self.probes,
                config=self.watch.probe,
                info={"schedule": self.watch.schedule.to_dict(), **(run_info or {})},
            )
            if starting is not None:
                step, model = starting
                refusal = claim(self._store, self._restored, step=step, model=model)
            if refusal is None:
                run_id = self._store.run_id
                self._onset = onset.tracker(self._store)  # read once; then kept per snapshot
                newest = self._store.latest()
                last = None if newest is None else Mark(*newest)
                mapped = [r for r in self._store.records() if "maps" in r.get("parts", ())]
                last_maps = Mark(mapped[-1]["step"], mapped[-1]["tokens"]) if mapped else None
                sinks = list(self._host_sinks)
                if self.watch.tensorboard:
                    purge = None if newest is None else tokens
                    self._tensorboard = TensorBoardSink(
                        self.run_dir / TB_SUBDIR,
                        purge_after_tokens=purge,
                        run_scalars=self._run_scalars,
                    )
                    sinks.append(self._tensorboard)
                timeout = self.watch.logger_timeout_s
                self._fanout = Fanout(self._writer, sinks, timeout_s=timeout)
                view = view_hint(self.run_dir, snapshots=0) if self.watch.tensorboard else ""
                self._announce(
                    f"regionwatch: storing the run in {self.run_dir}"
                    + (f"; view it with: {view}" if view else "")
                )
            else:
                self._store.close()  # refused: the store stays exactly as it was
                self._store = None
        # Rank 0 decides; every rank raises the same refusal, so that no rank waits on the others.
        shared = distributed.broadcast_object((last, last_maps, refusal, run_id), self._world)
        self._last, self._last_maps, refusal, self._run_id = shared
        if refusal is not None:
            raise ConfigError(refusal)

    def maybe_measure(
        self, model: nn.Module, *, step: int, tokens: int, final: bool = False
    ) -> Snapshot | None:
        """Measure if a snapshot is due at (step, tokens); every rank must call it.

        With `final`, the last snapshot always carries region maps: if this step was already
        measured without them (a hook before the last one measured it), it is measured again
        with them, and the stored snapshot of the step is replaced.
        """
        if final and self._last == Mark(step, tokens) and self._last_maps != self._last:
            self._last_maps = self._last
            return self.measure_now(model, step=step, tokens=tokens, maps=True)
        if not self.watch.schedule.due(step, tokens, self._last, final=final):
            return None
        self._last = Mark(step, tokens)  # also on failure: a broken probe must not retry every step
        maps = self.watch.maps_schedule is None or self.watch.maps_schedule.due(
            step, tokens, self._last_maps, final=final
        )
        if maps:
            self._last_maps = self._last
        return self.measure_now(model, step=step, tokens=tokens, maps=maps)

    def measure_now(
        self,
        model: nn.Module,
        *,
        step: int,
        tokens: int,
        maps: bool = True,
        info: Mapping[str, Any] | None = None,
    ) -> Snapshot | None:
        """Measure now and record the snapshot (rank zero); None if the measurement failed.

        Every rank must call it (it is a collective). Failures are logged with their traceback and
        recorded in the store; they never propagate.

        Args:
            model: the causal LM.
            step: global step of the weights.
            tokens: training tokens seen.
            maps: also draw the region maps (when the probe config includes them).
            info: extra facts recorded in the snapshot.
        """
        # A run whose only part is the maps draws them at every snapshot: skipping them would
        # leave a snapshot without any numbers.
        maps = maps or self.watch.probe.parts == ("maps",)
        weights, reused = self._reusable(model, maps=maps)
        if reused is not None:
            shards: list[Measurement | str] = [replace(reused.measurement, timing={"total": 0.0})]
        else:
            shard = self._guarded_measure(model, step, maps=maps)
            shards = distributed.gather_objects(shard, self._rank, self._world)
        if self._rank != 0:
            return None
        failed = [(rank, s) for rank, s in enumerate(shards) if isinstance(s, str)]
        if failed:
            rank, why = failed[0]
            self._record_failure(step, tokens, why if self._world == 1 else f"rank {rank}: {why}")
            return None
        same = {} if reused is None else {SAME_WEIGHTS_KEY: reused.step}
        try:
            merged = shards[0] if self._world == 1 else merge_shards(shards)
            snapshot = Snapshot.stamp(
                merged,
                run_id=self._store.run_id,
                step=step,
                tokens=tokens,
                probes=self.probes,
                model=self._site.model,
                info={**self._info, **(info or {}), **same},
                weights=weights,
            )
        except Exception as err:  # guarantee: a failed snapshot never stops training
            logger.exception("stamping the snapshot at step %d failed; training continues", step)
            self._record_failure(step, tokens, repr(err))
            return None
        if weights is not None and reused is None:
            self._measured[merged.maps is not None] = _Measured(weights, step, merged)
        # The store first: a hanging logger copy then holds back no stored snapshot.
        self._writer.submit(f"store, step {step}", lambda: self._store_snapshot(snapshot))
        self._fanout.write(snapshot)
        what = (
            f"{'region maps drawn' if merged.maps is not None else 'no maps'} "
            f"({merged.timing.get('total', math.nan):.1f} s)"
            if reused is None
            else f"weights unchanged since step {reused.step}: its measurement reused (0 s)"
        )
        self._announce(
            f"regionwatch: step {step}, {tokens:,} tokens: max slope median "
            f"{snapshot.summary.get('max_slope/median', math.nan):.3f}, {what}"
        )
        return snapshot

    def _reusable(self, model: nn.Module, *, maps: bool) -> tuple[str | None, _Measured | None]:
        """This process's weights fingerprint, and the last measurement if it is of these weights.

        A step that left the weights bitwise as they were (the first step of a warmup from lr 0,
        a frozen model) would measure the same numbers again; its snapshot reuses them, with a
        probe time of 0. Single-process runs only: a sharded model's fingerprint is one rank's
        shard, and the ranks would have to agree. Reused only with the same parts (maps or not),
        so that a snapshot's parts follow the maps schedule either way.
        """
        if self._world != 1:
            return None, None
        try:
            site = self._resolved(model)
        except ConfigError:
            return None, None  # a wrong model is `_guarded_measure`'s to report
        try:
            weights = weights_fingerprint(site.model)
        except Exception:  # guarantee: a failed snapshot never stops training
            logger.exception("fingerprinting the weights failed; measuring them anyway")
            return None, None
        last = self._measured.get(maps)
        return weights, (last if last is not None and last.weights == weights else None)

    def log_training(self, values: Mapping[str, float], *, tokens: int) -> None:
        """Copy the trainer's own scalars (its loss) onto the token axis: `regionwatch/train/<key>`.

        So that the loss and the max slope can be read on one axis in regionwatch's TensorBoard
        run. Written on the background writer, by the writing rank only.

        Args:
            values: scalars by the trainer's name (e.g. {"loss": 2.31}).
            tokens: training tokens seen when they were logged.
        """
        sink = self._tensorboard
        if sink is None:
            return
        named = {f"{TRAIN_GROUP}/{key}": float(value) for key, value in values.items()}
        self._writer.submit(
            f"tensorboard, trainer scalars at {tokens:,} tokens",
            lambda: sink.write_scalars(named, tokens=tokens),
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-able resume state: run directory and id, newest scheduled mark, step and tokens.

        The step and tokens are those of the newest `step` call: where a plain loop resumes.
        Waits until every snapshot up to now is written (store and sinks): a checkpoint is
        being saved, and a resume from it never retakes them.
        """
        self.drain()
        last = None if self._last is None else [self._last.step, self._last.tokens]
        position = self._position
        position = {} if position is None else {"step": position.step, "tokens": position.tokens}
        return {
            "run_dir": None if self.run_dir is None else str(self.run_dir),
            "run_id": self._run_id,
            "last": last,
            **position,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` before `start` (`with monitor:`): the run continues.

        The state's run id is the proof of a resume that lets `start` cut the store back.

        Raises:
            ConfigError: the run is already open (a resume must restore before it starts), or
                `state` is not a mapping.
        """
        if self._position is not None:
            raise ConfigError(
                "Monitor.load_state_dict after the run started: restore the checkpoint's "
                "monitor state before `with monitor:` (or a driver's start)"
            )
        if not isinstance(state, Mapping):
            raise ConfigError(
                f"Monitor.load_state_dict({type(state).__name__}): need the dict that "
                "monitor.state_dict() returned, as saved in the training checkpoint"
            )
        self._restored = dict(state)
        if not self._explicit_run_dir and state.get("run_dir"):
            self.run_dir = Path(state["run_dir"])

    def drain(self) -> None:
        """Wait until every queued write (store, TensorBoard, logger copies) is done."""
        self._writer.drain()

    def close(self) -> None:
        """Drain the writes, close the sinks and release the store's writer lock.

        Never raises for a failed write: those were logged as they happened; one warning here
        sums them up.
        """
        if self._fanout is not None:
            self._fanout.close()
            self._fanout = None
        self._tensorboard = None  # closed with the fan-out
        self._writer.close()
        unlisted: list[int] = []
        if self._store is not None:
            self._store.close()  # writes the failure rows a full disk refused, if it now can
            unlisted = sorted({f["step"] for f in self._store.pending_failures})
            self._store = None
        self._warn_unstored(unlisted)

    def _warn_unstored(self, unlisted: list[int]) -> None:
        """Sum up, once at close, the snapshots not stored and the copies that failed."""
        unstored = sorted(self._unstored)
        if unstored:
            logger.warning(
                "regionwatch: %d scheduled snapshots are NOT stored in %s: steps %s; %s",
                len(unstored),
                self.run_dir,
                _steps(unstored),
                f"{FAILURES_FILE} could not record steps {_steps(unlisted)} either (the disk "
                "refused it): this log is their only record"
                if unlisted
                else f"{FAILURES_FILE} lists each with its error",
            )
        copies = self._writer.failures  # store jobs record their own failures, never raise
        if copies:
            logger.warning(
                "regionwatch: %d copies to TensorBoard or the trainer's loggers failed in this "
                "run (first: %s: %s); %s",
                len(copies),
                copies[0].what,
                copies[0].error,
                "the store holds every scheduled snapshot"
                if not unstored
                else "the store holds the snapshots not listed above",
            )

    def _build_probes(self) -> ProbeSet:
        return ProbeSet.build(self._tokenizer, self._source, seed=self.watch.seed)

    def _guarded_measure(self, model: nn.Module, step: int, *, maps: bool) -> Measurement | str:
        """This rank's measurement, or why it failed (logged here, recorded by rank zero)."""
        shard = (self._rank, self._world)
        config = self.watch.probe
        for attempt in range(2):
            try:
                site = self._resolved(model)  # the model set up, its wrappers peeled
                model = site.model
                with self._precision(model):
                    measured = measure(
                        model,
                        self.probes,
                        config,
                        maps=maps,
                        site=site,
                        shard=shard,
                        dtype=self._numerics,
                        root=self._root,
                    )
                diverged = _non_finite(model, measured)
                if diverged is not None:  # not an exception: training goes on, as it should
                    logger.error("measurement at step %d failed: %s", step, diverged)
                    return diverged
                return measured
            except torch.cuda.OutOfMemoryError as err:
                budget = (config.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS) // 2
                if attempt or budget < 1:
                    logger.exception(
                        "measurement at step %d ran out of memory twice; skipped", step
                    )
                    return f"out of memory twice: {err!r}"
                logger.warning(
                    "measurement at step %d ran out of memory; retrying with max_batch_tokens=%d",
                    step,
                    budget,
                )
                torch.cuda.empty_cache()
                config = replace(config, max_batch_tokens=budget)
            except Exception as err:  # guarantee: a failed probe never stops training
                logger.exception("measurement at step %d failed; training continues", step)
                return repr(err)
        raise AssertionError("unreachable: the second attempt returns")  # for type checkers

    def _resolved(self, model: nn.Module) -> ResidualSite:
        """The site `setup` resolved, which must be of `model` (unwrapped): checked every call.

        Raises:
            ConfigError: not set up yet, or another model object (a rebuilt or reloaded model
                would leave the run measuring weights that no longer train).
        """
        inner, _ = unwrap(model)
        if self._site is None:
            raise ConfigError("the monitor is not set up yet: call setup(model, ...) first")
        if inner is not self._site.model:
            raise ConfigError(
                f"got a different model object ({type(inner).__name__} at {id(inner):#x}) from "
                f"the one given to Monitor.setup ({type(self._site.model).__name__} at "
                f"{id(self._site.model):#x}); keep training the same model object (load weights "
                "into it with load_state_dict rather than building a new one), or call setup "
                "again for another model"
            )
        return self._site

    @property
    def _numerics(self) -> torch.dtype | None:
        """fp32 numerics are computed in place, block by block (`access.upcasting`): no copy."""
        return torch.float32 if self.watch.precision == "fp32" else None

    @contextlib.contextmanager
    def _precision(self, model: nn.Module) -> Iterator[None]:
        """The trainer's precision context, or autocast off (fp32 or the weights' own dtype)."""
        if self.watch.precision == "trainer":
            with self._context():
                yield
            return
        device = next(model.parameters()).device.type
        with torch.autocast(device_type=device, enabled=False):
            yield

    def _store_snapshot(self, snapshot: Snapshot) -> None:
        """Store one snapshot (on the writer thread); a failed write is a failed snapshot."""
        try:
            self._store.write(snapshot)
            self._unstored.discard(snapshot.step)  # a retaken step (the final maps) is stored
        except Exception as err:  # guarantee: a failed store write never stops training
            logger.exception(
                "storing the snapshot at step %d failed; training continues", snapshot.step
            )
            self._store_failure(snapshot.step, snapshot.tokens, repr(err))
        else:
            self._onset.add(snapshot.record())  # the onset follows what the store holds

    def _run_scalars(self) -> dict[str, float]:
        """Run-level scalars for the TensorBoard run, after each snapshot (on the writer)."""
        tokens = self._onset.onset
        return {} if tokens is None else {"onset/tokens": tokens}

    def _record_failure(self, step: int, tokens: int, error: str) -> None:
        """Record a failed snapshot, in order with the queued writes (the store is theirs)."""
        self._writer.submit(
            f"failure record, step {step}", lambda: self._store_failure(step, tokens, error)
        )

    def _store_failure(self, step: int, tokens: int, error: str) -> None:
        self.failures += 1
        self._unstored.add(step)
        try:
            self._store.record_failure(step=step, tokens=tokens, error=error)
        except Exception:  # the failure record itself must not stop training either
            logger.exception("could not record the failed snapshot at step %d", step)


def _steps(steps: list[int]) -> str:
    """Sorted steps as short ranges: [1, 2, 3, 4, 7] -> "1-4, 7"."""
    runs: list[list[int]] = []
    for step in steps:
        if runs and step == runs[-1][1] + 1:
            runs[-1][1] = step
        else:
            runs.append([step, step])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _non_finite(model: nn.Module, measured: Measurement) -> str | None:
    """Why a measurement shows a diverged model, or None.

    A finite model gives finite distances d(a) at every probe point (only d(a)/d(1) may be NaN,
    for excluded pairs), so any non-finite distance means NaN or inf weights or activations;
    stored, it would read as "every pair excluded", which is false. Costs one pass over the
    parameters, only when the distances are already bad.
    """
    distances = [curves.distance for curves in measured.curves.values()]
    if measured.maps is not None:
        distances.append(measured.maps.distance)
    bad = sum(int((~torch.isfinite(d)).sum()) for d in distances)
    if not bad:
        return None
    total = sum(d.numel() for d in distances)
    params = [
        name
        for name, p in model.named_parameters()
        if p.is_floating_point() and not bool(torch.isfinite(distributed.local_shard(p)).all())
    ]
    cause = (
        f"{len(params)} parameters hold NaN or inf (first: {params[0]})"
        if params
        else "its weights are finite, its activations overflow"
    )
    return (
        f"non-finite model: the outputs are NaN or inf at {bad} of {total} probe points, and "
        f"{cause}; the model has diverged (lower the learning rate, clip gradients, or check "
        "the precision); no snapshot stored for this step"
    )


def _check_fits(site: ResidualSite, probes: ProbeSet) -> None:
    """Every probe prompt must fit the model's vocabulary and context; errors name the part."""
    labels = {
        "random": "random prompts",
        "similar": "similar pairs",
        "dissimilar": "dissimilar pairs",
        "named": "hand-picked pairs",
    }
    prompts = probes.prompts()
    for part, label in labels.items():
        if not prompts[part]:
            continue
        try:
            check_prompts(site, [p for group in prompts[part] for p in group])
        except ConfigError as err:
            raise ConfigError(
                f"the probe set's {label} do not fit this model: {err}; build a probe set that "
                "does, e.g. probes=ProbeSet.build(tokenizer, seq_len=<shorter>, handpicked=False)"
            ) from None
