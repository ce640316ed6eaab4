"""regionwatch: watch stable regions form in the residual stream while a language model trains.

The public contract is `__all__`. Everything but the errors loads lazily (PEP 562), so
`import regionwatch` imports neither torch nor lightning nor the HF Trainer until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from regionwatch.errors import ConfigError, RegionWatchError
from regionwatch.version import VERSION

if TYPE_CHECKING:
    from regionwatch.decoder import Decoder
    from regionwatch.hf import RegionMonitorCallback
    from regionwatch.lightning import RegionMonitor
    from regionwatch.measurement import ProbeConfig, measure
    from regionwatch.monitor import Monitor, WatchConfig
    from regionwatch.probes import ProbeSet
    from regionwatch.replaying import replay
    from regionwatch.schedule import Schedule
    from regionwatch.snapshot import Snapshot
    from regionwatch.store import SnapshotStore

__version__ = VERSION

# Every name but the errors loads on first use: torch and transformers take seconds to import,
# and `regionwatch --help` (which imports this package) must answer at once; lightning and the
# HF Trainer load only for their driver's users. Everything else (result types, the other
# errors, helpers) stays importable from its own module, without the promise of `__all__`.
_LAZY = {
    "Decoder": "regionwatch.decoder",
    "ProbeConfig": "regionwatch.measurement",
    "measure": "regionwatch.measurement",
    "Monitor": "regionwatch.monitor",
    "WatchConfig": "regionwatch.monitor",
    "ProbeSet": "regionwatch.probes",
    "replay": "regionwatch.replaying",
    "Schedule": "regionwatch.schedule",
    "Snapshot": "regionwatch.snapshot",
    "SnapshotStore": "regionwatch.store",
    "RegionMonitor": "regionwatch.lightning",
    "RegionMonitorCallback": "regionwatch.hf",
}

__all__ = [
    "ConfigError",
    "Decoder",
    "Monitor",
    "ProbeConfig",
    "ProbeSet",
    "RegionMonitor",
    "RegionMonitorCallback",
    "RegionWatchError",
    "Schedule",
    "Snapshot",
    "SnapshotStore",
    "WatchConfig",
    "__version__",
    "measure",
    "replay",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'regionwatch' has no attribute {name!r}")
