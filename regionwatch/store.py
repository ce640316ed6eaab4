"""`SnapshotStore`: a run directory holding the probe set, the config and every snapshot.

Why one module of about 800 lines (a third docstrings), twice STYLE.md's ~400: the write
protocol, the open-time repair of each of its crash points, the index format both rely on and the
writer lock are one crash-safety argument, kept in one file so that it can be checked in one
read. Splitting it would put a crash point and its repair in different files. The generic part,
durable file writes, lives in `regionwatch.atomic`.

Layout (STORE_FORMAT_VERSION 1)::

    run_dir/config.json        run id, ProbeConfig.to_dict(), fingerprints, versions, info
    run_dir/probes/            the ProbeSet (ProbeSet.save)
    run_dir/snapshots/<tokens:016d>-<step:010d>.safetensors   arrays; metadata holds the header
    run_dir/snapshots/<same>.json                             sidecar: its index row (commit record)
    run_dir/index.jsonl        every snapshot's row, for listing without torch
    run_dir/failures.jsonl     failed measurements (never counted as snapshots)
    run_dir/writer.lock        flock of the one writer

Index format, readable by any tool without regionwatch: UTF-8 JSON lines. Line 1 is
`{"format": "regionwatch.index", "format_version": 1, "run_id": ...}`; each further line is one
snapshot, sorted by (tokens, step): the keys of `Snapshot.record()` (NaN as null) plus `file` (name
under snapshots/), `size` (bytes) and `sha256` (hex) of the safetensors file. failures.jsonl has
the same first line (format "regionwatch.failures") and rows {step, tokens, error, wall_time}.

Write protocol. The sidecar is the commit record; the index is derived from the sidecars and is
what readers list; every file becomes visible only by `atomic.write_atomic` (temp, fsync,
`os.replace`, fsync dir). `write` goes: (1) retire the step's old snapshot if any: unlink its
sidecar, rewrite the index without it, unlink its data file; (2) the data file; (3) the sidecar;
(4) the index: the row is appended as one newline-terminated line (`atomic.append_whole`) when
it sorts last, as in training, so a write costs the same at the 2,000th snapshot as at the 10th;
an earlier point (a replay filling a gap) rewrites the index. The writer keeps its own view of
the index, so a write reads nothing back. Crash analysis: a crash inside any atomic write leaves a
temp file, removed on the next open. After (1)'s unlink the old snapshot is uncommitted and the
open drops its row and data. After (2) the data file has no sidecar and is removed on open. After
(3), or inside (4)'s append (a torn last line without its newline, which readers skip as not yet
written), the open finds a sidecar the index lacks, checks the data file's size and sha256, and
rewrites the index with it. So a reopened store shows for that step the old snapshot, none, or
the new one, never a half or mismatched file; readers see only whole index rows. A write that
fails (a full disk) removes its sidecar, so the step stays not stored, as its caller records it.
`truncate_after` follows (1) for each dropped step (one rewrite: the compaction of a resume).
Failure rows are appended the same way; a row the disk refuses is kept and retried at the next
write and at `close`.

Concurrency: one writer per run, any number of readers. The writer holds an exclusive `flock` on
writer.lock from `create` (or its first write, or `repair`) until `close` or exit; the kernel drops
it when a process dies, so a crash leaves no stale lock. A second writer gets a StoreError. Crash
repair (temp files, orphans, index reconciliation) is the writer's alone, run when it takes the
lock: readers (`show`, `report`, TensorBoard) never write, truncate or delete anything, so a reader
pointed at the wrong directory cannot harm it. The lock and `os.replace` assume a local POSIX
filesystem.

Links: nothing inside a run directory is followed. A symbolic link in place of config.json,
probes/, snapshots/, the index, failures.jsonl or writer.lock is refused when the store opens (a
linked snapshots/ would let crash repair delete files elsewhere; a linked lock would truncate its
target), and every file is opened with `O_NOFOLLOW`. The run directory itself may be a link.

Damage is reported, never repaired away: a snapshot whose sidecar was altered but whose data still
matches the index stays indexed, and `verify` names the sidecar.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

import safetensors.torch
from safetensors import SafetensorError

from regionwatch.atomic import (
    TEMP_MARK,
    append_whole,
    bytes_digest,
    clean_temp_files,
    file_digest,
    read_bytes,
    sync_dir,
    write_atomic,
    write_json_atomic,
)
from regionwatch.errors import ConfigError, StoreError
from regionwatch.probes import ProbeSet
from regionwatch.results import ProbeConfig
from regionwatch.snapshot import POSITION_KEY, Snapshot, position_unknown
from regionwatch.version import VERSION

if TYPE_CHECKING:
    import pandas
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1  # bump, and keep a reader for the old one, whenever the layout changes
RUN_FORMAT, INDEX_FORMAT = "regionwatch.run", "regionwatch.index"
SIDECAR_FORMAT, FAILURES_FORMAT = "regionwatch.sidecar", "regionwatch.failures"
CONFIG_FILE, PROBES_DIR, SNAPSHOTS_DIR = "config.json", "probes", "snapshots"
INDEX_FILE, FAILURES_FILE, LOCK_FILE = "index.jsonl", "failures.jsonl", "writer.lock"
HEADER_KEY = "regionwatch.header"  # safetensors metadata key of Snapshot.header() as JSON
# Zero-padded so that file names sort like (tokens, step): 16 digits hold 10^15 tokens, 10 digits
# 10^9 steps, far beyond any pretraining run (Llama 3: 1.5e13 tokens).
TOKENS_DIGITS, STEP_DIGITS = 16, 10
RUN_ID_CHARS = 12
DEFAULT_RUN_NAME = "regionwatch"  # a run dir's name inside a trainer's log dir (or a demo's out)
WRITER_LOCK_WAIT_S = 5.0  # an opener's cleanup holds the lock for milliseconds; a writer, hours
LOCK_POLL_S = 0.05
CHECK_ATTEMPTS = 3  # listings re-read an index a writer replaced meanwhile, at most this often
SAFETENSORS_LENGTH_BYTES = 8  # a safetensors file starts with its JSON header's length (u64 LE)
ROW_TYPES = {"step": int, "tokens": int, "file": str, "size": int, "sha256": str}
FAILURE_TYPES = {"step": int, "tokens": int, "error": str, "wall_time": float}
# What an interrupted `create` may leave behind; anything else in a directory makes it not ours.
CREATE_LEFTOVERS = frozenset({PROBES_DIR, SNAPSHOTS_DIR, INDEX_FILE, LOCK_FILE})
_FORMATS = {INDEX_FILE: INDEX_FORMAT, FAILURES_FILE: FAILURES_FORMAT}
# Every entry of a run directory the store opens; none may be a symbolic link.
MISSING = "missing"  # what `_read_sidecar` says of a sidecar that is not there
RUN_ENTRIES = (CONFIG_FILE, PROBES_DIR, SNAPSHOTS_DIR, INDEX_FILE, FAILURES_FILE, LOCK_FILE)
# Free space a run needs to start, as `bytes_to_start` estimates it: 8 bytes per number stored
# (float64 at most), a run's JSON files and each snapshot's header, sidecar and index row, and
# room for the baseline and the next snapshot (a disk that holds less fails at once).
BYTES_PER_NUMBER = 8
JSON_BYTES = 64 * 1024
SNAPSHOTS_TO_START = 2


class Damage(NamedTuple):
    """One problem `SnapshotStore.verify` found: the file and what is wrong with it."""

    file: Path
    reason: str


class SnapshotStore:
    """The run directory: probe set, config and one snapshot per measured step.

    Open an existing run with `SnapshotStore(path)` (readers: reports, TensorBoard, `show`), or
    create or resume one with `SnapshotStore.create` (the writer). See the module docstring for
    the layout, the index format and the crash-safe write protocol.

    Args:
        path: an existing run directory.

    Attributes:
        path: the run directory.
        run_id: the run's id, stamped on every snapshot.
        config: the run's ProbeConfig, as saved.
        probe_fingerprint: `ProbeSet.fingerprint` of the run's probe set.
        info: free-form facts given to `create`.

    Raises:
        StoreError: `path` is not a run directory, its config.json is damaged or newer, or an
            entry of it is a symbolic link.

    Example:
        >>> store = SnapshotStore.create(run_dir, probes=probes, config=ProbeConfig())
        >>> store.write(snapshot)
        >>> SnapshotStore(run_dir).read(snapshot.step).step == snapshot.step
        True
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._snapshots = self.path / SNAPSHOTS_DIR
        self._lock: IO[bytes] | None = None
        # The writer's view of the index, {step: row}, valid while it holds the lock (only it
        # writes): a write appends one line instead of re-reading and rewriting the whole index.
        self._index: dict[int, dict[str, Any]] | None = None
        self._pending: list[dict[str, Any]] = []  # failure rows a full disk refused, retried
        _refuse_links(self.path)
        meta = _read_run_config(self.path / CONFIG_FILE)
        try:
            self.run_id: str = meta["run_id"]
            self.probe_fingerprint: str = meta["probe_fingerprint"]
            self.config = ProbeConfig.from_dict(meta["config"])
            self.info: dict[str, Any] = dict(meta.get("info") or {})
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(f"{self.path / CONFIG_FILE}: malformed ({err!r})") from err
        # Nothing more: a reader writes nothing, not even crash repair (see `repair`).

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        probes: ProbeSet,
        config: ProbeConfig,
        run_id: str | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> SnapshotStore:
        """Create a run directory, or reopen it for writing if it holds this very run.

        Resume and replay call this again on their run dir: it opens the run if its probe set
        and config fingerprints (and `run_id`, if given) match, and refuses otherwise. A reopened
        run keeps its own run id, config.json and info (`info` is then not written).

        Args:
            path: the run directory; created, or empty, or an earlier run of the same settings.
            probes: the probe set every snapshot measures; saved to probes/.
            config: the measurement settings; saved to config.json.
            run_id: the run's id; default a fresh random 12-hex-digit id.
            info: free-form JSON facts about the run (model, data, host).

        Returns:
            The store, holding the writer lock.

        Raises:
            StoreError: `path` holds something else, another run's settings, or a live writer.
            ConfigError: `info` is not JSON-serializable.
        """
        path = Path(path)
        _refuse_links(path)
        if not (path / CONFIG_FILE).exists():
            _check_empty(path)
            path.mkdir(parents=True, exist_ok=True)
            lock = _acquire_lock(path, wait_s=WRITER_LOCK_WAIT_S)
            if lock is None:
                raise StoreError(f"{path}: another process is creating or writing this run")
            try:
                if not (path / CONFIG_FILE).exists():  # else another creator won the race
                    run_id = run_id or uuid.uuid4().hex[:RUN_ID_CHARS]
                    _write_run(path, probes=probes, config=config, run_id=run_id, info=info)
            finally:
                lock.close()
        store = cls(path)
        store._check_same_run(probes, config, run_id)
        store._lock_for_writing()
        return store

    def probes(self, *, tokenizer: PreTrainedTokenizerBase | None = None) -> ProbeSet:
        """Load the run's probe set (checked against `tokenizer` if given)."""
        return ProbeSet.load(self.path / PROBES_DIR, tokenizer=tokenizer)

    def write(self, snapshot: Snapshot) -> Path:
        """Store a snapshot atomically; a snapshot of the same step is replaced.

        Args:
            snapshot: a snapshot of this run (run id, probe and config fingerprints match).

        Returns:
            The snapshot's safetensors file.

        Raises:
            StoreError: the snapshot belongs to another run or settings, another process is
                writing, or the disk refuses the write.
            ConfigError: step or tokens negative or wider than the file name's digits.
        """
        self._check_snapshot(snapshot)
        index = self._writer_index()
        self._flush_failures(quietly=True)  # a freed disk takes the rows it refused first
        header = snapshot.header()
        try:
            metadata = {HEADER_KEY: json.dumps(header, allow_nan=False)}
        except (TypeError, ValueError) as err:
            raise ConfigError(f"snapshot of step {snapshot.step}: header not JSON ({err})") from err
        data = safetensors.torch.save(snapshot.arrays(), metadata=metadata)
        data_path = self._snapshots / f"{_stem(snapshot.tokens, snapshot.step)}.safetensors"
        row = {**snapshot.record(), "file": data_path.name, "size": len(data)}
        row["sha256"] = bytes_digest(data)
        sidecar = {"format": SIDECAR_FORMAT, "format_version": STORE_FORMAT_VERSION, "row": row}
        if snapshot.step in index:
            self._retire(self._snapshots / index[snapshot.step]["file"])
        try:
            write_atomic(data_path, data)
            write_json_atomic(data_path.with_suffix(".json"), sidecar)  # header: in the data file
            self._add_row(row)
        except StoreError:
            # Not stored, so not committed: the caller records the step as failed, and a sidecar
            # left here would have the next repair index it after all. The next write repairs.
            self._index = None
            data_path.with_suffix(".json").unlink(missing_ok=True)
            raise
        logger.debug("stored step %d (%d tokens) as %s", snapshot.step, snapshot.tokens, data_path)
        return data_path

    def read(self, step: int) -> Snapshot:
        """Load the snapshot of `step`, checking size, sha256, format and header on the way.

        Args:
            step: the global step the snapshot was taken at.

        Returns:
            The snapshot, equal to the one written (derived numbers recomputed by `metrics`).

        Raises:
            StoreError: no snapshot at `step`, or its file is missing or damaged (the message
                names the file and the reason: size, hash, unreadable safetensors, header).
        """
        row = self._row(step)
        try:
            return self._load(row)
        except StoreError:
            fresh = self._row(step)  # the writer may have replaced the step while we read it
            if fresh == row:
                raise
            return self._load(fresh)

    def read_record(self, record: Mapping[str, Any]) -> Snapshot:
        """Load the snapshot a `records()` row names, as `read` does, without re-reading the index.

        Going through every record with `read` would parse the index once per snapshot; this
        keeps a reader of the whole run (a report) linear in the run's length.

        Raises:
            StoreError: as `read`.
        """
        try:
            return self._load(record)
        except StoreError:
            return self.read(record["step"])  # the writer may have replaced it since the listing

    def steps(self) -> list[int]:
        """The steps with a readable snapshot, ascending."""
        return sorted(row["step"] for row in self.records())

    def records(self) -> list[dict[str, Any]]:
        """One row per snapshot, sorted by (tokens, step): the `show --json` lines.

        Reads only index.jsonl and stats the files (no tensors, no hashing): a row whose file is
        missing or has the wrong size is skipped with a warning. Bit rot of the right size is
        only found by `verify` or `read`.
        """
        rows, lines, problems = self._checked_rows(hash_it=False)
        for problem in lines:
            logger.warning("%s: %s; skipped", self.path / INDEX_FILE, problem)
        for name, problem in problems.items():
            logger.warning("skipping %s: %s", self._snapshots / name, problem)
        return [
            {**row, POSITION_KEY: list(position_unknown(row, self.info))}  # older rows lack it
            for row in rows
            if row["file"] not in problems
        ]

    def verify(self) -> list[Damage]:
        """Check every indexed file's size and sha256, and its sidecar, against the index.

        Loads no tensors.

        Returns:
            One `Damage` per damaged index line, per missing, truncated or altered data file,
            and per damaged or disagreeing sidecar.
        """
        rows, lines, problems = self._checked_rows(hash_it=True)
        damage = [Damage(self.path / INDEX_FILE, problem) for problem in lines]
        damage += [Damage(self._snapshots / name, why) for name, why in problems.items()]
        for row in rows:
            sidecar = (self._snapshots / row["file"]).with_suffix(".json")
            committed, problem = _read_sidecar(sidecar)
            if problem == MISSING:
                continue  # not damage: an interrupted retire (step 1 of `write`), undone on repair
            if problem is None and committed != row:
                problem = "row differs from the index's (altered after the write)"
            if problem is not None:
                damage.append(Damage(sidecar, f"sidecar {problem}"))
        return damage

    def repair(self) -> None:
        """Become the writer and repair what a crashed writer left (see the module docstring).

        Readers never repair; `create`, `write` and `truncate_after` call this themselves.

        Raises:
            StoreError: another writer holds the lock, or the run is read-only.
        """
        self._lock_for_writing()

    def latest(self) -> tuple[int, int] | None:
        """(step, tokens) of the snapshot with the highest step, or None for an empty run."""
        rows = self.records()
        newest = max(rows, key=lambda row: row["step"], default=None)
        return None if newest is None else (newest["step"], newest["tokens"])

    def truncate_after(self, step: int) -> list[int]:
        """Drop every snapshot and failure after `step` (resuming from an older checkpoint).

        Returns:
            The dropped snapshots' steps, ascending.
        """
        self._writer_index()
        stems = {p: _parse_stem(p.stem) for p in self._snapshots.glob("*.json")}
        doomed = {p: stem[1] for p, stem in stems.items() if stem is not None and stem[1] > step}
        self._retire(*doomed)
        dropped = sorted(doomed.values())
        self._pending = [f for f in self._pending if f["step"] <= step]
        failures = self.failures()
        if any(f["step"] > step for f in failures):
            self._write_rows(FAILURES_FILE, [f for f in failures if f["step"] <= step])
        if dropped:
            logger.info("%s: dropped snapshots after step %d: %s", self.path, step, dropped)
        return dropped

    def record_failure(self, *, step: int, tokens: int, error: str) -> None:
        """Record a failed measurement in failures.jsonl, so that reports can list it.

        A row the disk refuses is kept and retried, before every later write and at `close`,
        so that a disk freed later still receives it (`pending_failures` lists what waits).

        Raises:
            StoreError: the row cannot be written now (it stays pending).
        """
        self._writer_index()
        failure = {"step": int(step), "tokens": int(tokens), "error": str(error)}
        self._pending.append({**failure, "wall_time": time.time()})
        self._flush_failures(quietly=False)

    @property
    def pending_failures(self) -> list[dict[str, Any]]:
        """Failure rows not yet in failures.jsonl (the disk refused them), oldest first."""
        return list(self._pending)

    def failures(self) -> list[dict[str, Any]]:
        """The recorded failures, oldest first."""
        return _read_jsonl(self.path / FAILURES_FILE, FAILURES_FORMAT, FAILURE_TYPES)

    def to_pandas(self) -> pandas.DataFrame:
        """`records()` as a DataFrame, one row per snapshot.

        Raises:
            ImportError: pandas is not installed.
        """
        try:
            import pandas  # optional: only this method needs it
        except ImportError as err:
            raise ImportError(
                "SnapshotStore.to_pandas needs pandas, which is not installed: "
                "`pip install pandas`, or use records() for the same rows as dicts"
            ) from err
        return pandas.DataFrame.from_records(self.records())

    def close(self) -> None:
        """Write the pending failure rows if the disk now takes them; give up the writer lock.

        Readers need not call this. Rows the disk still refuses are named in a warning (and stay
        in `pending_failures`).
        """
        if self._lock is None:
            return
        self._flush_failures(quietly=True)
        if self._pending:
            logger.warning(
                "%s: could not record the failed snapshots of steps %s in %s (%s)",
                self.path,
                [f["step"] for f in self._pending],
                FAILURES_FILE,
                "the disk refused the write",
            )
        self._lock.close()
        self._lock = None
        self._index = None

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _writer_index(self) -> dict[int, dict[str, Any]]:
        """Become the writer (repairing crash leftovers) and return its view of the index."""
        self._lock_for_writing()
        if self._index is None:  # a failed write: the disk, not the view, is the truth
            self._maintain()
        assert self._index is not None  # set by `_maintain`
        return self._index

    def _add_row(self, row: dict[str, Any]) -> None:
        """Index a committed snapshot: one appended line, or a rewrite where order needs it.

        Training writes steps in order, so the row sorts last and is appended, at a cost
        independent of the run's length. A replaced step or an earlier point (a replay filling a
        gap) rewrites the index, keeping it sorted and one row per step (format version 1).
        """
        index = self._writer_index()
        last = index[next(reversed(index))] if index else None  # dicts keep the sorted order
        if row["step"] not in index and (
            last is None or (row["tokens"], row["step"]) > (last["tokens"], last["step"])
        ):
            append_whole(self.path / INDEX_FILE, _jsonl_line(row))
            index[row["step"]] = row
            return
        rows = _sorted([*(r for r in index.values() if r["step"] != row["step"]), row])
        self._write_rows(INDEX_FILE, rows)
        self._index = {r["step"]: r for r in rows}

    def _flush_failures(self, *, quietly: bool) -> None:
        """Append the pending failure rows, oldest first; stop at the first the disk refuses."""
        while self._pending:
            try:
                path = self.path / FAILURES_FILE
                if _ends_whole(path):
                    append_whole(path, _jsonl_line(self._pending[0]))
                else:  # none yet (or a crash tore its tail): write it whole
                    self._write_rows(FAILURES_FILE, [*self.failures(), self._pending[0]])
            except StoreError:
                if not quietly:
                    raise
                logger.debug(
                    "failure rows of steps %s still pending", [f["step"] for f in self._pending]
                )
                return
            self._pending.pop(0)

    def _lock_for_writing(self) -> None:
        if self._lock is not None:
            return
        lock = _acquire_lock(self.path, wait_s=WRITER_LOCK_WAIT_S)
        if lock is None:
            try:  # the holder wrote its pid into the lock file
                holder = read_bytes(self.path / LOCK_FILE).decode("utf-8", "replace").strip()
            except OSError:
                holder = "unknown"
            raise StoreError(
                f"{self.path}: another writer ({holder}) holds {LOCK_FILE}, or the run is "
                "read-only; a run has one writer: stop the other one, or use a new run directory"
            )
        self._lock = lock
        self._maintain()  # a writer that died since we opened may have left temp files

    def _maintain(self) -> None:
        """Under the lock: remove crash leftovers and rebuild the index from the sidecars."""
        clean_temp_files(self.path)
        clean_temp_files(self._snapshots)
        self._snapshots.mkdir(exist_ok=True)
        indexed = {row["file"]: row for row in self._rows()}
        rows: dict[int, dict[str, Any]] = {}
        committed = set()
        for path in sorted(self._snapshots.glob("*.json")):
            committed.add(path.with_suffix(".safetensors").name)  # damaged or not: keep its data
            row, problem = _read_sidecar(path)
            if row is None:
                # A damaged sidecar is damage to report, not a retired snapshot (retiring unlinks
                # the sidecar): if the index's row still matches the data, the snapshot stays.
                row = indexed.get(path.with_suffix(".safetensors").name)
                if row is None or _problem(self._snapshots / row["file"], row, hash_it=True):
                    logger.warning("%s: sidecar %s; its snapshot is not indexed", path, problem)
                    continue
                logger.warning(
                    "%s: sidecar %s; its data matches the index, so it stays indexed "
                    "(verify() reports it)",
                    path,
                    problem,
                )
            if indexed.get(row["file"]) != row:
                problem = _problem(self._snapshots / row["file"], row, hash_it=True)
                if problem:
                    logger.warning("not indexing %s: %s", self._snapshots / row["file"], problem)
                    continue
                logger.info("indexing %s, written before an interrupted index update", path.name)
            old = rows.get(row["step"])
            if old is not None:  # only a power cut that undid an unlink can leave two
                logger.warning("two snapshots of step %d; keeping the newer", row["step"])
                row = max(old, row, key=lambda r: r.get("wall_time") or 0.0)
            rows[row["step"]] = row
        for name in sorted(set(indexed) - {row["file"] for row in rows.values()}):
            logger.warning("dropping %s from the index: its sidecar is gone or damaged", name)
        for path in sorted(self._snapshots.glob("*.safetensors")):
            if path.name not in committed:
                path.unlink(missing_ok=True)
                logger.info("removed %s: a write interrupted before its sidecar", path)
        on_disk, problems = _parse_jsonl(self.path / INDEX_FILE, INDEX_FORMAT, ROW_TYPES)
        if problems or on_disk != _sorted(rows.values()) or not _ends_whole(self.path / INDEX_FILE):
            self._write_rows(INDEX_FILE, list(rows.values()))
            logger.info("%s: rebuilt %s from the snapshots' sidecars", self.path, INDEX_FILE)
        failures = self.path / FAILURES_FILE
        if failures.exists() and not _ends_whole(failures):  # an append torn by a crash
            self._write_rows(FAILURES_FILE, self.failures())
        self._index = {row["step"]: row for row in _sorted(rows.values())}

    def _retire(self, *files: Path) -> None:
        """Remove snapshots (given by data file or sidecar) from the disk and the index."""
        if not files:
            return
        index = self._writer_index()
        sidecars = [path.with_suffix(".json") for path in files]
        for sidecar in sidecars:
            sidecar.unlink(missing_ok=True)  # the commit record first: now uncommitted on reopen
        gone = {sidecar.with_suffix(".safetensors").name for sidecar in sidecars}
        kept = {step: row for step, row in index.items() if row["file"] not in gone}
        try:
            self._write_rows(INDEX_FILE, list(kept.values()))
        except StoreError:
            self._index = None  # the next write repairs from the sidecars
            raise
        self._index = kept
        for sidecar in sidecars:
            sidecar.with_suffix(".safetensors").unlink(missing_ok=True)
        sync_dir(self._snapshots)

    def _checked_rows(
        self, *, hash_it: bool
    ) -> tuple[list[dict[str, Any]], list[str], dict[str, str]]:
        """Index rows, damaged index lines, and {file: problem} for rows whose file is bad.

        A writer rewrites the index before it unlinks a replaced file, so a file that vanished
        while the index changed was replaced, not damaged: check again against the new index.
        """
        for _ in range(CHECK_ATTEMPTS):
            rows, lines = _parse_jsonl(self.path / INDEX_FILE, INDEX_FORMAT, ROW_TYPES)
            problems = {
                row["file"]: problem
                for row in rows
                if (problem := _problem(self._snapshots / row["file"], row, hash_it=hash_it))
            }
            if (
                not problems
                or _parse_jsonl(self.path / INDEX_FILE, INDEX_FORMAT, ROW_TYPES)[0] == rows
            ):
                break
        return rows, lines, problems

    def _rows(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.path / INDEX_FILE, INDEX_FORMAT, ROW_TYPES)

    def _row(self, step: int) -> dict[str, Any]:
        rows = self._rows()
        for row in rows:
            if row["step"] == step:
                return row
        steps = sorted(row["step"] for row in rows)
        known = f"steps {steps[0]}..{steps[-1]} ({len(steps)})" if steps else "no snapshots"
        raise StoreError(f"{self.path}: no snapshot at step {step}; the run has {known}")

    def _load(self, row: Mapping[str, Any]) -> Snapshot:
        path = self._snapshots / row["file"]
        try:
            data = read_bytes(path)
        except OSError as err:
            why = (
                "it is a symbolic link, which regionwatch never follows inside a run directory "
                "(replace it with the file it points to)"
                if err.errno == errno.ELOOP
                else str(err)
            )
            raise StoreError(
                f"{path}: cannot read the snapshot of step {row['step']}: {why}"
            ) from err
        # Hash the very bytes we load: a check on the file followed by a second read could pass
        # on one version and load another.
        problem = _problem(path, row, data=data)
        if problem:
            raise StoreError(f"{path}: damaged: {problem}; re-measure step {row['step']}")
        try:
            length = int.from_bytes(data[:SAFETENSORS_LENGTH_BYTES], "little")
            raw = json.loads(data[SAFETENSORS_LENGTH_BYTES : SAFETENSORS_LENGTH_BYTES + length])
            header = json.loads(raw["__metadata__"][HEADER_KEY])
            arrays = safetensors.torch.load(data)
        except (ValueError, KeyError, TypeError, SafetensorError) as err:
            raise StoreError(f"{path}: unreadable safetensors file ({err!r})") from err
        stamp = (header.get("run_id"), header.get("step"), header.get("tokens"))
        if stamp != (self.run_id, row["step"], row["tokens"]):
            raise StoreError(
                f"{path}: header mismatch: it holds (run, step, tokens) {stamp}, the index says "
                f"{(self.run_id, row['step'], row['tokens'])}"
            )
        try:
            return Snapshot.from_parts(header, arrays, run_info=self.info)
        except (StoreError, KeyError, TypeError, ValueError) as err:
            raise StoreError(f"{path}: not a readable snapshot ({err})") from err

    def _write_rows(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Rewrite index.jsonl (sorted by tokens, step) or failures.jsonl (in order), atomically."""
        if name == INDEX_FILE:
            rows = _sorted(rows)
        _write_jsonl(self.path / name, _FORMATS[name], self.run_id, rows)

    def _check_same_run(self, probes: ProbeSet, config: ProbeConfig, run_id: str | None) -> None:
        problems = []
        if probes.fingerprint != self.probe_fingerprint:
            problems.append(f"probe set {probes.fingerprint} (the run's: {self.probe_fingerprint})")
        if config.fingerprint != self.config.fingerprint:
            ours, theirs = self.config.to_dict(), config.to_dict()
            changed = [
                f"{k}={theirs[k]!r} (the run's: {ours[k]!r})" for k in ours if ours[k] != theirs[k]
            ]
            problems.append("config " + ", ".join(changed))
        if run_id is not None and run_id != self.run_id:
            problems.append(f"run_id {run_id!r} (the run's: {self.run_id!r})")
        if problems:
            raise StoreError(
                f"{self.path} holds run {self.run_id} measured differently: {'; '.join(problems)}."
                " Resume and replay must measure what the run measured: use its probe set and"
                " config, or pass a new --out / run_dir to start a new run"
            )

    def _check_snapshot(self, snapshot: Snapshot) -> None:
        problems = [
            f"{what} {given!r} (the run's: {ours!r})"
            for what, given, ours in (
                ("run_id", snapshot.run_id, self.run_id),
                ("probe fingerprint", snapshot.probe_fingerprint, self.probe_fingerprint),
                ("config fingerprint", snapshot.config_fingerprint, self.config.fingerprint),
            )
            if given != ours
        ]
        if problems:
            raise StoreError(
                f"refusing the snapshot of step {snapshot.step} for {self.path}: "
                f"{', '.join(problems)}; a run holds one probe set and config: use a new run dir"
            )
        for name, value, digits in (
            ("step", snapshot.step, STEP_DIGITS),
            ("tokens", snapshot.tokens, TOKENS_DIGITS),
        ):
            if not 0 <= value < 10**digits:
                raise ConfigError(f"Snapshot.{name}={value}: need 0 <= {name} < 10**{digits}")


def snapshot_bytes(probes: ProbeSet, config: ProbeConfig) -> int:
    """An upper estimate of one snapshot's files (data, sidecar, index row), in bytes.

    From the shapes `Snapshot.arrays` stores: per pair part, distance and logit difference
    [pairs, alphas] and the two top tokens [pairs]; region maps [triples, 3, grid, grid].
    """
    prompts = probes.prompts()
    numbers = sum(
        len(prompts[part]) * (2 * config.num_alphas + 2) for part in config.parts if part != "maps"
    )
    if "maps" in config.parts:
        numbers += len(prompts["maps"]) * 3 * (config.grid**2 + 2) + config.grid
    return BYTES_PER_NUMBER * numbers + JSON_BYTES


def bytes_to_start(probes: ProbeSet, config: ProbeConfig) -> int:
    """Free space a run needs to start: its probe set, its JSON files and its first snapshots."""
    probe_tokens = sum(len(p) for part in probes.prompts().values() for g in part for p in g)
    return (
        BYTES_PER_NUMBER * probe_tokens
        + JSON_BYTES
        + SNAPSHOTS_TO_START * snapshot_bytes(probes, config)
    )


def check_free_space(path: str | Path, *, probes: ProbeSet, config: ProbeConfig) -> None:
    """Refuse, before any write, a run directory whose filesystem cannot hold a run's start.

    Args:
        path: the run directory (it must exist).
        probes: the run's probe set.
        config: the run's measurement settings.

    Raises:
        ConfigError: less free space than `bytes_to_start` (the message names the directory,
            the space needed and free, and one snapshot's size).
    """
    free = shutil.disk_usage(path).free
    needed = bytes_to_start(probes, config)
    if free < needed:
        raise ConfigError(
            f"run dir {path} has {_mib(free)} free on its filesystem; a run needs about "
            f"{_mib(needed)} to start (the probe set and the first {SNAPSHOTS_TO_START} "
            f"snapshots), then about {_mib(snapshot_bytes(probes, config))} per snapshot: free "
            "space there, or pass a run_dir (--out) on a disk with room"
        )


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


def _write_run(
    path: Path,
    *,
    probes: ProbeSet,
    config: ProbeConfig,
    run_id: str,
    info: Mapping[str, Any] | None,
) -> None:
    """Write a new run's files; config.json goes last because its presence makes a run."""
    probes.save(path / PROBES_DIR)
    (path / SNAPSHOTS_DIR).mkdir(exist_ok=True)
    _write_jsonl(path / INDEX_FILE, INDEX_FORMAT, run_id, [])
    meta = {
        "format": RUN_FORMAT,
        "format_version": STORE_FORMAT_VERSION,
        "run_id": run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "regionwatch_version": VERSION,
        "probe_fingerprint": probes.fingerprint,
        "config_fingerprint": config.fingerprint,
        "config": config.to_dict(),
        "info": dict(info or {}),
    }
    write_json_atomic(path / CONFIG_FILE, meta)
    logger.info("created run %s in %s", run_id, path)


def _refuse_links(path: Path) -> None:
    """Refuse a run directory holding a symbolic link where the store keeps its own entries."""
    links = [name for name in RUN_ENTRIES if (path / name).is_symlink()]
    if links:
        raise StoreError(
            f"{path}: {', '.join(links)} is a symbolic link; regionwatch follows no links inside a "
            "run directory (writing or repairing through one would touch files elsewhere): "
            "replace the link with a real copy of what it points to, or pass the real run directory"
        )


def _read_run_config(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(read_bytes(path).decode("utf-8"))
    except FileNotFoundError as err:
        raise StoreError(
            f"{path.parent} is not a regionwatch run directory (no {CONFIG_FILE}); create one "
            "with SnapshotStore.create"
        ) from err
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: damaged, not readable JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != RUN_FORMAT:
        raise StoreError(f"{path}: not a regionwatch run config (no format {RUN_FORMAT!r})")
    _check_version(path, meta)
    return meta


def _check_version(path: Path, header: Mapping[str, Any]) -> None:
    version = header.get("format_version")
    if not isinstance(version, int) or version > STORE_FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format_version {version!r}; this regionwatch reads versions up to "
            f"{STORE_FORMAT_VERSION}: upgrade regionwatch"
        )


def _check_empty(path: Path) -> None:
    """Refuse a directory that holds anything but what an interrupted `create` leaves."""
    if not path.exists():
        return
    if not path.is_dir():
        raise StoreError(f"{path} is a file; a run needs a new or empty directory")
    strange = sorted(
        p.name
        for p in path.iterdir()
        if p.name not in CREATE_LEFTOVERS and not fnmatch(p.name, TEMP_MARK)
    )
    snapshots = path / SNAPSHOTS_DIR
    if snapshots.is_dir() and any(snapshots.iterdir()):
        strange.append(f"{SNAPSHOTS_DIR}/...")
    if strange:
        raise StoreError(
            f"{path} is not empty and not a regionwatch run (no {CONFIG_FILE}; it holds "
            f"{strange[:5]}): pass a new or empty directory as --out / run_dir"
        )


def _acquire_lock(path: Path, *, wait_s: float) -> IO[bytes] | None:
    """Take the run's exclusive flock, waiting up to `wait_s`; None if someone else holds it.

    Also None where the directory is read-only (an archived run): readers need no lock.
    """
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        lock = os.fdopen(fd, "r+b")
    except OSError as err:
        if err.errno == errno.ELOOP:  # truncating a linked lock would truncate its target
            raise StoreError(
                f"{path / LOCK_FILE} is a symbolic link; regionwatch follows no links inside a run "
                "directory: delete the link (the lock file is recreated)"
            ) from err
        logger.debug("cannot open %s (%s); treating the run as read-only", path / LOCK_FILE, err)
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                lock.close()
                return None
            time.sleep(LOCK_POLL_S)
        except OSError as err:  # a filesystem without flock (some network mounts)
            lock.close()
            logger.warning("cannot lock %s: %s", path / LOCK_FILE, err)
            return None
    try:
        os.ftruncate(lock.fileno(), 0)  # unbuffered: a refused write leaves nothing to flush
        os.pwrite(lock.fileno(), f"pid {os.getpid()}\n".encode(), 0)  # named to a second writer
    except OSError as err:  # a full disk: the run cannot be written at all
        lock.close()
        raise StoreError(
            f"{path}: cannot write {LOCK_FILE} ({err}); free space on its filesystem, or pass a "
            "run directory on a disk with room"
        ) from err
    return lock


def _stem(tokens: int, step: int) -> str:
    return f"{tokens:0{TOKENS_DIGITS}d}-{step:0{STEP_DIGITS}d}"


def _parse_stem(stem: str) -> tuple[int, int] | None:
    """(tokens, step) from a snapshot file stem, or None for a name the store did not make."""
    tokens, _, step = stem.partition("-")
    if (len(tokens), len(step)) != (TOKENS_DIGITS, STEP_DIGITS) or not (tokens + step).isdigit():
        return None
    return int(tokens), int(step)


def _sorted(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda row: (row["tokens"], row["step"]))


def _problem(
    path: Path, row: Mapping[str, Any], *, hash_it: bool = False, data: bytes | None = None
) -> str | None:
    """What is wrong with a snapshot file given its index row, or None; hashes only if asked."""
    if data is None:
        try:
            info = path.lstat()
        except OSError as err:
            return f"file missing or unreadable ({err.strerror})"
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file (a link or a directory; the store wrote a file)"
        size = info.st_size
    else:
        size = len(data)
    if size != row["size"]:
        return f"size {size} bytes, the index says {row['size']} (truncated or overwritten)"
    if data is not None or hash_it:
        try:
            digest = bytes_digest(data) if data is not None else file_digest(path)
        except StoreError as err:
            return str(err)
        if digest != row["sha256"]:
            return "sha256 differs from the index's (bit rot or an overwrite)"
    return None


def _read_sidecar(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the index row a sidecar commits, None), or (None, what is wrong with it)."""
    try:
        sidecar = json.loads(read_bytes(path).decode("utf-8"))
        row = sidecar["row"]
        _check_version(path, sidecar)
        bad = [k for k, kind in ROW_TYPES.items() if not isinstance(row.get(k), kind)]
        if sidecar.get("format") != SIDECAR_FORMAT or bad:
            raise ValueError(f"not a snapshot sidecar (bad keys {bad})")
        if row["file"] != path.with_suffix(".safetensors").name:
            raise ValueError(f"names file {row['file']!r}")
    except FileNotFoundError:
        return None, MISSING
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return None, f"damaged ({err})"
    return row, None


def _parse_jsonl(
    path: Path, fmt: str, types: Mapping[str, type]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of an index-like file and what is wrong with it; damaged lines are left out.

    Raises:
        StoreError: the file is of a newer format version.
    """
    try:
        lines = read_bytes(path).split(b"\n")
        # A last line without its newline is an append in progress (or torn by a crash, which
        # the writer's repair removes): not yet written, so neither a row nor damage.
        del lines[max(1, len(lines) - 1) :]
    except FileNotFoundError:
        return [], ([] if fmt == FAILURES_FORMAT else [f"{path.name} is missing"])
    except OSError as err:
        return [], [f"{path.name} unreadable ({err.strerror})"]
    problems = []
    try:
        head = json.loads(lines[0])
        if not isinstance(head, dict) or head.get("format") != fmt:
            raise ValueError(f"no format {fmt!r}")
        _check_version(path, head)
    except ValueError as err:
        problems.append(f"line 1: damaged header ({err})")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            bad = [k for k, kind in types.items() if not isinstance(row.get(k), kind)]
            if bad or ("file" in row and Path(row["file"]).name != row["file"]):
                raise ValueError(f"keys {bad or ['file']} missing or wrong")
        except (ValueError, AttributeError) as err:
            problems.append(f"line {number}: damaged ({err})")
            continue
        rows.append(row)
    return rows, problems


def _read_jsonl(path: Path, fmt: str, types: Mapping[str, type]) -> list[dict[str, Any]]:
    rows, problems = _parse_jsonl(path, fmt, types)
    for problem in problems:
        logger.warning("%s: %s; skipped", path, problem)
    return rows


def _write_jsonl(path: Path, fmt: str, run_id: str, rows: Iterable[Mapping[str, Any]]) -> None:
    header = {"format": fmt, "format_version": STORE_FORMAT_VERSION, "run_id": run_id}
    write_atomic(path, b"".join(_jsonl_line(line) for line in (header, *rows)))


def _jsonl_line(row: Mapping[str, Any]) -> bytes:
    """One JSON line, newline-terminated: a line without its newline is not yet written."""
    return (json.dumps(row, allow_nan=False) + "\n").encode("utf-8")


def _ends_whole(path: Path) -> bool:
    """Whether a JSON-lines file exists and ends with a newline (no torn append at its end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        return size > 0 and os.pread(fd, 1, size - 1) == b"\n"
    finally:
        os.close(fd)
