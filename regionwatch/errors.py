"""The one small exception hierarchy of regionwatch (STYLE.md §2.4)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from numbers import Integral
from typing import Any


class RegionWatchError(Exception):
    """Base class of every error regionwatch raises on purpose."""


class ConfigError(RegionWatchError, ValueError):
    """A configuration value or input is invalid; the message names it and says how to fix it."""


class UnsupportedModelError(RegionWatchError, ValueError):
    """The model's architecture or layout cannot be probed as asked."""


class CheckpointError(RegionWatchError):
    """A checkpoint cannot be found, read, or matched to a model."""


class StoreError(RegionWatchError):
    """A run directory or one of its files is missing, damaged, or of another run."""


def check_keys(owner: str, data: Any, known: Iterable[str]) -> None:
    """Refuse settings that are not a mapping or hold unknown keys (STYLE.md §2.3).

    A typo in a YAML file or a saved config must not silently run another experiment.

    Raises:
        ConfigError: naming the owner, the unknown keys and the known ones.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{owner}: need a mapping of settings, got {type(data).__name__}")
    known = set(known)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{owner}: unknown keys {unknown}; known: {sorted(known)}")


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int = 0,
    maximum: int | None = None,
    hint: str = "",
    integral: bool = False,
    error: type[RegionWatchError] = ConfigError,
) -> int:
    """`value` as a plain int in minimum..maximum; every integer setting is checked here.

    Bools are refused although Python counts them as ints: `steps=True` is a mistake, never a
    count. Other integer types (numpy's) only with `integral`: a setting that is stored or
    saved as JSON as given must be a plain int.

    Args:
        name: the setting as the user wrote it, e.g. "ProbeConfig.grid" or "--tokens-per-step".
        value: the value given.
        minimum: the smallest allowed value.
        maximum: the largest allowed value; None for no bound.
        hint: what the value means or how to fix it, added to the message in parentheses.
        integral: also accept any `numbers.Integral` (numpy integers), returned as int.
        error: the error to raise (a ConfigError unless the bound comes from the model).

    Returns:
        `value` as an int.

    Raises:
        ConfigError (or `error`): naming the setting, the value and the allowed range.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, Integral if integral else int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        allowed = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise error(f"{name}={value!r}: need an int {allowed}" + (f" ({hint})" if hint else ""))
    return int(value)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name if empty): for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
