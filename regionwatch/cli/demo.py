"""`regionwatch demo`: pretrain a small LM on the built-in corpus with regionwatch attached."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from regionwatch.cli.tables import tokens_table

HOST_LOGGERS = ("lightning", "transformers")  # their own handlers print the lines
# The library's names in its messages, and the flag that sets each (see `cli.main`).
FLAGS = {"steps": "--steps (or the --config YAML's steps)", "trainer": "--trainer"}


def add(verbs: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = verbs.add_parser(
        "demo",
        help="pretrain a small LM on the built-in corpus with regionwatch attached (CPU, ~7 min)",
        description="Pretrain a small GPT-2 (or Llama) from scratch on the built-in corpus with "
        "the region monitor attached, then print the run, the TensorBoard command and the "
        "max-slope table over tokens, and write a report.",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="YAML",
        help="demo config (default: configs/demo.yaml's values)",
    )
    p.add_argument("--trainer", choices=["lightning", "hf"], default="lightning")
    p.add_argument(
        "--out", type=Path, metavar="DIR", help="output directory (default: runs/demo-<time>)"
    )
    p.add_argument("--steps", type=int, help="override the config's number of optimizer steps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run, flags=FLAGS)


def run(args: argparse.Namespace) -> int:
    """Run the verb; the exit status."""
    from regionwatch.demo import DemoConfig, run_demo
    from regionwatch.hf import host_logger
    from regionwatch.report import write_report
    from regionwatch.store import SnapshotStore
    from regionwatch.tensorboard import view_hint

    # The setup line and one line per snapshot, shown by default: Lightning prints its rank-zero
    # info; the HF Trainer's channel is held at warning unless asked, so the demo asks for ours.
    host_logger.setLevel(logging.INFO)

    config = DemoConfig.from_yaml(args.config) if args.config else DemoConfig()
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps)
    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    print(
        f"demo: {config.architecture} {config.layers} layers d={config.width}, "
        f"{config.steps} steps of {config.tokens_per_step:,} tokens, "
        f"trainer {args.trainer}, into {out}"
    )
    hosts = [logging.getLogger(name) for name in HOST_LOGGERS]
    with logging_redirect_tqdm(loggers=[logging.root, *hosts]):  # lines above the bar
        result = run_demo(config, out, trainer=args.trainer, progress=not args.quiet)
    records = SnapshotStore(result.run_dir).records()
    print(
        f"\ntrained in {result.seconds / 60:.1f} min; {len(records)} snapshots in {result.run_dir}"
    )
    print(tokens_table(records))
    report = write_report([result.run_dir], out / "report", progress=not args.quiet)
    print(f"\nreport: {report}")
    print(f"final model: {result.model_dir} (regionwatch measure / replay it)")
    print(f"TensorBoard: {view_hint(result.run_dir, snapshots=len(records))}")
    return 0
