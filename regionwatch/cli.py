"""The `regionwatch` command line: one verb per job, each a thin layer over the library.

The only module that prints and configures logging (STYLE.md §2.7).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from regionwatch.errors import RegionWatchError

logger = logging.getLogger("regionwatch")

Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `regionwatch` console script and `python -m regionwatch`."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        with logging_redirect_tqdm():
            return args.run(args)
    except RegionWatchError as err:  # a user error: the message says how to fix it
        print(f"regionwatch {args.verb}: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regionwatch", description="Watch stable regions form in the residual stream."
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_measure(verbs)
    _add_report(verbs)
    return parser


def _add_measure(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "measure",
        help="measure one model (a save_pretrained dir, or a fresh init from a config)",
        description="Measure the stable-region probe of one model and print its max-slope table.",
    )
    p.add_argument(
        "model_dir", nargs="?", type=Path, help="save_pretrained directory of a causal LM"
    )
    p.add_argument(
        "--init-from",
        type=Path,
        metavar="CONFIG_DIR",
        help="measure a freshly initialised model built from CONFIG_DIR/config.json instead",
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer directory (default: MODEL_DIR or CONFIG_DIR); 'builtin' trains BPE "
        "on the built-in corpus",
    )
    p.add_argument(
        "--text",
        metavar="PATH",
        help="text file or folder to draw prompts from (default: built-in corpus)",
    )
    p.add_argument(
        "--pairs", type=int, default=99, help="random pairs (chained: pairs + 1 prompts)"
    )
    p.add_argument("--seq-len", type=int, default=10, help="tokens per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe set (and of --init-from)")
    p.add_argument("--write-layer", type=int, default=0, help="block whose output is patched")
    p.add_argument("--alphas", type=int, default=21, help="interpolation grid points")
    p.add_argument("--grid", type=int, default=37, help="region-map grid points per axis")
    p.add_argument(
        "--dtype", default="float32", help="float32 (default), bfloat16, float16, float64"
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=_measure)


def _measure(args: argparse.Namespace) -> int:
    from regionwatch.loading import init_model, load_model, load_tokenizer, parse_dtype
    from regionwatch.measure import ProbeConfig, measure
    from regionwatch.probes import ProbeSet

    if (args.model_dir is None) == (args.init_from is None):
        raise _usage("give a MODEL_DIR or --init-from CONFIG_DIR (exactly one)")
    dtype = parse_dtype(args.dtype)
    source_dir = args.model_dir or args.init_from
    tokenizer = load_tokenizer(args.tokenizer or source_dir)
    config = ProbeConfig(write_layer=args.write_layer, num_alphas=args.alphas, grid=args.grid)
    if args.init_from is not None:
        model = init_model(args.init_from, seed=args.seed, dtype=dtype, device=args.device)
    else:
        model = load_model(args.model_dir, dtype=dtype, device=args.device)
    probes = ProbeSet.build(
        tokenizer,
        args.text,
        seed=args.seed,
        seq_len=args.seq_len,
        n_prompts=args.pairs + 1,
        progress=True,
    )
    result = measure(model, probes, config)
    label = f"init from {args.init_from}" if args.init_from else str(args.model_dir)
    print(f"{label}: {type(model).__name__}, write layer {args.write_layer}, {args.alphas} alphas")
    print(probes.summary())
    print(_slope_table(result.summary))
    print(f"probe time: {result.timing['total']:.2f} s")
    return 0


def _slope_table(summary: dict[str, float]) -> str:
    """Quartiles of max slope per pair set, one row each."""
    rows = [("pairs", "q25", "median", "q75")]
    for label, prefix in (("random", ""), ("similar", "similar_"), ("dissimilar", "dissimilar_")):
        key = f"max_slope/{prefix}median"
        if key in summary:
            rows.append(
                (
                    label,
                    *(_num(summary[f"max_slope/{prefix}{q}"]) for q in ("q25", "median", "q75")),
                )
            )
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(r, width, strict=True))
        )
        for r in rows
    ]
    extra = []
    if "pairs/excluded" in summary:
        extra.append(f"excluded pairs (d(1) <= 0.01): {int(summary['pairs/excluded'])}")
    if "max_slope/frac_linear" in summary:
        extra.append(f"near-linear pairs: {_num(summary['max_slope/frac_linear'])}")
    return "\n".join(["max slope", *lines, *extra])


def _num(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3f}"


def _usage(message: str) -> RegionWatchError:
    return RegionWatchError(message)


def _add_report(verbs: argparse._SubParsersAction) -> None:
    def tokens(text: str) -> int:  # argparse names it in errors: "invalid tokens value"
        from regionwatch.report.tokens import parse_tokens  # lazy: the package loads matplotlib

        return parse_tokens(text)

    p = verbs.add_parser(
        "report",
        help="draw paper-style figures and an HTML page from stored runs",
        description="Read the snapshots of one or more runs (never a model) and write figures "
        "(PNG, GIF) and an index.html that works opened from disk.",
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories")
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
    p.set_defaults(run=_report)


def _report(args: argparse.Namespace) -> int:
    from regionwatch.report import write_report

    index = write_report(
        args.run_dirs,
        args.out,
        at_tokens=args.at,
        max_curves=args.max_curves,
        progress=not args.quiet,
    )
    print(index)
    return 0
