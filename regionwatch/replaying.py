"""`replay`: the after-the-fact driver: measure saved checkpoints into an ordinary run directory.

Like the live drivers it only says WHEN (each checkpoint's step and tokens, found by
`regionwatch.checkpoints.discover`) and hands over the model; `Monitor` measures, stamps and writes
to the same `SnapshotStore` and TensorBoard logs a live run has, so reports treat live and replayed
runs alike, and replaying the checkpoints a live run saved gives the numbers it logged.

Guarantees:

- resumable: a checkpoint whose step the run already holds (at the same tokens) is skipped without
  loading it. That is enough because the store refuses, when it is opened, any probe set or config
  but the run's own, so a stored step was measured exactly as this replay would measure it;
- Ctrl-C or a kill leaves nothing half-written (the store's writes are atomic), and a rerun goes on
  where it stopped;
- one bad checkpoint (garbage bytes, missing or extra weights, no config.json, custom code, a
  failed measurement) is named and skipped: an error of ours is logged with its message, anything
  unforeseen with its traceback; the others are measured, and the result lists the failures;
- one model at a time: each is released before the next loads, so memory peaks at about one model.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from regionwatch.checkpoints import Checkpoint, discover
from regionwatch.decoder import Decoder
from regionwatch.errors import ConfigError, RegionWatchError, StoreError
from regionwatch.loading import (
    MODEL_FILES_DIR,
    LoadOptions,
    check_device,
    has_tokenizer,
    load_checkpoint,
    load_tokenizer,
)
from regionwatch.measurement import ProbeConfig
from regionwatch.monitor import Monitor, Precision, WatchConfig
from regionwatch.onset import LIVE_RUN_KEY
from regionwatch.probes import ProbeSet
from regionwatch.snapshot import Snapshot
from regionwatch.stacks import DECODERS, load_stack_model, resolve_builder
from regionwatch.store import CONFIG_FILE, PROBES_DIR, RUN_FORMAT, SnapshotStore

logger = logging.getLogger(__name__)

DRIVER = "replay"  # recorded as info["driver"] in every replayed snapshot


@dataclass
class ReplayResult:
    """What one `replay` call did.

    Attributes:
        run_dir: the run the snapshots went to.
        measured: checkpoints measured now, in order.
        skipped: checkpoints whose step the run already held (a resumed replay, or `into`).
        failed: (checkpoint, reason) for each checkpoint that could not be measured.
        duplicates: (checkpoint, step) for each checkpoint whose weights are bitwise those of
            another step of the run.
    """

    run_dir: Path
    measured: list[Checkpoint] = field(default_factory=list)
    skipped: list[Checkpoint] = field(default_factory=list)
    failed: list[tuple[Checkpoint, str]] = field(default_factory=list)
    duplicates: list[tuple[Checkpoint, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every checkpoint is in the run now."""
        return not self.failed


