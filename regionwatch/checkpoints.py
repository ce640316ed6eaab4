"""Checkpoints of a training run: finding them and placing them in training.

What replay measures. `discover` turns SOURCE paths and hub revisions into `Checkpoint`s ordered
by (tokens, step): `save_pretrained` directories (HF Trainer `checkpoint-N` folders among them),
single-file state dicts (Lightning `.ckpt`, `torch.save` files), sharded directories (refused at
load with the command that consolidates them), hub revisions (Pythia's `step1000`, OLMo's
`step1000-tokens4B`) and other stacks' checkpoints (litgpt and OLMo-core step folders, nanoGPT
`ckpt.pt`; stacks.py). The step and tokens of each come from the first that applies: a stack
checkpoint's own records; the Trainer's `trainer_state.json`; a `.ckpt`'s `global_step` (and the
tokens a `RegionMonitor` recorded in its callback state); the name (`revisions.parse_revision`, the
one reader of checkpoint names); tokens as step x `tokens_per_step`. A checkpoint whose tokens stay
unknown is refused, never guessed.
A checkpoint that cannot be read while it is placed (garbage bytes, a `trainer_state.json` whose
step is no number, a model folder without `config.json`) carries the reason in `error`: replay
reports it as failed and goes on with the others. Names and hub revisions are read in
revisions.py; checkpoints are loaded in loading.py (`load_checkpoint`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from regionwatch.errors import CheckpointError, ConfigError, check_int
from regionwatch.gguf_file import GGUF_SUFFIX
from regionwatch.loading import (
    CONFIG_FILE,
    STATE_DICT_SUFFIXES,
    Kind,
    has_weights,
    is_sharded_checkpoint,
    read_checkpoint,
)
from regionwatch.revisions import expand_revisions, parse_revision
from regionwatch.stacks import NANOGPT_FILE, is_nanogpt, stack_kind
from regionwatch.stacks import position as stack_position

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"  # the HF Trainer's state in every checkpoint-N folder
# Files picked up inside a SOURCE directory, and their kind; others must be named.
SCANNED_SUFFIXES: Mapping[str, Kind] = MappingProxyType(
    {".ckpt": "state_dict", GGUF_SUFFIX: "gguf"}
)
NANOGPT_SUFFIXES = (".pt", ".pth")  # a torch.save file that may be nanoGPT's (`model_args` in it)
# Where each stack checkpoint's step and tokens are recorded (regionwatch.stacks reads them).
STACK_RECORDS = MappingProxyType(
    {
        "litgpt": "lit_model.pth's step_count",
        "olmo_core": "train/rank0.pt",
        "nanogpt": "the checkpoint's iter_num and config",
    }
)
# RegionMonitor's Lightning `state_key` (`monitor_state_key`): this name, then the run_dir it was
# given in brackets, so that two monitors of one Trainer keep their states apart.
REGION_MONITOR_STATE = "regionwatch.RegionMonitor"
LEGACY_MONITOR_STATE = "RegionMonitor"  # its key before it had its own: Lightning's, the class name
# RegionMonitorCallback's entry in trainer_state.json's `stateful_callbacks` (run id and dir).
HF_MONITOR_STATE = "regionwatch"


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """One checkpoint to replay: where it is, and where in training it was saved.

    Attributes:
        kind: "pretrained" (a save_pretrained dir), "state_dict" (one file), "sharded" (a
            torch.distributed.checkpoint dir; refused at load), "hub" (a repo revision), a GGUF
            file ("gguf", placed by its name or `tokens_per_step`), or another stack's checkpoint:
            "litgpt", "olmo_core", "nanogpt" (see stacks.py).
        path: the file or directory (None for hub revisions).
        repo: the hub repo id (hub revisions only).
        revision: the hub revision (hub revisions only).
        step: optimizer steps taken when it was saved.
        tokens: training tokens seen when it was saved.
        found: how step and tokens were found, e.g. "step and tokens: trainer_state.json".
        tokens_per_step: the tokens-per-step default of its revision schedule, if any.
        error: why it cannot be measured, found while discovering it; "" if nothing was.
        run_dir: the live run the checkpoint names (its regionwatch callback state), if any.
        run_id: that run's id, if recorded.
    """

    kind: Kind
    path: Path | None = None
    repo: str | None = None
    revision: str | None = None
    step: int | None = None
    tokens: int | None = None
    found: str = ""
    tokens_per_step: int | None = None
    error: str = ""
    run_dir: str | None = None
    run_id: str | None = None

    @property
    def label(self) -> str:
        """The checkpoint as a user would name it: its path, or `repo@revision`."""
        return f"{self.repo}@{self.revision}" if self.repo else str(self.path)

    @property
    def name(self) -> str:
        """The short name its step may be read from: the revision or the file's name."""
        if self.revision is not None:
            return self.revision
        name = self.path.name
        for suffix in (*STATE_DICT_SUFFIXES, GGUF_SUFFIX):  # `epoch=0-step=4.ckpt.pt` too
            name = name.removesuffix(suffix)
        return name


