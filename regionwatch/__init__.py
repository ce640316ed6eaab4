"""regionwatch: watch stable regions form in the residual stream while a language model trains.

The public contract is `__all__`. Driver classes (Lightning, HF Trainer) load lazily, so
`import regionwatch` never imports lightning or the HF Trainer.
"""

from __future__ import annotations

import importlib

from regionwatch.errors import (
    CheckpointError,
    ConfigError,
    RegionWatchError,
    StoreError,
    UnsupportedModelError,
)
from regionwatch.measure import (
    Curves,
    Measurement,
    ProbeConfig,
    RegionMaps,
    interpolate,
    measure,
    region_maps,
)
from regionwatch.probes import ProbeSet
from regionwatch.replay import ReplayResult, replay
from regionwatch.schedule import Schedule
from regionwatch.snapshot import Snapshot
from regionwatch.store import SnapshotStore
from regionwatch.version import VERSION

__version__ = VERSION

_LAZY = {
    "RegionMonitor": "regionwatch.lightning",
    "RegionMonitorCallback": "regionwatch.hf",
}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Curves",
    "Measurement",
    "ProbeConfig",
    "ProbeSet",
    "RegionMaps",
    "RegionMonitor",
    "RegionMonitorCallback",
    "RegionWatchError",
    "ReplayResult",
    "Schedule",
    "Snapshot",
    "SnapshotStore",
    "StoreError",
    "UnsupportedModelError",
    "__version__",
    "interpolate",
    "measure",
    "region_maps",
    "replay",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:  # lightning takes seconds to import; HF-only users never pay for it
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'regionwatch' has no attribute {name!r}")
