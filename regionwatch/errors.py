"""The one small exception hierarchy of regionwatch (STYLE.md §2.4)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