def discover(
    sources: Sequence[str | Path] = (),
    *,
    tokens_per_step: int | None = None,
    repo: str | None = None,
    revisions: str | Sequence[str] | None = None,
    trust_pickle: bool = False,
) -> list[Checkpoint]:
    """Find the checkpoints of SOURCE paths and hub revisions, in training order.

    A SOURCE is a checkpoint (a save_pretrained dir, a state-dict file, a sharded dir) or a
    directory searched for them (save_pretrained dirs and `*.ckpt` files at any depth; hidden and
    symlinked directories are not entered). The same file given twice (or via a symlink such as
    Lightning's `last.ckpt`) counts once.

    Args:
        sources: paths.
        tokens_per_step: tokens per optimizer step, for checkpoints that record no token count.
        repo: a hub repo id whose `revisions` to replay.
        revisions: names, comma-separated or a list; globs (`step*`) match the repo's revisions;
            a key of `revisions.REVISION_SCHEDULES` ("pythia") stands for its list.
        trust_pickle: allow full unpickling when reading a `.ckpt`'s step (see `read_checkpoint`).

    Returns:
        The checkpoints sorted by (tokens, step); every one but sharded ones has both.

    Raises:
        CheckpointError: a SOURCE that does not exist or holds no checkpoint, or checkpoints
            whose step or tokens cannot be known (the message names `--tokens-per-step`).
        ConfigError: revisions without a repo, or a bad `tokens_per_step`.
    """
    if tokens_per_step is not None:
        check_int(
            "--tokens-per-step",
            tokens_per_step,
            minimum=1,
            hint="training tokens per optimizer step, e.g. batch size x sequence length x "
            "gradient accumulation x ranks",
        )
    found: list[Checkpoint] = []
    for source in sources:
        found += _scan(Path(source))
    found = _drop_inner_links(found, sources)
    if repo is not None:
        found += [
            Checkpoint(kind="hub", repo=repo, revision=name, tokens_per_step=default)
            for name, default in expand_revisions(repo, revisions)
        ]
    elif revisions:
        raise ConfigError("--revisions needs --repo NAME: the hub repo they are revisions of")
    unique = {_identity(c): c for c in reversed(found)}  # the first mention wins
    placed = [_place(c, tokens_per_step, trust_pickle) for c in found if unique[_identity(c)] is c]
    _refuse_unplaced(placed)
    return sorted(placed, key=_order)


