"""Durable file writes: a file is either absent, its old content, or its whole new content.

Every file regionwatch writes into a run directory goes through `write_atomic`: the bytes go to
a temporary sibling (same directory, so the rename never crosses a filesystem), are flushed and
fsynced, and only then `os.replace` swaps the name over; fsyncing the directory makes the rename
itself survive a power cut. A reader opening the name therefore never sees a partial file, and a
crash at any point leaves at most a temporary file, which `clean_temp_files` recognises by
`TEMP_MARK` and removes the next time a writer opens the directory.

POSIX only (Linux, macOS): it relies on `os.replace` being atomic and on fsync of a directory.
This module imports only the standard library (and `regionwatch.errors`), so any layer may use it;
that makes it also the home of the JSON form of a float (`json_float`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from regionwatch.errors import ConfigError, StoreError

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".rwtmp"
# Glob of every temporary name `temp_path` makes: hidden (a leading dot keeps it out of `ls` and of
# globs like `*.json`) and ending in TEMP_SUFFIX, so that nothing else in a run matches it.
TEMP_MARK = f".*{TEMP_SUFFIX}"
DIGEST_ALGORITHM = "sha256"  # the hash the store's index records for every snapshot file
FILE_MODE = 0o666  # before the umask, as open() does; mkstemp's 0o600 would hide runs from others


def temp_path(path: str | Path) -> Path:
    """A fresh temporary name beside `path` that `TEMP_MARK` matches.

    Public so that a directory written as a whole (a probe set) can use the same mark and be
    cleaned up by `clean_temp_files` too.

    Args:
        path: the final name.

    Returns:
        `<dir>/.<name>.<32 hex digits>.rwtmp`; unique, so concurrent writers never collide.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Replace `path` with `data` so that readers see the old file or the whole new one.

    Order: write a temporary sibling, flush, fsync, `os.replace` onto `path`, fsync the
    directory. A crash before the rename leaves `path` untouched and a temporary file behind.

    Args:
        path: the file to write; its directory must exist.
        data: the complete new content.

    Returns:
        `path`.

    Raises:
        StoreError: the file cannot be written (disk full, permissions); the temporary file is
            removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
        sync_dir(path.parent)
    except OSError as err:
        # Only OSError: anything else (a kill, KeyboardInterrupt) is a crash, whose temporary file
        # the next open removes.
        tmp.unlink(missing_ok=True)
        raise StoreError(
            f"cannot write {path}: {err}; check free space and permissions of {path.parent}"
        ) from err
    return path


def append_whole(path: str | Path, data: bytes) -> Path:
    """Append `data` to an existing file so that it ends with all of `data` or none of it.

    For append-only logs (a run's index): one `write` at the end, then fsync. A short write (a
    disk that filled meanwhile) or an error cuts the file back to its old length, so the next
    append never lands after half a line. A reader racing the write may see part of `data`: give
    each record a terminator (a newline) and treat an unterminated tail as not yet written; a
    crash mid-write can leave such a tail, which the log's owner removes before appending again.

    Args:
        path: the file; never followed if it is a symbolic link (`O_NOFOLLOW`).
        data: the bytes to add.

    Returns:
        `path`.

    Raises:
        StoreError: the file cannot be written (disk full, permissions); it keeps its old length.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    except OSError as err:
        raise StoreError(f"cannot append to {path}: {err}") from err
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        except OSError as err:
            os.ftruncate(fd, end)  # frees space, so it succeeds on a full disk
            raise StoreError(
                f"cannot append to {path}: {err}; check free space and permissions of {path.parent}"
            ) from err
    finally:
        os.close(fd)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write `obj` as strict JSON (indented, newline-terminated) with `write_atomic`.

    Args:
        path: the file to write.
        obj: JSON-serializable data; NaN and infinities are refused, as other tools reject them.

    Returns:
        `path`.

    Raises:
        ConfigError: `obj` is not strict JSON (the message names the file it was meant for).
        StoreError: the file cannot be written.
    """
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"cannot store {Path(path).name}: its content is not strict JSON ({err}); pass "
            "only str, int, finite float, bool, None, lists and dicts with str keys"
        ) from err
    return write_atomic(path, (text + "\n").encode("utf-8"))


def json_float(value: float) -> float | None:
    """A float as strict JSON holds it: NaN and infinities (no JSON form) become null.

    The one place regionwatch encodes a missing number for JSON (records, headers, the index);
    `float_from_json` reads it back.
    """
    value = float(value)
    return value if math.isfinite(value) else None


def float_from_json(value: float | None) -> float:
    """The float `json_float` stored: null reads back as NaN."""
    return math.nan if value is None else float(value)


def sync_dir(path: str | Path) -> None:
    """Fsync a directory, so that renames and unlinks in it survive a power cut.

    Args:
        path: the directory.

    Raises:
        OSError: the directory cannot be opened or synced.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_temp_files(directory: str | Path) -> list[Path]:
    """Remove what crashed writers left in `directory`: every entry matching `TEMP_MARK`.

    Only call this while no writer can be writing into `directory` (the store holds its writer
    lock): a live writer's temporary file looks exactly like a crashed one's. Directories that
    match (a probe set written as a whole) are removed with their content.

    Args:
        directory: the directory to clean; a missing one has nothing to clean.

    Returns:
        The removed paths, sorted.

    Raises:
        StoreError: a leftover cannot be removed (permissions).
    """
    removed = []
    for leftover in sorted(Path(directory).glob(TEMP_MARK)):
        try:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink(missing_ok=True)
        except OSError as err:
            raise StoreError(
                f"cannot remove {leftover}, left by an interrupted write: {err}; delete it by hand"
            ) from err
        logger.info("removed %s, left by an interrupted write", leftover)
        removed.append(leftover)
    return removed


def read_bytes(path: str | Path) -> bytes:
    """A file's content, refusing to follow a symbolic link at its name (`O_NOFOLLOW`).

    Run directories are read with this: a link planted inside one must never make regionwatch
    read (or, through a later write, touch) a file elsewhere.

    Args:
        path: the file.

    Returns:
        Its bytes.

    Raises:
        OSError: the file cannot be read; `errno.ELOOP` if `path` is a symbolic link.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as file:
        return file.read()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content as hex, read in chunks (snapshot files can be large).

    Args:
        path: the file.

    Returns:
        64 hex digits.

    Raises:
        StoreError: the file cannot be read (the message names it).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # as `read_bytes`: never via a link
        with os.fdopen(fd, "rb") as file:
            return hashlib.file_digest(file, DIGEST_ALGORITHM).hexdigest()
    except OSError as err:
        raise StoreError(f"cannot read {path} to check its hash: {err}") from err


def bytes_digest(data: bytes) -> str:
    """SHA-256 of bytes already in memory as hex; equals `file_digest` of a file holding them."""
    return hashlib.new(DIGEST_ALGORITHM, data).hexdigest()
