"""`regionwatch show`: a run's snapshots over tokens, with every file checked."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from regionwatch.cli.runs import find_run
from regionwatch.cli.tables import onset_line, tokens_table


def add(verbs: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = verbs.add_parser(
        "show",
        help="list a run's snapshots and check their files",
        description="Print a run's snapshots over tokens (max-slope quartiles, similar vs "
        "dissimilar), check every file against the index, and flag damaged ones.",
    )
    p.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="a run, or a folder with one run below it"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per snapshot (JSON lines)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the verb; the exit status."""
    from regionwatch.onset import tracker
    from regionwatch.store import SnapshotStore

    store = SnapshotStore(find_run(args.run_dir))
    records = store.records()
    if args.json:
        for record in records:
            print(json.dumps(record))
        return 0
    damage = store.verify()
    damaged = {d.file.name: d.reason for d in damage}  # records name files, not paths
    print(
        f"run {store.run_id} in {store.path}: "
        f"{len(records)} snapshots, {len(store.failures())} failed"
    )
    print(tokens_table(records, damaged))
    print(onset_line(tracker(store, records).result()))
    for d in damage:
        print(f"damaged: {d.file}: {d.reason}")
    for failure in store.failures():
        print(f"failed: step {failure['step']} tokens {failure['tokens']}: {failure['error']}")
    return 1 if damaged else 0