def _scan(source: Path) -> list[Checkpoint]:
    if not source.exists():
        raise CheckpointError(f"SOURCE {source} does not exist")
    if source.is_file():
        if source.suffix == GGUF_SUFFIX:
            return [Checkpoint(kind="gguf", path=source)]
        if source.suffix not in STATE_DICT_SUFFIXES:
            raise CheckpointError(
                f"SOURCE {source} is not a checkpoint file (known suffixes: "
                f"{', '.join((*STATE_DICT_SUFFIXES, GGUF_SUFFIX))}); for a save_pretrained model "
                "pass its directory"
            )
        return [Checkpoint(kind=stack_kind(source) or "state_dict", path=source)]
    found = list(_walk(source))
    if not found:
        raise CheckpointError(
            f"no checkpoints in {source}: looked for save_pretrained directories ({CONFIG_FILE} "
            "with model.safetensors or pytorch_model.bin), Trainer checkpoint-N folders, "
            f"Lightning .ckpt and .gguf files, sharded checkpoint directories, "
            f"litgpt and OLMo-core step folders and nanoGPT {NANOGPT_FILE} files"
        )
    return found


def _walk(directory: Path) -> Iterator[Checkpoint]:
    stack = stack_kind(directory)
    if stack is not None:  # an OLMo-core folder's DCP subfolder is part of it, not a checkpoint
        yield Checkpoint(kind=stack, path=directory)
        return
    if is_sharded_checkpoint(directory):
        yield Checkpoint(kind="sharded", path=directory)
        return
    if _is_pretrained(directory):
        yield Checkpoint(kind="pretrained", path=directory)
    elif _lacks_config(directory):
        yield Checkpoint(
            kind="pretrained",
            path=directory,
            error=f"a model checkpoint folder without {CONFIG_FILE}, so its architecture is "
            f"unknown: copy the model's {CONFIG_FILE} into it (a single-file state dict in it: "
            "pass the file as SOURCE with --config DIR)",
        )
    for child in sorted(directory.iterdir()):
        if child.name.startswith("."):
            continue  # .git, .cache, .no_exist: never checkpoints
        if child.is_symlink() and child.is_dir():
            yield Checkpoint(kind="pretrained", path=child, error=_link_error(child))
        elif child.is_dir():
            yield from _walk(child)
        elif child.is_file() and child.suffix in SCANNED_SUFFIXES:
            yield Checkpoint(kind=SCANNED_SUFFIXES[child.suffix], path=child)
        elif child.is_file() and child.name == NANOGPT_FILE:
            yield Checkpoint(kind="nanogpt", path=child)


def _link_error(link: Path) -> str:
    return (
        f"a symbolic link to {link.resolve()}, not followed (a link inside a SOURCE folder can "
        "lead out of it or round in a loop): pass its target as a SOURCE to replay it"
    )


def _drop_inner_links(found: list[Checkpoint], sources: Sequence[str | Path]) -> list[Checkpoint]:
    """Links are failed checkpoints, named; but one into a SOURCE being scanned loses nothing.

    Such a link (a `latest` link to a checkpoint folder beside it) points at what the scan
    measures anyway: it is named at INFO and dropped. Any other passes over its target: it stays,
    failed, and was named at WARNING.
    """
    roots = [Path(s).resolve() for s in sources if Path(s).is_dir()]
    kept = []
    for checkpoint in found:
        if checkpoint.path is not None and checkpoint.error == _link_error(checkpoint.path):
            target = checkpoint.path.resolve()
            if any(target == root or root in target.parents for root in roots):
                logger.info(
                    "%s: a link to %s, which this scan covers itself", checkpoint.path, target
                )
                continue
            logger.warning("%s: skipped: %s", checkpoint.path, checkpoint.error)
        kept.append(checkpoint)
    return kept


def _is_pretrained(directory: Path) -> bool:
    """A save_pretrained dir: weights, or a model config in a folder named or stated like one.

    The second case keeps a checkpoint whose weights went missing in the replay (it then fails
    with that reason), while a bare config beside `.ckpt` files is not taken for a checkpoint.
    """
    if not (directory / CONFIG_FILE).is_file():
        return False
    if has_weights(directory):
        return True
    if not ((directory / TRAINER_STATE).is_file() or parse_revision(directory.name)):
        return False
    return "model_type" in _read_json(directory / CONFIG_FILE)


