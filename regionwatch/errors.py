"""The one small exception hierarchy of regionwatch (STYLE.md §2.4)."""

from __future__ import annotations


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
