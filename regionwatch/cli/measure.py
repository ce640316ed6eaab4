"""`regionwatch measure`: probe one model (saved, or freshly initialised) and print its table."""

from __future__ import annotations

import argparse
from pathlib import Path

from regionwatch.cli.tables import slope_table
from regionwatch.errors import RegionWatchError


def add(verbs: argparse._SubParsersAction) -> None:
    """Register the verb."""
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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the verb; the exit status."""
    from regionwatch.loading import init_model, load_model, load_tokenizer, parse_dtype
    from regionwatch.measure import ProbeConfig, measure
    from regionwatch.probes import ProbeSet

    if (args.model_dir is None) == (args.init_from is None):
        raise RegionWatchError("give a MODEL_DIR or --init-from CONFIG_DIR (exactly one)")
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
    print(slope_table(result.summary))
    print(f"probe time: {result.timing['total']:.2f} s")
    return 0
