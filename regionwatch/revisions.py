"""Checkpoint names and hub revisions: the step and tokens a name says, and the named schedules.

`parse_revision` is the one reader of checkpoint names (HF Trainer `checkpoint-N`, Pythia
`stepN`, OLMo `stepN-tokensT`, Lightning `epoch=E-step=N`); `revision_name` builds Pythia's.
`expand_revisions` turns `--revisions` (names, globs over a repo's branches and tags, or a named
schedule such as "pythia") into revision names, each with its schedule's tokens per step.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from types import MappingProxyType

from huggingface_hub import constants as hub_constants
from huggingface_hub import list_repo_refs
from huggingface_hub.file_download import repo_folder_name

from regionwatch.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

LISTED_REVISIONS = 8  # revision names quoted in an error message
# Token units in revision names: OLMo's `step1000-tokens4B` is 4e9 tokens (rounded by its makers).
TOKEN_UNITS = MappingProxyType({"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12})
_TRAINER_NAME = re.compile(r"checkpoint-(?P<step>\d+)")  # HF Trainer: checkpoint-500
_LIGHTNING_NAME = re.compile(r"(?:^|-)step=(?P<step>\d+)(?=[-.]|$)")  # epoch=0-step=500(-v1)
_LITGPT_NAME = re.compile(r"step-(?P<step>\d+)")  # litgpt's pretrain: step-00001000
# Pythia `step1000`; OLMo `step1000-tokens4B`, OLMo 2 `stage1-step1000-tokens5B`; ours plain.
_STEP_NAME = re.compile(r"(?:^|[-_])step(?P<step>\d+)(?:-tokens(?P<tokens>\d+)(?P<unit>[KMBT]?))?$")

# Pythia (Biderman et al. 2023, §2 and the EleutherAI/pythia README): 154 checkpoints per model,
# step0, ten log-spaced ones (1, 2, 4, ..., 512), then every 1000 steps up to 143000; each step
# is 1024 sequences x 2048 tokens.
PYTHIA_STEPS = (0, *(2**i for i in range(10)), *range(1000, 143_001, 1000))
PYTHIA_TOKENS_PER_STEP = 1024 * 2048  # 2,097,152


def revision_name(step: int) -> str:
    """The hub revision of a step, as Pythia names its branches: `step1000`."""
    return f"step{step}"


PYTHIA_REVISIONS = tuple(revision_name(step) for step in PYTHIA_STEPS)


@dataclass(frozen=True)
class RevisionSchedule:
    """A public model family's checkpoint revisions and its tokens per optimizer step."""

    revisions: tuple[str, ...]
    tokens_per_step: int


# `--revisions pythia` expands to these; the tokens per step then need no flag.
REVISION_SCHEDULES = MappingProxyType(
    {"pythia": RevisionSchedule(PYTHIA_REVISIONS, PYTHIA_TOKENS_PER_STEP)}
)


def parse_revision(name: str) -> tuple[int, int | None] | None:
    """Step and tokens from a checkpoint's name; None if the name says neither.

    The one reader of checkpoint names. Understood: `checkpoint-N` (HF Trainer), `stepN`
    (Pythia), `stepN-tokensT` with T plain or in K/M/B/T units (OLMo; a `stage1-` prefix too),
    `epoch=E-step=N` (Lightning, with any `-metric=...` or `-vN` after it), `step-N` (litgpt).

    Args:
        name: a directory, file (without suffix) or revision name.

    Returns:
        (step, tokens), tokens None where the name holds none.

    Example:
        >>> parse_revision("step1000-tokens4B")
        (1000, 4000000000)
    """
    trainer = _TRAINER_NAME.fullmatch(name)
    if trainer:
        return int(trainer["step"]), None
    lightning = _LIGHTNING_NAME.search(name) or _LITGPT_NAME.fullmatch(name)
    if lightning:
        return int(lightning["step"]), None
    plain = _STEP_NAME.search(name)
    if plain is None:
        return None
    tokens = None if plain["tokens"] is None else int(plain["tokens"]) * TOKEN_UNITS[plain["unit"]]
    return int(plain["step"]), tokens


def expand_revisions(
    repo: str, revisions: str | Sequence[str] | None
) -> list[tuple[str, int | None]]:
    """Revision names, each with its schedule's tokens per step if it came from one.

    Raises:
        CheckpointError: a glob that matches no revision of the repo.
        ConfigError: no revisions given.
    """
    items = revisions.split(",") if isinstance(revisions, str) else list(revisions or ())
    items = [item.strip() for item in items if item.strip()]
    if not items:
        raise ConfigError(
            f"--repo {repo} needs --revisions: names (step0,step1000), a glob ('step*') or "
            f"a known schedule ({', '.join(REVISION_SCHEDULES)})"
        )
    out: list[tuple[str, int | None]] = []
    refs: list[str] | None = None
    for item in items:
        if item in REVISION_SCHEDULES:
            schedule = REVISION_SCHEDULES[item]
            out += [(name, schedule.tokens_per_step) for name in schedule.revisions]
        elif any(char in item for char in "*?["):
            refs = list_revisions(repo) if refs is None else refs
            matched = sorted((r for r in refs if fnmatchcase(r, item)), key=_revision_order)
            if not matched:
                raise CheckpointError(
                    f"--revisions {item!r} matches none of the {len(refs)} revisions of {repo}: "
                    f"{sorted(refs)[:LISTED_REVISIONS]}"
                )
            out += [(name, None) for name in matched]
        else:
            out.append((item, None))
    return out


def list_revisions(repo: str) -> list[str]:
    """The branches and tags of a hub repo; offline, those in the local Hugging Face cache.

    Offline (`HF_HUB_OFFLINE=1`), or when the hub cannot be reached, the answer is the refs the
    local cache holds (`<HF_HUB_CACHE>/models--org--name/refs/`): only revisions downloaded
    before. That is logged, since it may be fewer than the repo has.
    """
    if not hub_constants.HF_HUB_OFFLINE:
        try:
            refs = list_repo_refs(repo)
            return [ref.name for ref in (*refs.branches, *refs.tags)]
        except OSError as err:  # the hub's HTTP errors and connection errors are OSErrors
            logger.warning("cannot list the revisions of %s on the hub (%s)", repo, err)
    refs_dir = Path(hub_constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    refs_dir /= "refs"
    names = sorted(p.name for p in refs_dir.iterdir() if p.is_file()) if refs_dir.is_dir() else []
    logger.warning(
        "listing the revisions of %s from the local cache %s only (offline): %d found",
        repo,
        refs_dir,
        len(names),
    )
    return names


def _revision_order(name: str) -> tuple[int, int, str]:
    parsed = parse_revision(name)
    return (0, parsed[0], name) if parsed else (1, 0, name)
