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
    _add_demo(verbs)
    _add_measure(verbs)
    _add_show(verbs)
    _add_report(verbs)
    _add_replay(verbs)
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
    p.add_argument(
        "--out", type=Path, metavar="RUN_DIR", help="also store the snapshot as a run there"
    )
    p.add_argument("--probe", type=Path, metavar="PROBE_DIR", help="reuse this saved probe set")
    p.add_argument("--step", type=int, default=0, help="training step of the model (for --out)")
    p.add_argument("--tokens", type=int, default=0, help="training tokens seen (for --out)")
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
    if args.probe is not None:
        probes = ProbeSet.load(args.probe, tokenizer=tokenizer)
    else:
        probes = ProbeSet.build(
            tokenizer,
            args.text,
            seed=args.seed,
            seq_len=args.seq_len,
            n_prompts=args.pairs + 1,
            progress=True,
        )
    result = measure(model, probes, config)
    if args.out is not None:
        from regionwatch.snapshot import Snapshot
        from regionwatch.store import SnapshotStore

        with SnapshotStore.create(
            args.out, probes=probes, config=config, info={"source": str(source_dir)}
        ) as store:
            snapshot = Snapshot.stamp(
                result,
                run_id=store.run_id,
                step=args.step,
                tokens=args.tokens,
                probes=probes,
                model=model,
                info={"driver": "measure", "source": str(source_dir)},
            )
            print(f"stored: {store.write(snapshot)}")
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


def _num(value: float | None) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.3f}"


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


def _add_replay(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "replay",
        help="measure saved checkpoints or hub revisions into a run, after the fact",
        description="Measure the checkpoints of a training run in training order, into an "
        "ordinary run directory (store + TensorBoard). Resumable; a bad checkpoint is reported "
        "and skipped. Exit status: 0 all measured, 1 some checkpoints failed, 2 usage error.",
    )
    p.add_argument(
        "sources",
        nargs="*",
        type=Path,
        metavar="SOURCE",
        help="save_pretrained / Trainer checkpoint-N dirs, Lightning .ckpt files, directories "
        "holding them, or a regionwatch run dir (its probe set is used)",
    )
    run = p.add_mutually_exclusive_group(required=True)
    run.add_argument("--out", type=Path, metavar="RUN_DIR", help="run dir to write (or resume)")
    run.add_argument(
        "--into", type=Path, metavar="RUN_DIR", help="existing run (e.g. a live one) to add to"
    )
    p.add_argument("--probe", type=Path, metavar="PROBE_DIR", help="probe set to measure")
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="tokenizer dir or 'builtin' (default: the first checkpoint with tokenizer files)",
    )
    p.add_argument("--write-layer", type=int, help="block whose output is patched (default 0)")
    p.add_argument("--alphas", type=int, help="interpolation grid points (default 21)")
    p.add_argument("--grid", type=int, help="region-map grid points per axis (default 37)")
    p.add_argument(
        "--state-key",
        metavar="PREFIX",
        help="key prefix of the model in .ckpt state dicts, e.g. 'lm' (default: found)",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="DIR",
        dest="config_dir",
        help="directory with the model's config.json, for .ckpt files without one beside them",
    )
    p.add_argument(
        "--tokens-per-step",
        type=int,
        metavar="N",
        help="training tokens per optimizer step, for checkpoints that record no token count",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="fully unpickle checkpoints that hold Python objects (runs code from the file)",
    )
    p.add_argument("--repo", metavar="NAME", help="hub repo id whose --revisions to replay")
    p.add_argument(
        "--revisions",
        metavar="LIST",
        help="comma-separated revisions, globs ('step*') or 'pythia' (its 154 checkpoints)",
    )
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=_replay)


