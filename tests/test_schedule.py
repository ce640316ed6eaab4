"""Tests of regionwatch.schedule: known plans, exact log buckets, resume, and refused input."""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal, localcontext
from itertools import accumulate, pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regionwatch.errors import ConfigError
from regionwatch.schedule import (
    BEFORE_FIRST_TOKEN,
    DEFAULT_PER_DECADE,
    MAX_PER_DECADE,
    Mark,
    Schedule,
    log_bucket,
)

schedules = st.one_of(
    st.integers(1, 60).map(Schedule.every_steps),
    st.integers(1, 50_000).map(Schedule.every_tokens),
    st.integers(1, 16).map(Schedule.log_tokens),
)
# Tokens added by each optimizer step; 0 is allowed (a host may report no new tokens).
increments = st.lists(st.integers(0, 10**6), max_size=200)


def token_counts(steps_tokens: list[int]) -> list[int]:
    """Tokens seen at steps 0..len(steps_tokens): 0 before the first step, then running sums."""
    return [0, *accumulate(steps_tokens)]


def simulate(schedule: Schedule, tokens: list[int], *, start: int = 0, last: Mark | None = None):
    """Marks from calling `due` once per step from `start`, final at the last step, as a driver."""
    marks, end = [], len(tokens) - 1
    for step in range(start, end + 1):
        if schedule.due(step, tokens[step], last, final=step == end):
            last = Mark(step, tokens[step])
            marks.append(last)
    return marks


def reference_position(schedule: Schedule, step: int, tokens: int) -> int:
    """The schedule's position, written independently (Decimal logs, correctly rounded)."""
    if schedule.kind == "steps":
        return step // schedule.every
    if schedule.kind == "tokens":
        return tokens // schedule.every
    if tokens == 0:
        return -1
    with localcontext() as ctx:
        ctx.prec = 40  # Decimal.log10 is exact at powers of 10; 40 digits resolve every other t
        return math.floor(Decimal(tokens).log10() * schedule.per_decade)


def test_every_steps_planned_known_case():
    """every_steps(50) marks steps 0, 50, ..., and the final step once."""
    assert [m.step for m in Schedule.every_steps(50).planned(200, 4096)] == [0, 50, 100, 150, 200]
    marks = Schedule.every_steps(50).planned(230, 10)
    assert marks == [Mark(s, 10 * s) for s in (0, 50, 100, 150, 200, 230)]


def test_every_tokens_planned_known_case():
    """every_tokens(10000) at 4096 tokens/step marks the first step past each multiple."""
    # step:   0     1     2      3      4      5      6      7      8      9     10     11
    # tokens: 0  4096  8192  12288  16384  20480  24576  28672  32768  36864  40960  45056
    # t//1e4: 0     0     0      1      1      2      2      2      3      3      4      4
    marks = Schedule.every_tokens(10_000).planned(11, 4096)
    assert [m.step for m in marks] == [0, 3, 5, 8, 10, 11]
    assert marks[1] == Mark(3, 12288)


def test_log_tokens_planned_known_case():
    """log_tokens(8) at 4096 tokens/step marks the first step past each threshold 10^(j/8)."""
    # threshold 10^(j/8) for j = 28..44 and the first step s with 4096 s >= it:
    #   j=28:   3162 -> s=1 (4096)      j=37:  42170 -> s=11 (45056; s=10 is 40960)
    #   j=29..31: 4217, 5623, 7499      j=38:  56234 -> s=14 (57344; s=13 is 53248)
    #        -> all crossed at s=2      j=39:  74989 -> s=19 (77824; s=18 is 73728)
    #   j=32:  10000 -> s=3 (12288)     j=40: 100000 -> s=25 (102400; s=24 is 98304)
    #   j=33:  13335 -> s=4 (16384)     j=41: 133352 -> s=33 (135168; s=32 is 131072)
    #   j=34:  17783 -> s=5 (20480)     j=42: 177828 -> s=44 (180224; s=43 is 176128)
    #   j=35:  23714 -> s=6 (24576)     j=43: 237137 -> s=58 (237568; s=57 is 233472)
    #   j=36:  31623 -> s=8 (32768)     j=44: 316228 -> s=78 (319488; s=77 is 315392)
    # j=45 (421697) is first reached at s=103, after the end; s=100 is the final mark.
    steps = [m.step for m in Schedule.log_tokens().planned(100, 4096)]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 8, 11, 14, 19, 25, 33, 44, 58, 78, 100]


def test_planned_degenerate_runs():
    """A run of 0 steps has only the baseline; a run without tokens gets baseline and end."""
    assert Schedule().planned(0, 4096) == [Mark(0, 0)]
    assert Schedule.log_tokens(8).planned(50, 0) == [Mark(0, 0), Mark(50, 0)]


