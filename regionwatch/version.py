"""The installed regionwatch's version, read once from the package metadata.

Modules that record the version (probe sets, run configs, the report page) import it from here,
not from the package root: `regionwatch/__init__.py` imports most modules, so reading
`regionwatch.__version__` from inside the package would be an upward (circular) import.
"""

from __future__ import annotations

from importlib import metadata


def _installed() -> str:
    try:
        return metadata.version("regionwatch")
    except metadata.PackageNotFoundError:  # a source tree on sys.path, never pip-installed
        return "unknown"


VERSION = _installed()