def replay(
    sources: Sequence[str | Path] = (),
    *,
    out: str | Path | None = None,
    into: str | Path | None = None,
    tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
    probes: ProbeSet | None = None,
    config: ProbeConfig | None = None,
    tokens_per_step: int | None = None,
    state_key: str | None = None,
    config_dir: str | Path | None = None,
    trust_pickle: bool = False,
    model_builder: str | None = None,
    repo: str | None = None,
    revisions: str | Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    precision: Precision = "fp32",
    device: str = "cpu",
    progress: bool = True,
    live_run: str | Path | None = None,
) -> ReplayResult:
    """Measure saved checkpoints (or hub revisions) in training order into a run directory.

    Probe set, first that applies: `probes`; the run's own (`into`, an `out` that already holds
    a run, or a run directory given as a SOURCE); the live run the checkpoints name, while it is
    there (then its kept model config too); built from `tokenizer`, else from the first
    checkpoint that has tokenizer files (seed 0 and the built-in corpus, as a live run's default).
    Measurement settings: `config`, else the run's, else `ProbeConfig()`.

    Args:
        sources: checkpoints, directories holding them, or regionwatch run directories.
        out: the run directory to write (created; an earlier replay's run is resumed).
        into: an existing run (e.g. a live run's) to add the replayed points to.
        tokenizer: a tokenizer, or a directory / "builtin" (see `load_tokenizer`).
        probes: the probe set to measure.
        config: what each measurement computes.
        tokens_per_step: tokens per optimizer step, for checkpoints that record no token count.
        state_key: key prefix of the model in state-dict checkpoints (found if None).
        config_dir: directory with the model's config.json, for state-dict checkpoints.
        trust_pickle: allow full unpickling of pickled checkpoints (runs code from the file).
        model_builder: `pkg.module:function` building the model of litgpt, OLMo-core or nanoGPT
            checkpoints from their recorded settings (required for nanoGPT); the only code
            replay imports, and only when named (see `regionwatch.stacks`).
        repo: hub repo id whose `revisions` to replay.
        revisions: revision names, globs (`step*`) or a schedule name ("pythia").
        dtype: dtype the weights are loaded in (their memory).
        precision: the numbers' dtype: "fp32" (default; half-precision weights are upcast
            module by module in place, no copy) or "weights" (the weights' own dtype).
        device: device to measure on.
        progress: show a progress bar over the checkpoints.
        live_run: the live run the checkpoints came from (default: a run directory among the
            SOURCEs, else the run the checkpoints name while it is there); recorded in a new
            run's info as `live_run`, whose step-0 snapshot then gives the onset's init band
            when no step-0 checkpoint is replayed.

    Returns:
        What was measured, skipped and failed.

    Raises:
        ConfigError, CheckpointError, StoreError: bad arguments, no checkpoints, checkpoints
            whose tokens cannot be known, no tokenizer, or a run measured differently: all
            before any checkpoint is measured.

    Example:
        >>> result = replay(["out/"], out="runs/replayed", tokenizer="out/checkpoint-500")
        >>> [c.step for c in result.measured]
        [500, 1000, 1500]
    """
    if (out is None) == (into is None):
        raise ConfigError("replay needs a run to write: --out RUN_DIR or --into RUN_DIR (one)")
    check_device(device)
    builder = None if model_builder is None else resolve_builder(model_builder)
    run_dir = Path(out if into is None else into)
    if into is not None and not _is_run(run_dir):
        raise StoreError(f"--into {run_dir}: not a regionwatch run; pass --out to start one")
    paths = [Path(s) for s in sources]
    runs = [SnapshotStore(p) for p in [run_dir, *paths] if _is_run(p)]
    checkpoints = discover(
        [p for p in paths if not _is_run(p)],
        tokens_per_step=tokens_per_step,
        repo=repo,
        revisions=revisions,
        trust_pickle=trust_pickle,
    )
    if not checkpoints:
        raise ConfigError("nothing to replay: give SOURCE paths, or --repo NAME --revisions ...")
    found, named = _live_run(checkpoints)
    if found is not None and probes is None and tokenizer is None and not runs:
        runs = [found]  # its probe set and settings: what the live run measured
    if found is not None and config_dir is None and (found.path / MODEL_FILES_DIR).is_dir():
        config_dir = found.path / MODEL_FILES_DIR  # the architecture a .ckpt does not hold
    watch = WatchConfig(
        probe=config or (runs[0].config if runs else ProbeConfig()), precision=precision
    )
    probes = _probes(probes, runs, tokenizer, checkpoints, watch.seed, gone=named)
    options = LoadOptions(
        config_dir=None if config_dir is None else Path(config_dir),
        state_key=state_key,
        trust_pickle=trust_pickle,
        model_builder=builder,
        dtype=dtype,
        device=device,
    )
    monitor = Monitor(watch, probes=probes, run_dir=run_dir, decoder=_decoder(checkpoints))
    # The live run, first that applies: given, a run directory among the SOURCEs, the run the
    # checkpoints name. A new run's info records it, where the onset's init baseline is looked up.
    live = live_run or next((p for p in paths if _is_run(p)), None)
    if live is None and found is not None:
        live = found.path
    info = None if live is None else {LIVE_RUN_KEY: str(Path(live).resolve())}
    monitor.open(run_info=info)  # a run measured differently is refused here
    try:
        return _replay_all(monitor, checkpoints, options, progress=progress)
    finally:
        monitor.close()  # also on Ctrl-C: flushes TensorBoard, releases the writer lock


