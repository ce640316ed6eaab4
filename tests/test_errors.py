"""`errors.check_int`, the one integer check, and the settings that go through it."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from regionwatch.checkpoints import discover
from regionwatch.corpus import train_tokenizer
from regionwatch.demo import DemoConfig
from regionwatch.errors import ConfigError, UnsupportedModelError, check_int
from regionwatch.measurement import ProbeConfig, check_budget
from regionwatch.monitor import WatchConfig
from regionwatch.probes import ProbeSet
from regionwatch.schedule import Mark, Schedule
from regionwatch.tensorboard import TensorBoardSink, tensorboard_command


@given(
    value=st.integers(-(10**12), 10**12),
    minimum=st.integers(-100, 100),
    width=st.none() | st.integers(0, 200),
)
def test_an_int_passes_exactly_inside_its_range(
    value: int, minimum: int, width: int | None
) -> None:
    """Inside minimum..maximum it comes back unchanged; outside, the message names it all."""
    maximum = None if width is None else minimum + width
    inside = value >= minimum and (maximum is None or value <= maximum)
    if inside:
        assert check_int("n", value, minimum=minimum, maximum=maximum) == value
        return
    allowed = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
    with pytest.raises(ConfigError, match=re.escape(f"n={value}: need an int {allowed}")):
        check_int("n", value, minimum=minimum, maximum=maximum)


@given(value=st.booleans() | st.floats() | st.text(max_size=3) | st.none())
def test_bools_and_non_ints_are_refused(value: object) -> None:
    """True is an int to Python, never a count; floats (even 2.0), strings and None neither."""
    with pytest.raises(ConfigError, match=re.escape(f"n={value!r}: need an int >= ")):
        check_int("n", value, minimum=-1)


def test_numpy_ints_when_asked_and_the_error_type_and_hint() -> None:
    """numpy integers only where asked (they would not survive JSON as given); a bound the model
    sets raises the caller's error type."""
    assert type(check_int("n", np.int64(3), integral=True)) is int
    with pytest.raises(ConfigError, match=r"n=np\.int64\(3\)|n=3"):
        check_int("n", np.int64(3))
    with pytest.raises(UnsupportedModelError, match=r"layer=4: need an int in 0\.\.2 \(3 blocks\)"):
        check_int("layer", 4, maximum=2, hint="3 blocks", error=UnsupportedModelError)


# Every integer setting of the public API refuses a bool, naming itself.
BOOL_REFUSED: list[tuple[Callable[[], object], str]] = [
    (lambda: ProbeConfig(write_layer=True), "ProbeConfig.write_layer=True"),
    (lambda: ProbeConfig(num_alphas=True), "num_alphas=True"),
    (lambda: ProbeConfig(grid=True), "grid=True"),
    (lambda: check_budget(True), "max_batch_tokens=True"),
    (lambda: WatchConfig(seed=True), "WatchConfig.seed=True"),
    (lambda: Schedule.every_steps(True), "Schedule.every=True"),
    (lambda: Schedule.log_tokens(True), "Schedule.per_decade=True"),
    (lambda: Mark(True, 0), "Mark.step=True"),
    (lambda: DemoConfig(steps=True), "DemoConfig.steps=True"),
    (lambda: DemoConfig(learning_rate=True), "DemoConfig.learning_rate=True"),
    (lambda: train_tokenizer(["text"], vocab_size=True), "vocab_size=True"),
    (lambda: tensorboard_command("logs", snapshots=True), "snapshots=True"),
    (lambda: TensorBoardSink("logs", purge_after_tokens=True), "purge_after_tokens=True"),
    (lambda: discover([], tokens_per_step=True), "--tokens-per-step=True"),
]


@pytest.mark.parametrize(("make", "match"), BOOL_REFUSED, ids=[m for _, m in BOOL_REFUSED])
def test_integer_settings_refuse_bools(make: Callable[[], object], match: str) -> None:
    """A bool where an int belongs is a ConfigError naming the setting and the value."""
    with pytest.raises(ConfigError, match=re.escape(match)):
        make()


def test_probe_set_sizes_refuse_bools(text_tokenizer) -> None:
    """ProbeSet.build's sizes and seed go through check_int too."""
    with pytest.raises(ConfigError, match=re.escape("ProbeSet.build: n_similar=True: need an int")):
        ProbeSet.build(text_tokenizer, n_similar=True)
