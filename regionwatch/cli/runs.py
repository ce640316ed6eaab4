"""The run a user means: the directory given, or the one regionwatch run somewhere below it.

`regionwatch demo` prints its output folder, and a trainer's log dir holds the run a few levels
down (`<log dir>/regionwatch`, or `lightning_logs/version_0/regionwatch`); `show` and `report`
accept either and find the run, or list the runs when there are several.
"""

from __future__ import annotations

import os
from pathlib import Path

# Runs sit at most this deep below the folder given: <root>/lightning_logs/version_N/regionwatch
# is 3; one more level for a folder of such roots.
MAX_DEPTH = 4


def runs_below(folder: Path) -> list[Path]:
    """The regionwatch run directories at most `MAX_DEPTH` levels below `folder`, sorted.

    A run directory holds the store's config and index files; the search never descends into
    one (its snapshots are not runs) and never follows symlinks.
    """
    from regionwatch.store import CONFIG_FILE, INDEX_FILE

    found = []
    for here, dirs, files in os.walk(folder):
        depth = len(Path(here).relative_to(folder).parts)
        if CONFIG_FILE in files and INDEX_FILE in files:
            found.append(Path(here))
            dirs.clear()
        elif depth >= MAX_DEPTH:
            dirs.clear()
    return sorted(found)


def find_run(path: Path) -> Path:
    """`path` if it is a run directory, else the one run below it.

    Raises:
        StoreError: no run at or below `path`, or several below it (they are listed).
    """
    from regionwatch.errors import StoreError
    from regionwatch.store import CONFIG_FILE

    if (path / CONFIG_FILE).is_file() or not path.is_dir():
        return path  # the store names what is wrong with it, or that it does not exist
    found = runs_below(path)
    if len(found) == 1:
        return found[0]
    if not found:
        raise StoreError(
            f"{path} is not a regionwatch run directory, and none lies below it (a run holds "
            f"{CONFIG_FILE} and the snapshot index); pass the run_dir the training wrote, by "
            "default <trainer log dir>/regionwatch"
        )
    listed = "\n  ".join(str(p) for p in found)
    raise StoreError(f"{path} holds {len(found)} regionwatch runs; pass one of them:\n  {listed}")
