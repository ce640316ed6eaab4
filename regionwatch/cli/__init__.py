"""The `regionwatch` command line: one verb per module, each a thin layer over the library.

The only package that prints and configures logging (STYLE.md §2.7). Verbs import the library
inside `run`, so `regionwatch --help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from regionwatch.cli import demo, measure, replay, report, show
from regionwatch.errors import RegionWatchError

VERBS = (demo, measure, show, replay, report)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `regionwatch` console script and `python -m regionwatch`."""
    args = parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        with logging_redirect_tqdm():
            return args.run(args)
    except RegionWatchError as err:  # a user error: the message says how to fix it
        message = name_flags(str(err), getattr(args, "flags", {}))
        print(f"regionwatch {args.verb}: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`show --json | head`): nothing more to say
        # Python would report the failed flush of stdout at exit; point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def name_flags(message: str, flags: Mapping[str, str]) -> str:
    """A library message, with the flag that sets each of the library's names it uses.

    The library speaks in its own parameters (`num_alphas`), a command line user in flags
    (`--alphas`): every name of `flags` that the message uses gets its flag appended.
    """
    named = [
        f"{name} is {flag}"
        for name, flag in flags.items()
        if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", message)
    ]
    return f"{message} (on the command line: {'; '.join(named)})" if named else message


def configure_logging(level: str) -> None:
    """Log records at `level` and above to stderr, once each (the root logger's only handler).

    Libraries that give their loggers a level and a handler of their own (Lightning: INFO) also
    propagate to the root's handler whatever the root's level, so every such line would print
    twice. A filter on our handler holds them to `level`: a filter, not a handler level, because
    `logging_redirect_tqdm` keeps a handler's filters but not its level.
    """
    threshold = logging.getLevelName(level.upper())
    handler = logging.StreamHandler()
    handler.addFilter(lambda record: record.levelno >= threshold)
    logging.basicConfig(
        level=threshold, format="%(levelname)s %(name)s: %(message)s", handlers=[handler]
    )


def parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    top = argparse.ArgumentParser(
        prog="regionwatch", description="Watch stable regions form in the residual stream."
    )
    top.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        verb.add(verbs)
    return top
