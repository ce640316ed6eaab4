"""When to take a snapshot during training: every N steps, every N tokens, or log-spaced in tokens.

A `Schedule` is pure: `due(step, tokens, last)` depends only on its arguments, and the only
state it needs is the `Mark` (step, tokens) of the last snapshot taken. The run's snapshot store
already holds that mark, so a resumed run continues exactly where it stopped, with no state of
its own to save. Every schedule also measures once before training (the random-init baseline,
when nothing has been measured yet) and once at the end (`final=True`).

Every schedule compares a *position* of (step, tokens) with the position of the last mark:
`step // N`, `tokens // N`, or the log bucket of `tokens` (`log_bucket`). A snapshot is due when
the position has grown, however far: a batch of tokens that crosses several buckets in one step
gives one snapshot, never several, and never two at one step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from regionwatch.errors import ConfigError, check_int, check_keys

Kind = Literal["steps", "tokens", "log_tokens"]
KINDS: tuple[str, ...] = get_args(Kind)

# Regions form early in pretraining (arXiv 2409.17113), so by default snapshots are spaced
# evenly in log(tokens): 8 per decade is a ratio of ~1.33 between consecutive thresholds, which
# gives ~100 snapshots from 1 token to 10^12 while still resolving the early transition.
DEFAULT_PER_DECADE = 8
# Finer than this, consecutive thresholds differ by < 0.25%, i.e. by less than one step for the
# first few hundred steps: use every_steps instead. The cap also keeps the exact integer
# arithmetic of `log_bucket` (tokens ** per_decade) small.
MAX_PER_DECADE = 1000
# Bucket of tokens == 0, below bucket(1) == 0: the init baseline sits before every threshold, so
# the first step that sees any tokens is always due (it shows the first update's effect).
BEFORE_FIRST_TOKEN = -1


def log_bucket(tokens: int, per_decade: int) -> int:
    """The log-spaced bucket of a token count: floor(per_decade * log10(tokens)), computed exactly.

    Thresholds lie at tokens = 10 ** (j / per_decade) for j = 0, 1, 2, ...; the bucket is the
    largest j whose threshold `tokens` has reached, i.e. the largest j with
    10 ** j <= tokens ** per_decade. It is checked in integers because a float log10 can land
    on either side of a power of ten, and a resumed run on another machine must put the last
    mark in the same bucket as the original run did.

    Args:
        tokens: training tokens seen, >= 0.
        per_decade: thresholds per factor of 10 in tokens, >= 1.

    Returns:
        The bucket j >= 0, or `BEFORE_FIRST_TOKEN` (-1) for tokens == 0.
    """
    if tokens == 0:
        return BEFORE_FIRST_TOKEN
    power = tokens**per_decade
    bucket = math.floor(per_decade * math.log10(tokens))  # right, or off by one near a threshold
    while 10**bucket > power:
        bucket -= 1
    while 10 ** (bucket + 1) <= power:
        bucket += 1
    return bucket


@dataclass(frozen=True)
class Mark:
    """The (step, tokens) of the last snapshot taken.

    Attributes:
        step: the host's global step (optimizer steps taken; 0 before the first).
        tokens: training tokens seen across all ranks at that step.

    Raises:
        ConfigError: a negative or non-integer step or tokens.
    """

    step: int
    tokens: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "step", check_int("Mark.step", self.step, integral=True))
        object.__setattr__(self, "tokens", check_int("Mark.tokens", self.tokens, integral=True))


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """When to take a snapshot: one rule, plus always at the start and at the end of training.

    Build one with `every_steps`, `every_tokens` or `log_tokens` (the default: `Schedule()` is
    `Schedule.log_tokens(8)`). Each kind takes exactly one number, so there is no way to set
    two competing triggers.

    Attributes:
        kind: "steps" (due when step // every grows), "tokens" (when tokens // every grows) or
            "log_tokens" (when `log_bucket(tokens, per_decade)` grows).
        every: steps or tokens between snapshots, >= 1; only for "steps" and "tokens".
        per_decade: snapshots per factor of 10 in tokens, 1..`MAX_PER_DECADE`; only for
            "log_tokens", where None means `DEFAULT_PER_DECADE`.

    Raises:
        ConfigError: an unknown kind, a bad number, or a number the kind does not take.

    Example:
        >>> schedule = Schedule.every_steps(50)
        >>> [m.step for m in schedule.planned(total_steps=120, tokens_per_step=4096)]
        [0, 50, 100, 120]
        >>> Schedule().describe()
        'log-spaced, 8 per decade of tokens'
    """

    kind: Kind = "log_tokens"
    every: int | None = None
    per_decade: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"Schedule.kind={self.kind!r}: allowed: {', '.join(map(repr, KINDS))}; "
                "build one with Schedule.every_steps(n), every_tokens(n) or log_tokens(per_decade)"
            )
        if self.kind == "log_tokens":
            self._check_log_tokens()
        else:
            self._check_every()

    def _check_every(self) -> None:
        maker = f"Schedule.every_{self.kind}(n)"
        if self.per_decade is not None:
            raise ConfigError(
                f"Schedule.per_decade={self.per_decade!r}: kind={self.kind!r} takes no "
                f"per_decade (it is for kind='log_tokens'); use {maker}"
            )
        every = check_int(
            "Schedule.every",
            self.every,
            minimum=1,
            hint=f"kind={self.kind!r}: the {self.kind} between snapshots; use {maker}",
            integral=True,
        )
        object.__setattr__(self, "every", every)

    def _check_log_tokens(self) -> None:
        if self.every is not None:
            raise ConfigError(
                f"Schedule.every={self.every!r}: kind='log_tokens' takes no every (it is for "
                "kind='steps' or 'tokens'); use Schedule.log_tokens(per_decade)"
            )
        per_decade = check_int(
            "Schedule.per_decade",
            DEFAULT_PER_DECADE if self.per_decade is None else self.per_decade,
            minimum=1,
            maximum=MAX_PER_DECADE,
            hint=f"default {DEFAULT_PER_DECADE}; for denser snapshots use Schedule.every_steps(n)",
            integral=True,
        )
        object.__setattr__(self, "per_decade", per_decade)

    @classmethod
    def every_steps(cls, n: int) -> Schedule:
        """A snapshot every `n` optimizer steps (at steps 0, n, 2n, ...), and at the end."""
        return cls(kind="steps", every=n)

    @classmethod
    def every_tokens(cls, n: int) -> Schedule:
        """A snapshot at the first step reaching each multiple of `n`; and at the end."""
        return cls(kind="tokens", every=n)

    @classmethod
    def log_tokens(cls, per_decade: int = DEFAULT_PER_DECADE) -> Schedule:
        """Snapshots log-spaced in tokens, `per_decade` per factor of 10: the callbacks' default."""
        return cls(kind="log_tokens", per_decade=per_decade)

    def due(self, step: int, tokens: int, last: Mark | None, *, final: bool = False) -> bool:
        """True when a snapshot should be taken now.

        Call it once per optimizer step, and also before training (step 0: the baseline) and on
        resume, with the same `last`: the answer depends on nothing else. A snapshot lost to a
        crash between its step's checkpoint and its write is then taken again on resume.

        Args:
            step: the host's global step; 0 before the first optimizer step.
            tokens: training tokens seen so far across all ranks.
            last: the mark of the last snapshot taken; None when nothing was measured yet.
            final: the end of training: due unless this step was measured already.

        Returns:
            last is None: True (the baseline). Otherwise False at last.step (never two snapshots
            at one step), True when `final`, else whether the schedule's position of
            (step, tokens) is past that of `last`.

        Raises:
            ConfigError: a negative or non-integer step or tokens, or a step or token count
                below `last`'s. The latter means the run resumed from a checkpoint older than
                its snapshot store's latest snapshot: the monitor must first drop the
                snapshots after the checkpoint's step (or use a new run directory).
        """
        step, tokens = (
            check_int("step", step, integral=True),
            check_int("tokens", tokens, integral=True),
        )
        if last is None:
            return True
        if step < last.step or tokens < last.tokens:
            raise ConfigError(
                f"step={step}, tokens={tokens} is before the last snapshot (step={last.step}, "
                f"tokens={last.tokens}): the run resumed from a checkpoint older than its "
                f"snapshot store; drop the snapshots after step {step} from the store (the "
                "monitor does this on resume) or write to a new run directory"
            )
        if step == last.step:
            return False
        return final or self._position(step, tokens) > self._position(last.step, last.tokens)

    def _position(self, step: int, tokens: int) -> int:
        """Where (step, tokens) lies on this schedule's axis; a snapshot is due when it grows."""
        if self.kind == "steps":
            return step // self.every
        if self.kind == "tokens":
            return tokens // self.every
        return log_bucket(tokens, self.per_decade)

    def planned(self, total_steps: int, tokens_per_step: int) -> list[Mark]:
        """The marks a run of `total_steps` steps at a constant `tokens_per_step` would produce.

        Simulates `due` at steps 0..total_steps (final at the last) in O(total_steps), for docs,
        the demo printout and tests.

        Args:
            total_steps: optimizer steps of the run, >= 0.
            tokens_per_step: training tokens per optimizer step across all ranks, >= 0.

        Returns:
            The marks in order; the first is step 0, the last is `total_steps`.

        Raises:
            ConfigError: a negative or non-integer argument.
        """
        total_steps = check_int("total_steps", total_steps, integral=True)
        tokens_per_step = check_int("tokens_per_step", tokens_per_step, integral=True)
        marks: list[Mark] = []
        for step in range(total_steps + 1):
            last = marks[-1] if marks else None
            tokens = step * tokens_per_step
            if self.due(step, tokens, last, final=step == total_steps):
                marks.append(Mark(step, tokens))
        return marks

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as saved with a run's config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        """Rebuild a schedule; unknown keys are an error (a typo must not run another schedule)."""
        check_keys("Schedule", data, (f.name for f in fields(cls)))
        return cls(**data)

    def describe(self) -> str:
        """One line for logs, e.g. "log-spaced, 8 per decade of tokens" or "every 50 steps"."""
        if self.kind == "log_tokens":
            return f"log-spaced, {self.per_decade} per decade of tokens"
        unit = "step" if self.kind == "steps" else "token"
        if self.every == 1:
            return f"every {unit}"
        return f"every {self.every:,} {unit}s"
