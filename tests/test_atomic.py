"""Durable writes: whole-or-nothing files, crash leftovers found and removed, streamed hashes."""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import stat
import sys
from pathlib import Path

import pytest

from regionwatch import atomic
from regionwatch.atomic import (
    TEMP_MARK,
    bytes_digest,
    clean_temp_files,
    file_digest,
    sync_dir,
    temp_path,
    write_atomic,
    write_json_atomic,
)
from regionwatch.errors import ConfigError, StoreError


class SimulatedCrash(Exception):
    """Raised in place of os.replace: the process 'dies' between fsync and rename."""


def test_write_atomic_replaces_the_whole_file(tmp_path: Path) -> None:
    """The new bytes replace the old; nothing else is left in the directory."""
    path = tmp_path / "a.bin"
    path.write_bytes(b"old content")
    assert write_atomic(path, b"new") == path
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_write_atomic_files_are_readable_by_others(tmp_path: Path) -> None:
    """Files get the umask's mode (0o644 under umask 022), not a temp file's private 0o600."""
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


def test_a_crash_before_the_rename_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash before os.replace leaves the old content and a temp file that cleanup removes."""
    path = tmp_path / "index.jsonl"
    path.write_bytes(b"old")
    (tmp_path / "keep.json").write_text("{}")

    def crash(*args: object) -> None:
        raise SimulatedCrash

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        with pytest.raises(SimulatedCrash):
            write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    leftovers = list(tmp_path.glob(TEMP_MARK))
    assert len(leftovers) == 1
    assert leftovers[0].read_bytes() == b"new"  # whole, but never visible under the name
    assert clean_temp_files(tmp_path) == leftovers
    assert sorted(os.listdir(tmp_path)) == ["index.jsonl", "keep.json"]


def test_a_failed_write_is_a_store_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError (disk full) becomes a StoreError naming the file; the temp file is removed."""
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full)
        with pytest.raises(StoreError, match=rf"cannot write {path}: .*No space left"):
            write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_write_json_atomic_writes_strict_json(tmp_path: Path) -> None:
    """JSON round-trips; NaN or unserializable content is a ConfigError, and nothing is written."""
    path = write_json_atomic(tmp_path / "c.json", {"a": [1, 2.5, None], "b": "x"})
    assert path.read_text().endswith("}\n")
    assert json.loads(path.read_text()) == {"a": [1, 2.5, None], "b": "x"}
    with pytest.raises(ConfigError, match=r"d\.json.*not strict JSON"):
        write_json_atomic(tmp_path / "d.json", {"x": float("nan")})
    with pytest.raises(ConfigError, match="not strict JSON"):
        write_json_atomic(tmp_path / "d.json", {"x": object()})
    assert not (tmp_path / "d.json").exists()


def test_temp_names_match_the_mark_and_nothing_else_does(tmp_path: Path) -> None:
    """temp_path() names match TEMP_MARK, are unique and hidden; store files do not match."""
    names = {temp_path(tmp_path / "0000-0001.safetensors") for _ in range(3)}
    assert len(names) == 3
    for name in names:
        assert name.parent == tmp_path
        assert name.name.startswith(".0000-0001.safetensors.")
        name.write_bytes(b"")
    for other in ("index.jsonl", "0000-0001.json", ".hidden", "x.rwtmp.json"):
        (tmp_path / other).write_bytes(b"")
    assert set(tmp_path.glob(TEMP_MARK)) == names


def test_clean_temp_files_removes_temp_directories_too(tmp_path: Path) -> None:
    """A temp directory (a probe set written whole) left by a crash goes with its files."""
    leftover = temp_path(tmp_path / "probes")
    leftover.mkdir()
    (leftover / "manifest.json").write_text("{")
    assert clean_temp_files(tmp_path) == [leftover]
    assert not leftover.exists()
    assert clean_temp_files(tmp_path / "missing") == []


def test_file_digest_streams_the_sha256(tmp_path: Path) -> None:
    """file_digest equals hashlib's sha256, also over several read chunks; bytes_digest agrees."""
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest() == bytes_digest(data)
    with pytest.raises(StoreError, match=r"missing\.bin"):
        file_digest(tmp_path / "missing.bin")


def test_sync_dir_accepts_a_directory(tmp_path: Path) -> None:
    """sync_dir fsyncs a directory (the rename's durability) without error."""
    sync_dir(tmp_path)


def test_atomic_imports_only_the_standard_library() -> None:
    """Any layer may use atomic: it imports the stdlib and regionwatch.errors only."""
    tree = ast.parse(Path(atomic.__file__).read_text())
    names = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    names.discard("__future__")
    assert names - sys.stdlib_module_names == {"regionwatch.errors"}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_become_null_and_nan_again(value: float) -> None:
    """The JSON form of a float: non-finite is null (strict JSON), read back as NaN."""
    assert atomic.json_float(value) is None
    assert json.dumps({"x": atomic.json_float(value)}, allow_nan=False) == '{"x": null}'
    assert math.isnan(atomic.float_from_json(None))
    assert atomic.json_float(1.5) == atomic.float_from_json(1.5) == 1.5