def _replay(args: argparse.Namespace) -> int:
    from regionwatch.loading import parse_dtype
    from regionwatch.measure import ProbeConfig
    from regionwatch.probes import ProbeSet
    from regionwatch.replay import replay

    if not args.sources and args.repo is None:
        raise _usage("nothing to replay: give SOURCE paths, or --repo NAME --revisions LIST")
    given = {
        name: value
        for name, value in (
            ("write_layer", args.write_layer),
            ("num_alphas", args.alphas),
            ("grid", args.grid),
        )
        if value is not None
    }
    result = replay(
        args.sources,
        out=args.out,
        into=args.into,
        tokenizer=args.tokenizer,
        probes=None if args.probe is None else ProbeSet.load(args.probe),
        config=ProbeConfig(**given) if given else None,  # None: the run's own, or the defaults
        tokens_per_step=args.tokens_per_step,
        state_key=args.state_key,
        config_dir=args.config_dir,
        trust_pickle=args.trust_pickle,
        repo=args.repo,
        revisions=args.revisions,
        dtype=parse_dtype(args.dtype),
        device=args.device,
    )
    print(
        f"replay into {result.run_dir}: {len(result.measured)} measured, "
        f"{len(result.skipped)} already there, {len(result.failed)} failed"
    )
    for checkpoint, twin in result.duplicates:
        print(f"  same weights as step {twin}: {checkpoint.label}")
    for checkpoint, reason in result.failed:
        print(f"  FAILED {checkpoint.label}: {reason}")
    return 0 if result.ok else 1


def _add_show(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "show",
        help="list a run's snapshots and check their files",
        description="Print a run's snapshots over tokens (max-slope quartiles, similar vs "
        "dissimilar), check every file against the index, and flag damaged ones.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="one JSON object per snapshot (JSON lines)")
    p.set_defaults(run=_show)


def _show(args: argparse.Namespace) -> int:
    import json

    from regionwatch.store import SnapshotStore

    store = SnapshotStore(args.run_dir)
    records = store.records()
    if args.json:
        for record in records:
            print(json.dumps(record))
        return 0
    damaged = {d.file: d.reason for d in store.verify()}
    print(
        f"run {store.run_id} in {store.path}: "
        f"{len(records)} snapshots, {len(store.failures())} failed"
    )
    print(_tokens_table(records, damaged))
    for failure in store.failures():
        print(f"failed: step {failure['step']} tokens {failure['tokens']}: {failure['error']}")
    return 1 if damaged else 0


def _tokens_table(records: list[dict], damaged: dict[str, str] | None = None) -> str:
    """One row per snapshot: tokens, step, max-slope quartiles, similar vs dissimilar medians."""
    header = ("tokens", "step", "q25", "median", "q75", "similar", "dissimilar", "maps", "file")
    rows = [header]
    for r in records:
        state = (damaged or {}).get(r.get("file", ""), "ok")
        rows.append(
            (
                f"{r['tokens']:,}",
                str(r["step"]),
                *(_num(r.get(f"max_slope/{q}")) for q in ("q25", "median", "q75")),
                _num(r.get("max_slope/similar_median")),
                _num(r.get("max_slope/dissimilar_median")),
                "yes" if "maps" in r.get("parts", ()) else "",
                state if damaged is not None else "",
            )
        )
    return _format(rows)


def _format(rows: list[tuple[str, ...]]) -> str:
    """Columns aligned: the first left, the others right."""
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, width, strict=True))
        ).rstrip()
        for r in rows
    )


def _add_demo(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "demo",
        help="pretrain a small LM on the built-in corpus with regionwatch attached (CPU, ~10 min)",
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
    p.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from regionwatch.demo import DemoConfig, run_demo
    from regionwatch.report import write_report
    from regionwatch.store import SnapshotStore
    from regionwatch.tensorboard import tensorboard_command

    config = DemoConfig.from_yaml(args.config) if args.config else DemoConfig()
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps)
    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    print(
        f"demo: {config.architecture} {config.layers} layers d={config.width}, "
        f"{config.steps} steps of {config.tokens_per_step:,} tokens, "
        f"trainer {args.trainer}, into {out}"
    )
    result = run_demo(config, out, trainer=args.trainer, progress=not args.quiet)
    records = SnapshotStore(result.run_dir).records()
    print(
        f"\ntrained in {result.seconds / 60:.1f} min; {len(records)} snapshots in {result.run_dir}"
    )
    print(_tokens_table(records))
    report = write_report([result.run_dir], out / "report", progress=not args.quiet)
    print(f"\nreport: {report}")
    print(f"TensorBoard: {tensorboard_command(out, snapshots=len(records))}")
    return 0