@pytest.mark.parametrize(
    ("tokens", "per_decade", "bucket"),
    [
        (0, 8, BEFORE_FIRST_TOKEN),
        (1, 8, 0),
        (9, 1, 0),
        (10, 1, 1),
        (999, 8, 23),
        (1000, 8, 24),
        (10**12 - 1, 8, 95),
        (10**12, 8, 96),
        (10**15, 7, 105),
        (2154, 3, 9),  # 10^(10/3) = 2154.43...
        (2155, 3, 10),
        # float floor(per_decade * log10(t)) is one too high, then one too low, in these two:
        (999_999_999_999_999, 7, 104),
        (12_379_172_709_857, 561, 7345),
        (12_379_172_709_856, 561, 7344),
    ],
)
def test_log_bucket_known_values(tokens, per_decade, bucket):
    """Buckets are exact at and next to the thresholds 10^(j/per_decade)."""
    assert log_bucket(tokens, per_decade) == bucket


@settings(deadline=None)
@given(tokens=st.integers(0, 10**15), per_decade=st.integers(1, MAX_PER_DECADE))
def test_log_bucket_matches_decimal_reference(tokens, per_decade):
    """log_bucket equals floor(per_decade * log10(tokens)) computed in 40-digit decimals."""
    schedule = Schedule.log_tokens(per_decade)
    assert log_bucket(tokens, per_decade) == reference_position(schedule, 0, tokens)


def test_due_without_last_is_the_baseline():
    """Nothing measured yet: due at any step, so step 0 is always the random-init baseline."""
    for schedule in (Schedule(), Schedule.every_steps(7), Schedule.every_tokens(10**6)):
        assert schedule.due(0, 0, None)
        assert schedule.due(123, 456_789, None)


def test_due_crossing_several_buckets_gives_one_snapshot():
    """A batch that jumps many log buckets is one snapshot, and not again at the same step."""
    schedule = Schedule.log_tokens(8)
    assert schedule.due(1, 10**6, Mark(0, 0))  # buckets -1 -> 48 in one step
    assert not schedule.due(1, 10**6, Mark(1, 10**6))
    assert not schedule.due(2, 10**6 + 1, Mark(1, 10**6))


def test_due_never_twice_at_one_step():
    """More tokens at an already measured step (e.g. counted per micro-batch) is not due."""
    assert not Schedule.every_tokens(100).due(5, 1000, Mark(5, 100))
    assert not Schedule.every_tokens(100).due(5, 1000, Mark(5, 100), final=True)
    assert Schedule.every_tokens(100).due(6, 1000, Mark(5, 100))


def test_due_final_iff_step_not_measured():
    """final=True is due exactly when the last snapshot is from an earlier step."""
    schedule = Schedule.every_steps(1000)
    assert not schedule.due(10, 80, Mark(5, 40))
    assert schedule.due(10, 80, Mark(5, 40), final=True)
    assert not schedule.due(10, 80, Mark(10, 80), final=True)
    assert schedule.due(10, 80, None, final=True)


@pytest.mark.parametrize(
    ("step", "tokens", "last"),
    [(4, 900, Mark(5, 800)), (6, 700, Mark(5, 800)), (4, 700, Mark(5, 800))],
)
def test_due_refuses_going_backwards(step, tokens, last):
    """Resuming from a checkpoint older than the store says to drop the later snapshots."""
    with pytest.raises(ConfigError, match="drop the snapshots after step"):
        Schedule().due(step, tokens, last)


@pytest.mark.parametrize(
    ("step", "tokens", "match"),
    [
        (-1, 0, "step=-1"),
        (0, -5, "tokens=-5"),
        (1.0, 0, "step=1.0"),
        (True, 0, "step=True"),
        (0, "10", "tokens='10'"),
    ],
)
def test_due_refuses_bad_counts(step, tokens, match):
    """Negative, boolean or non-integer step or tokens are a programming error, named."""
    with pytest.raises(ConfigError, match=re.escape(match)):
        Schedule().due(step, tokens, None)


def test_counts_accept_numpy_ints():
    """numpy integers work as counts and settings and are stored as plain ints."""
    schedule = Schedule.every_steps(np.int64(50))
    assert schedule == Schedule.every_steps(50)
    assert type(schedule.every) is int
    assert type(Mark(np.int32(3), np.int64(7)).tokens) is int
    assert schedule.due(np.int64(50), np.int64(0), Mark(0, 0))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Schedule.every_steps(0), "Schedule.every=0"),
        (lambda: Schedule.every_steps(-5), "Schedule.every=-5"),
        (lambda: Schedule.every_steps(2.5), "Schedule.every=2.5"),
        (lambda: Schedule.every_steps(True), "Schedule.every=True"),
        (lambda: Schedule.every_steps("50"), "Schedule.every='50'"),
        (lambda: Schedule.every_tokens(0), "Schedule.every=0"),
        (lambda: Schedule.log_tokens(0), "Schedule.per_decade=0"),
        (lambda: Schedule.log_tokens(-1), "Schedule.per_decade=-1"),
        (lambda: Schedule.log_tokens(8.0), "Schedule.per_decade=8.0"),
        (lambda: Schedule.log_tokens(False), "Schedule.per_decade=False"),
        (lambda: Schedule.log_tokens(MAX_PER_DECADE + 1), f"in 1..{MAX_PER_DECADE}"),
        (lambda: Schedule(kind="epochs"), "Schedule.kind='epochs': allowed: 'steps'"),
        (lambda: Schedule(kind="steps"), "Schedule.every=None"),
        (lambda: Schedule(kind="steps", every=5, per_decade=8), "takes no per_decade"),
        (lambda: Schedule(kind="log_tokens", every=5), "takes no every"),
        (lambda: Schedule.from_dict({"kind": "steps", "evry": 5}), "unknown keys ['evry']"),
        (lambda: Schedule.from_dict([("kind", "steps")]), "need a mapping"),
        (lambda: Schedule().planned(-1, 4096), "total_steps=-1"),
        (lambda: Schedule().planned(10, 1.5), "tokens_per_step=1.5"),
        (lambda: Mark(-1, 0), "Mark.step=-1"),
        (lambda: Mark(0, None), "Mark.tokens=None"),
    ],
)
def test_bad_values_are_refused(make, match):
    """Every bad setting raises ConfigError naming the field and the value."""
    with pytest.raises(ConfigError, match=re.escape(match)):
        make()


