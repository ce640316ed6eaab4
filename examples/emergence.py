"""Reproduce the paper's findings at small scale: pretrain several model sizes, monitored live.

    python examples/emergence.py --out runs/emergence   # 3 sizes, ~25 min on 2 CPU cores
    python examples/emergence.py --out runs/e --configs configs/emergence-2l-128.yaml --steps 60

Each config (configs/emergence-*.yaml) is pretrained from scratch on the built-in corpus with
RegionMonitor attached (`regionwatch.demo.run_demo`). Then the final and the initial model of
every run are measured once more with the paper's own settings (docs/method.md §7.3: S = 30 alphas,
10-token prompts, write layer 0), one report draws all runs on shared axes, and every finding
is written as a number to <out>/findings.json:

- max slope at init (~1: a straight line) and after training, per run;
- the bigger model higher at equal tokens (all runs share one token schedule);
- dissimilar pairs above similar pairs once trained;
- region maps going from gradients to solid patches (`maps/solid_fraction`);
- the emergence onset and the semantic alignment (AUC) of each run.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from regionwatch import ProbeConfig, SnapshotStore, measure, metrics
from regionwatch.demo import DemoConfig, new_model, run_demo
from regionwatch.loading import load_model
from regionwatch.report import write_report

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("2l-128", "4l-256", "6l-384")
PAPER_ALPHAS = 30  # docs/method.md §7.3: the setting of the one number we have (Qwen2-0.5B: ~4.9)
QWEN2_05B_MEDIAN = 4.9


def s30(model: torch.nn.Module, store: SnapshotStore) -> dict[str, float]:
    """Max-slope quartiles of the run's random pairs at the paper's S = 30."""
    result = measure(model, store.probes(), ProbeConfig(num_alphas=PAPER_ALPHAS, parts=("random",)))
    return {k: result.summary[f"max_slope/{k}"] for k in ("q25", "median", "q75")}


def run_findings(name: str, config: DemoConfig, out: Path) -> dict:
    """Train one size, then read its numbers back from the store."""
    result = run_demo(config, out / name, progress=False)
    store = SnapshotStore(result.run_dir)
    records = store.records()
    first, last = records[0], records[-1]
    mapped = [r for r in records if "maps" in r["parts"]]
    medians = [r["max_slope/median"] for r in records]
    with torch.random.fork_rng(devices=[]):
        torch.random.manual_seed(config.seed)
        init = new_model(config).eval()
    params = sum(p.numel() for p in init.parameters())
    return {
        "config": config.to_dict(),
        "parameters": params,
        "train_minutes": result.seconds / 60,
        "tokens": [r["tokens"] for r in records],
        "medians": medians,
        "init": {k: first[f"max_slope/{k}"] for k in ("q25", "median", "q75")},
        "final": {k: last[f"max_slope/{k}"] for k in ("q25", "median", "q75")},
        "final_similar_median": last.get("max_slope/similar_median"),
        "final_dissimilar_median": last.get("max_slope/dissimilar_median"),
        "solid_fraction": {
            "init": mapped[0]["maps/solid_fraction"],
            "final": mapped[-1]["maps/solid_fraction"],
        },
        "onset_tokens": metrics.emergence_onset(
            [r["tokens"] for r in records], medians, first["max_slope/q75"]
        ),
        "align_auc": {"init": first["align/auc"], "final": last["align/auc"]},
        "s30": {"init": s30(init, store), "final": s30(load_model(result.model_dir), store)},
        "snapshots": len(records),
    }


def compare_sizes(results: dict[str, dict]) -> dict:
    """At every token count all runs measured, does the bigger model have the higher median?"""
    names = sorted(results, key=lambda n: results[n]["parameters"])
    common = sorted(set.intersection(*(set(results[n]["tokens"]) for n in names)) - {0})
    ordered = 0
    for tokens in common:
        medians = [results[n]["medians"][results[n]["tokens"].index(tokens)] for n in names]
        ordered += all(a < b for a, b in itertools.pairwise(medians))
    return {"by_size": names, "token_counts": len(common), "bigger_is_higher": ordered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--configs",
        nargs="+",
        type=Path,
        default=[ROOT / "configs" / f"emergence-{s}.yaml" for s in SIZES],
    )
    parser.add_argument("--steps", type=int, help="override every config's steps")
    args = parser.parse_args()
    results = {}
    for path in args.configs:
        config = DemoConfig.from_yaml(path)
        if args.steps:
            config = DemoConfig.from_dict({**config.to_dict(), "steps": args.steps})
        name = path.stem.removeprefix("emergence-")
        print(f"training {name} ...", flush=True)
        results[name] = run_findings(name, config, args.out)
        r = results[name]
        print(
            f"{name}: {r['parameters'] / 1e6:.1f}M params, {r['train_minutes']:.1f} min; "
            f"median max slope {r['init']['median']:.3f} -> {r['final']['median']:.3f} (S=21), "
            f"{r['s30']['init']['median']:.3f} -> {r['s30']['final']['median']:.3f} (S=30)",
            flush=True,
        )
    findings = {
        "runs": results,
        "sizes": compare_sizes(results) if len(results) > 1 else None,
        "qwen2_0.5b_s30_median": QWEN2_05B_MEDIAN,
    }
    (args.out / "findings.json").write_text(json.dumps(findings, indent=2) + "\n")
    report = write_report(
        [args.out / n / "regionwatch" for n in results], args.out / "report", progress=False
    )
    print(f"findings: {args.out / 'findings.json'}\nreport: {report}")


if __name__ == "__main__":
    main()