def _lacks_config(directory: Path) -> bool:
    """A folder that holds a model's weights, or is a Trainer checkpoint, but no config.json."""
    if (directory / CONFIG_FILE).is_file():
        return False
    trainer = (directory / TRAINER_STATE).is_file() and parse_revision(directory.name) is not None
    return has_weights(directory) or trainer


def _place(checkpoint: Checkpoint, tokens_per_step: int | None, trust_pickle: bool) -> Checkpoint:
    """Fill in step and tokens; a checkpoint unreadable on the way gets the reason as `error`."""
    if checkpoint.error:
        return checkpoint
    try:
        return _position(checkpoint, tokens_per_step, trust_pickle)
    except CheckpointError as err:  # the reason says it all: no traceback
        logger.warning("%s: %s", checkpoint.label, err)
        return replace(checkpoint, error=str(err))
    except Exception as err:  # guarantee: one bad checkpoint never stops the replay
        logger.exception("%s: cannot be read; skipped", checkpoint.label)
        return replace(checkpoint, error=f"{type(err).__name__}: {err}")


def _position(
    checkpoint: Checkpoint, tokens_per_step: int | None, trust_pickle: bool
) -> Checkpoint:
    """Fill in step and tokens, each from the first source that has it."""
    steps: list[tuple[int | None, str]] = []
    tokens: list[tuple[int | None, str]] = []
    run: Mapping[str, Any] = {}
    if checkpoint.kind == "state_dict" and checkpoint.path.suffix in NANOGPT_SUFFIXES:
        data = read_checkpoint(checkpoint.path, trust_pickle=trust_pickle)  # memory-mapped
        if is_nanogpt(data):  # a nanoGPT checkpoint saved under another name than ckpt.pt
            checkpoint = replace(checkpoint, kind="nanogpt")
    if checkpoint.kind in STACK_RECORDS:
        step, seen = stack_position(checkpoint.kind, checkpoint.path, trust_pickle)
        steps.append((step, STACK_RECORDS[checkpoint.kind]))
        tokens.append((seen, STACK_RECORDS[checkpoint.kind]))
    if checkpoint.kind == "pretrained" and (checkpoint.path / TRAINER_STATE).is_file():
        state = _read_json(checkpoint.path / TRAINER_STATE)
        callbacks = state.get("stateful_callbacks")
        if isinstance(callbacks, Mapping) and isinstance(callbacks.get(HF_MONITOR_STATE), Mapping):
            run = callbacks[HF_MONITOR_STATE]
        step = _count(state.get("global_step"), TRAINER_STATE, "global_step")
        seen = _count(state.get("num_input_tokens_seen"), TRAINER_STATE, "num_input_tokens_seen")
        steps.append((step, TRAINER_STATE))
        # The Trainer writes 0 when it was not asked to count (include_num_input_tokens_seen).
        tokens.append((seen if seen or step == 0 else None, TRAINER_STATE))
    if checkpoint.kind == "state_dict" and checkpoint.path.suffix != ".safetensors":
        step, seen, run = _lightning_position(checkpoint.path, trust_pickle)
        steps.append((step, "the checkpoint's global_step"))
        tokens.append((seen, "the RegionMonitor state in the checkpoint"))
    named = parse_revision(checkpoint.name)
    if named is not None:
        steps.append((named[0], "the name"))
        tokens.append((named[1], "the name"))
    step, step_from = _first(steps)
    per_step = tokens_per_step or checkpoint.tokens_per_step
    if step is not None and per_step is not None:
        tokens.append((step * per_step, f"step x {per_step} tokens per step"))
    seen, tokens_from = _first(tokens)
    how = (
        f"step and tokens from {step_from}"
        if step_from == tokens_from
        else f"step from {step_from}, tokens from {tokens_from}"
    )
    run_dir, run_id = run.get("run_dir"), run.get("run_id")
    return replace(
        checkpoint,
        step=step,
        tokens=seen,
        found=how,
        run_dir=run_dir if isinstance(run_dir, str) else None,
        run_id=run_id if isinstance(run_id, str) else None,
    )