@pytest.mark.parametrize(
    "schedule",
    [Schedule(), Schedule.log_tokens(3), Schedule.every_steps(50), Schedule.every_tokens(10**9)],
)
def test_dict_round_trip(schedule):
    """to_dict is JSON-able and from_dict rebuilds an equal schedule."""
    data = json.loads(json.dumps(schedule.to_dict()))
    assert Schedule.from_dict(data) == schedule


def test_default_is_log_tokens():
    """Schedule() is the callbacks' default, log_tokens(8), also when rebuilt from {}."""
    assert Schedule() == Schedule.log_tokens() == Schedule.from_dict({})
    assert Schedule().per_decade == DEFAULT_PER_DECADE


@pytest.mark.parametrize(
    ("schedule", "text"),
    [
        (Schedule(), "log-spaced, 8 per decade of tokens"),
        (Schedule.every_steps(50), "every 50 steps"),
        (Schedule.every_steps(1), "every step"),
        (Schedule.every_tokens(1_000_000), "every 1,000,000 tokens"),
    ],
)
def test_describe(schedule, text):
    """describe gives one readable line."""
    assert schedule.describe() == text


@settings(deadline=None)
@given(schedule=schedules, total_steps=st.integers(0, 300), tokens_per_step=st.integers(0, 10**5))
def test_planned_marks_are_sorted_unique_with_start_and_end(schedule, total_steps, tokens_per_step):
    """Planned marks start at step 0, end at the final step, strictly increase in step."""
    marks = schedule.planned(total_steps, tokens_per_step)
    steps = [m.step for m in marks]
    assert steps[0] == 0
    assert steps[-1] == total_steps
    assert all(a < b for a, b in pairwise(steps))
    assert all(m.tokens == m.step * tokens_per_step for m in marks)
    assert marks == simulate(schedule, [s * tokens_per_step for s in range(total_steps + 1)])


@settings(deadline=None)
@given(schedule=schedules, steps_tokens=increments)
def test_marks_are_exactly_where_the_position_grows(schedule, steps_tokens):
    """With any per-step tokens, marks are step 0, each step whose position grew, and the end."""
    tokens = token_counts(steps_tokens)
    end = len(tokens) - 1
    positions = [reference_position(schedule, s, t) for s, t in enumerate(tokens)]
    grew = {s for s in range(1, end + 1) if positions[s] > positions[s - 1]}
    expected = sorted({0, end} | grew)
    assert [m.step for m in simulate(schedule, tokens)] == expected


@settings(deadline=None)
@given(per_decade=st.integers(1, 16), steps_tokens=increments)
def test_log_tokens_at_most_per_decade_plus_one_per_decade(per_decade, steps_tokens):
    """Log-spaced: one mark per bucket at most, so <= per_decade + 1 (the end) per decade."""
    schedule = Schedule.log_tokens(per_decade)
    marks = simulate(schedule, token_counts(steps_tokens))
    buckets = [log_bucket(m.tokens, per_decade) for m in marks[:-1]]
    assert all(a < b for a, b in pairwise(buckets))
    decades = [len(str(m.tokens)) - 1 for m in marks if m.tokens > 0]  # exact floor(log10)
    assert all(decades.count(d) <= per_decade + 1 for d in set(decades))


@settings(deadline=None)
@given(schedule=schedules, steps_tokens=increments, data=st.data(), lost=st.booleans())
def test_resume_gives_the_same_marks(schedule, steps_tokens, data, lost):
    """Resuming at checkpoint step k with the store's marks up to k gives the uninterrupted marks.

    The resumed driver calls `due` again at step k. With `lost`, the snapshot at step k itself
    never reached the store (a crash between checkpoint and write) and is taken on resume.
    """
    tokens = token_counts(steps_tokens)
    full = simulate(schedule, tokens)
    k = data.draw(st.integers(0, len(tokens) - 1), label="k")
    kept = [m for m in full if m.step < k or (m.step == k and not lost)]
    resumed = simulate(schedule, tokens, start=k, last=kept[-1] if kept else None)
    assert kept + resumed == full
