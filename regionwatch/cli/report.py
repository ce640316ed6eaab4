"""`regionwatch report`: figures, an animation and an HTML page from stored runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from regionwatch.cli.runs import find_run
from regionwatch.cli.tables import tokens

# The library's names in its messages, and the flag that sets each (see `cli.main`).
FLAGS = {"max_curves": "--max-curves", "at_tokens": "--at"}


def add(verbs: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = verbs.add_parser(
        "report",
        help="draw paper-style figures and an HTML page from stored runs",
        description="Read the snapshots of one or more runs (never a model) and write figures "
        "(PNG, GIF) and an index.html that works opened from disk.",
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run directories (or folders with one run below)",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write into")
    p.add_argument(
        "--at",
        type=tokens,
        metavar="TOKENS",
        help="also draw the pairs figure at the snapshot nearest to TOKENS (e.g. 4.2M, 10B)",
    )
    p.add_argument(
        "--max-curves",
        type=int,
        default=8,
        metavar="N",
        help="most checkpoints per curves panel and region-map strip (default 8)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run, flags=FLAGS)


def run(args: argparse.Namespace) -> int:
    """Run the verb; the exit status."""
    from regionwatch.report.build import check_out, write_report

    check_out(args.out)  # before any run is looked for
    index = write_report(
        [find_run(path) for path in args.run_dirs],
        args.out,
        at_tokens=args.at,
        max_curves=args.max_curves,
        progress=not args.quiet,
    )
    print(index)
    return 0