def _replay_all(
    monitor: Monitor, checkpoints: list[Checkpoint], options: LoadOptions, *, progress: bool
) -> ReplayResult:
    result = ReplayResult(run_dir=monitor.run_dir)
    held = {row["step"]: row for row in monitor.store.records()}
    weights = {row["weights_fingerprint"]: row["step"] for row in held.values()}
    labels: dict[int, str] = {}
    with tqdm(checkpoints, desc=DRIVER, unit="ckpt", disable=not progress) as bar:
        for checkpoint in bar:
            bar.set_postfix_str(checkpoint.name)  # the one being measured now
            if checkpoint.error:  # unreadable while it was discovered; logged then
                result.failed.append((checkpoint, checkpoint.error))
                continue
            row = held.get(checkpoint.step)
            if row is not None and row["tokens"] == checkpoint.tokens:
                logger.info("%s: step %d already measured", checkpoint.label, checkpoint.step)
                result.skipped.append(checkpoint)
                continue
            if row is not None:
                result.failed.append((checkpoint, _conflict(checkpoint, row["tokens"])))
                logger.warning("%s: %s", checkpoint.label, result.failed[-1][1])
                continue
            snapshot, error = _measure(monitor, checkpoint, options)
            if snapshot is None:
                result.failed.append((checkpoint, error))
                continue
            held[checkpoint.step] = snapshot.record()
            labels[checkpoint.step] = checkpoint.label
            result.measured.append(checkpoint)
            twin = weights.setdefault(snapshot.weights_fingerprint, checkpoint.step)
            if twin != checkpoint.step:
                result.duplicates.append((checkpoint, twin))
                logger.warning(
                    "%s (step %d) carries exactly the weights of step %d (%s): the series holds "
                    "a duplicated checkpoint; both points are kept in %s",
                    checkpoint.label,
                    checkpoint.step,
                    twin,
                    labels.get(twin, "measured earlier"),
                    monitor.run_dir,
                )
    # The store writes run on the monitor's writer thread: report what the store really holds.
    monitor.drain()
    stored = {row["step"] for row in monitor.store.records()}
    for checkpoint in [c for c in result.measured if c.step not in stored]:
        result.measured.remove(checkpoint)
        why = "measured, but storing the snapshot failed (the log has the error)"
        result.failed.append((checkpoint, why))
    return result


def _measure(
    monitor: Monitor, checkpoint: Checkpoint, options: LoadOptions
) -> tuple[Snapshot | None, str]:
    """Load, measure and release one checkpoint; (snapshot, "") or (None, the reason)."""
    model = None
    try:
        if checkpoint.kind in DECODERS:
            model = load_stack_model(checkpoint.kind, checkpoint.path, options)
        else:
            model = load_checkpoint(
                checkpoint.kind,
                checkpoint.path,
                options,
                repo=checkpoint.repo,
                revision=checkpoint.revision,
            )
        monitor.setup(model, log_dir=None, info={"driver": DRIVER})  # checks the architecture
        # Region maps at every checkpoint (measure_now's default): a live run draws them at
        # fewer snapshots to bound its training overhead; a replay measures what it was given.
        snapshot = monitor.measure_now(
            model, step=checkpoint.step, tokens=checkpoint.tokens, info=_info(checkpoint)
        )
    except RegionWatchError as err:  # the message names the problem and its fix
        logger.warning("%s: cannot be measured; skipped: %s", checkpoint.label, err)
        return None, f"{type(err).__name__}: {err}"
    except Exception as err:  # guarantee: one bad checkpoint never stops the replay
        logger.exception("%s: cannot be measured; skipped", checkpoint.label)
        return None, f"{type(err).__name__}: {err}"
    finally:
        del model  # one model at a time: free it before the next one loads
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if snapshot is None:  # the Monitor logged the traceback and recorded the failure
        return None, "the measurement failed; see the log"
    return snapshot, ""


def _live_run(checkpoints: list[Checkpoint]) -> tuple[SnapshotStore | None, str | None]:
    """The live run the checkpoints name (their regionwatch state), if it is still there.

    Returns:
        (its store, its directory) when the named directory holds that very run (same id);
        (None, the named directory) when it is gone or holds another run; (None, None) when no
        checkpoint names one, or they name several.
    """
    named = {(c.run_dir, c.run_id) for c in checkpoints if c.run_dir}
    if len(named) != 1:
        return None, None
    ((where, run_id),) = named
    if not _is_run(Path(where)):
        return None, where
    store = SnapshotStore(where)
    if run_id is not None and store.run_id != run_id:
        return None, where
    logger.info("the checkpoints name the live run %s: its probe set and model config", where)
    return store, where


