"""The run a user means: the directory given, or the one regionwatch run somewhere below it.

`regionwatch demo` prints its output folder, and a trainer's log dir holds the run a few levels
down (`<log dir>/regionwatch`, or `lightning_logs/version_0/regionwatch`); `show` and `report`
accept either and find the run, or list the runs when there are several.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Runs sit at most this deep below the folder given: <root>/lightning_logs/version_N/regionwatch
# is 3; one more level for a folder of such roots.
MAX_DEPTH = 4


def runs_below(folder: Path) -> tuple[list[Path], list[Path]]:
    """The regionwatch run directories at most `MAX_DEPTH` levels below `folder`, sorted.

    A run directory holds the store's config and index files; the search never descends into
    one (its snapshots are not runs) and never follows symlinks, which it returns beside the
    runs, so that a caller can name what it passed over.

    Returns:
        (the runs, the linked directories not entered), each sorted.
    """
    from regionwatch.store import CONFIG_FILE, INDEX_FILE

    found, links = [], []
    for here, dirs, files in os.walk(folder):
        depth = len(Path(here).relative_to(folder).parts)
        if CONFIG_FILE in files and INDEX_FILE in files:
            found.append(Path(here))
            dirs.clear()
            continue
        links += [Path(here) / d for d in dirs if (Path(here) / d).is_symlink()]
        if depth >= MAX_DEPTH:
            dirs.clear()
    return sorted(found), sorted(links)


def find_run(path: Path) -> Path:
    """`path` if it is a run directory, else the one run below it.

    Raises:
        StoreError: no run at or below `path`, or several below it (they are listed).
    """
    from regionwatch.errors import StoreError
    from regionwatch.store import CONFIG_FILE

    if (path / CONFIG_FILE).is_file() or not path.is_dir():
        return path  # the store names what is wrong with it, or that it does not exist
    found, links = runs_below(path)
    skipped = "; ".join(f"{link} -> {link.resolve()}" for link in links)
    if links and found:
        logger.warning("%s: symbolic links not searched for runs: %s", path, skipped)
    if len(found) == 1:
        return found[0]
    if not found:
        raise StoreError(
            f"{path} is not a regionwatch run directory, and none lies below it (a run holds "
            f"{CONFIG_FILE} and the snapshot index); "
            + (
                f"the search follows no symbolic links and passed over {skipped}: pass the "
                "run directory itself (a link given directly is fine)"
                if links
                else "pass the run_dir the training wrote, by default <trainer log dir>/regionwatch"
            )
        )
    listed = "\n  ".join(str(p) for p in found)
    raise StoreError(f"{path} holds {len(found)} regionwatch runs; pass one of them:\n  {listed}")
