"""`regionwatch replay`: measure saved checkpoints or hub revisions into a run, after the fact."""

from __future__ import annotations

import argparse
from pathlib import Path

from regionwatch.cli.tables import tokens
from regionwatch.errors import RegionWatchError

# The library's names in its messages, and the flag that sets each (see `cli.main`).
FLAGS = {
    "write_layer": "--write-layer",
    "num_alphas": "--alphas",
    "grid": "--grid",
    "tokens_per_step": "--tokens-per-step",
    "state_key": "--state-key",
    "config_dir": "--config",
    "trust_pickle": "--trust-pickle",
    "revisions": "--revisions",
    "repo": "--repo",
    "precision": "--precision",
    "into": "--into",
}


def add(verbs: argparse._SubParsersAction) -> None:
    """Register the verb."""
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
        help="save_pretrained / Trainer checkpoint-N dirs, Lightning .ckpt files, .gguf files, "
        "litgpt and OLMo-core step folders, nanoGPT ckpt.pt files, directories holding them, or "
        "a regionwatch run dir (its probe set is used)",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, metavar="RUN_DIR", help="run dir to write (or resume)")
    target.add_argument(
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
    p.add_argument("--grid", type=int, help="region-map grid points per axis (default 25)")
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
        type=tokens,
        metavar="N",
        help="training tokens per optimizer step (e.g. 4096, 1M), for checkpoints that record no "
        "token count",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="fully unpickle checkpoints that hold Python objects (runs code from the file)",
    )
    p.add_argument(
        "--model-builder",
        metavar="PKG.MODULE:FUNCTION",
        help="function building the model of litgpt, OLMo-core or nanoGPT checkpoints from their "
        "recorded settings (required for nanoGPT ckpt.pt); the only code replay imports",
    )
    p.add_argument("--repo", metavar="NAME", help="hub repo id whose --revisions to replay")
    p.add_argument(
        "--revisions",
        metavar="LIST",
        help="comma-separated revisions, globs ('step*') or 'pythia' (its 154 checkpoints)",
    )
    p.add_argument(
        "--dtype",
        default="fp32",
        help="dtype the weights are loaded in: fp32 (default), bf16, fp16, as precision= names "
        "them (float32, bfloat16, float16 are read too)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "weights"],
        help="dtype of the numbers: fp32 (default; half weights upcast in place, never copied) "
        "or weights (the weights' own dtype); recorded in every snapshot",
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=run, flags=FLAGS)


def run(args: argparse.Namespace) -> int:
    """Run the verb; the exit status."""
    from regionwatch.loading import parse_dtype
    from regionwatch.measurement import ProbeConfig
    from regionwatch.probes import ProbeSet
    from regionwatch.replaying import replay, run_of_probes

    if not args.sources and args.repo is None:
        raise RegionWatchError(
            "nothing to replay: give SOURCE paths, or --repo NAME --revisions LIST"
        )
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
        model_builder=args.model_builder,
        repo=args.repo,
        revisions=args.revisions,
        dtype=parse_dtype(args.dtype),
        precision=args.precision,
        device=args.device,
        live_run=None if args.probe is None else run_of_probes(args.probe),
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