def _lightning_position(
    path: Path, trust_pickle: bool
) -> tuple[int | None, int | None, Mapping[str, Any]]:
    """A `.ckpt`'s global step, the tokens its RegionMonitor counted, and that monitor's state.

    None where absent (an empty state: no monitor).

    Memory-mapped: this reads the few bytes of metadata, not the weights.

    Raises:
        CheckpointError: the file is unreadable (or pickled and not trusted): loading it would
            fail for the same reason.
    """
    data = read_checkpoint(path, trust_pickle=trust_pickle)
    if not isinstance(data, Mapping):
        return None, None, {}
    step = data.get("global_step")
    callbacks = data.get("callbacks")
    states = monitor_states(callbacks) if isinstance(callbacks, Mapping) else []
    seen = states[0].get("tokens") if states else None  # every monitor counts the same tokens
    return _int_or_none(step), _int_or_none(seen), states[0] if states else {}


def monitor_state_key(run_dir: str | None) -> str:
    """The Lightning `state_key` of a RegionMonitor given `run_dir` (None: the default one)."""
    return REGION_MONITOR_STATE if run_dir is None else f"{REGION_MONITOR_STATE}[{run_dir}]"


def monitor_states(callbacks: Mapping[Any, Any]) -> list[Mapping[str, Any]]:
    """The RegionMonitor states among a `.ckpt`'s callback states, old checkpoints' key included."""
    return [
        state
        for key, state in callbacks.items()
        if isinstance(state, Mapping)
        and isinstance(key, str)
        and (
            key in (REGION_MONITOR_STATE, LEGACY_MONITOR_STATE)
            or key.startswith(f"{REGION_MONITOR_STATE}[")
        )
    ]


def _refuse_unplaced(checkpoints: list[Checkpoint]) -> None:
    unplaced = [
        c
        for c in checkpoints
        if c.kind != "sharded" and not c.error and (c.step is None or c.tokens is None)
    ]
    if not unplaced:
        return
    lines = [
        f"  {c.label}: "
        + (
            "no step (no trainer_state.json or global_step; the name is not checkpoint-N, stepN, "
            "stepN-tokensT or epoch=E-step=N)"
            if c.step is None
            else f"step {c.step} ({c.found.split(',')[0]}), tokens unknown"
        )
        for c in unplaced
    ]
    raise CheckpointError(
        f"cannot tell how many training tokens {len(unplaced)} checkpoint(s) had seen, and will "
        "not guess:\n"
        + "\n".join(lines)
        + "\nPass --tokens-per-step N (tokens = step x N; tokens_per_step=...) for checkpoints "
        "with a step; name the others like stepN (or pass the checkpoint-N folders themselves)"
    )


def _first(candidates: list[tuple[int | None, str]]) -> tuple[int | None, str]:
    for value, where in candidates:
        if value is not None:
            return int(value), where
    return None, "nowhere"


def _identity(checkpoint: Checkpoint) -> tuple[str, ...]:
    if checkpoint.kind == "hub":
        return ("hub", checkpoint.repo, checkpoint.revision)
    return ("path", str(checkpoint.path.resolve()))


def _order(checkpoint: Checkpoint) -> tuple[Any, ...]:
    # Sharded dirs may lack a position; they fail at load anyway, so they go last.
    unknown = checkpoint.tokens is None
    return (unknown, checkpoint.tokens or 0, checkpoint.step or 0, checkpoint.label)


def _count(value: Any, source: str, key: str) -> int | None:
    """A step or token count as recorded in `source`: an int >= 0, or None if absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(
            f"{source}: {key} is {value!r}, not a count (an int >= 0); the file is damaged: "
            f"restore it, or delete it to place the checkpoint by its name"
        )
    return value


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return int(value) if isinstance(value, int) else None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; {} (with a warning) if damaged: placing falls back on the name."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        logger.warning("%s: not readable JSON (%s); ignored", path, err)
        return {}
    return data if isinstance(data, dict) else {}