def _probes(
    probes: ProbeSet | None,
    runs: list[SnapshotStore],
    tokenizer: PreTrainedTokenizerBase | str | Path | None,
    checkpoints: list[Checkpoint],
    seed: int,
    *,
    gone: str | None = None,
) -> ProbeSet:
    """The probe set: given, the run's own, or built from the (found) tokenizer."""
    sets = [run.probes() for run in runs]
    if len({s.fingerprint for s in sets}) > 1:
        raise ConfigError(
            "the run directories given hold different probe sets "
            f"({', '.join(f'{r.path}: {s.fingerprint}' for r, s in zip(runs, sets, strict=True))})"
            "; replay measures one probe set: give one run"
        )
    if probes is None and sets:
        probes = sets[0]
    if probes is not None:
        if isinstance(tokenizer, PreTrainedTokenizerBase | str | Path):
            probes.check_tokenizer(_tokenizer(tokenizer, checkpoints))
        return probes
    # Built as a live Monitor builds its default: the built-in corpus with the watch's seed, so
    # a live run and its replay with default settings measure the same prompts.
    return ProbeSet.build(_tokenizer(tokenizer, checkpoints, gone=gone), seed=seed)


def _tokenizer(
    tokenizer: PreTrainedTokenizerBase | str | Path | None,
    checkpoints: list[Checkpoint],
    *,
    gone: str | None = None,
) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    for checkpoint in checkpoints:
        if checkpoint.kind == "hub":
            logger.info("tokenizer: %s", checkpoint.label)
            return load_tokenizer(checkpoint.repo, revision=checkpoint.revision)
        if checkpoint.kind == "gguf":  # the tokenizer is in the file's header
            try:
                tokenizer = load_tokenizer(checkpoint.path)
            except RegionWatchError as err:  # a damaged file: named here, failed when measured
                logger.warning("%s: no tokenizer from it: %s", checkpoint.label, err)
                continue
            logger.info("tokenizer: %s", checkpoint.label)
            return tokenizer
        where = checkpoint.path if checkpoint.path.is_dir() else checkpoint.path.parent
        if has_tokenizer(where):
            logger.info("tokenizer: %s", where)
            return load_tokenizer(where)
    live = (
        ""
        if gone is None
        else f"the checkpoints name the live run {gone}, which is gone (or holds another run), and "
    )
    raise ConfigError(
        f"replay builds its probe set from the model's tokenizer, and {live}none of the "
        "checkpoints has tokenizer files: pass the live run's probe set with --probe "
        "PROBE_DIR (probes=...) and, for Lightning .ckpt files, the model's config with --config "
        "DIR (config_dir=...); or a tokenizer with --tokenizer DIR (tokenizer=...)"
    )


def _info(checkpoint: Checkpoint) -> dict[str, Any]:
    """Facts recorded in the snapshot: which checkpoint, and how its position was found."""
    return {
        "checkpoint": checkpoint.label,
        "checkpoint_kind": checkpoint.kind,
        "position_from": checkpoint.found,
    }


def _decoder(checkpoints: list[Checkpoint]) -> Decoder | None:
    """Where the checkpoints' models keep their blocks: one stack's layout, or HF's (None).

    Raises:
        ConfigError: checkpoints of stacks whose models differ (one monitor measures one kind).
    """
    decoders = {DECODERS.get(c.kind) for c in checkpoints}
    if len(decoders) > 1:
        kinds = sorted({c.kind for c in checkpoints})
        raise ConfigError(
            f"these checkpoints are of different stacks ({', '.join(kinds)}), whose models keep "
            "their blocks in different places; replay one stack's checkpoints at a time"
        )
    return decoders.pop()


def _conflict(checkpoint: Checkpoint, tokens: int) -> str:
    return (
        f"the run already holds step {checkpoint.step} at {tokens} tokens, and this checkpoint "
        f"says {checkpoint.tokens} ({checkpoint.found}): a different run, or a wrong "
        "--tokens-per-step; not measured"
    )


def run_of_probes(probe_dir: str | Path) -> Path | None:
    """The run directory a probe set was saved in (`RUN/probes`), or None for a loose one."""
    parent = Path(probe_dir).parent
    return parent if Path(probe_dir).name == PROBES_DIR and _is_run(parent) else None


def _is_run(path: Path) -> bool:
    """Whether `path` is a regionwatch run directory (its config.json says so)."""
    try:
        meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == RUN_FORMAT
