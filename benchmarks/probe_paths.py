"""bench_probe's engine paths: the KV-cached fast path against the generic full-row path.

The same Hugging Face model is measured twice in one process: through the architecture table
(the fast engine: one clean pass per context, then one query token per point) and through a
`Decoder` naming the same modules (the generic path that models called as a whole take: a full
forward of the context per point, patched at the last position). Their ratio is what a
non-HF model (nanoGPT-style, OLMo-core, litgpt, torchtitan) pays for being driven as a whole;
their agreement shows the generic path computes the same numbers.
"""

from __future__ import annotations

from typing import Any

from harness import Setup, paired_ratio, run_rounds
from probe_models import Shape
from probe_speed import curve_agreement
from torch import Tensor, nn

from regionwatch.decoder import Decoder
from regionwatch.measurement import Curves, interpolate

# The bench models' own modules, named as a Decoder names them.
DECODERS = {
    "gpt2": Decoder(blocks="transformer.h", final_norm="transformer.ln_f", head="lm_head"),
    "llama": Decoder(blocks="model.layers", final_norm="model.norm", head="lm_head"),
}


def bench_paths(
    setup: Setup, model: nn.Module, shape: Shape, ids: Tensor, pairs: int
) -> dict[str, Any]:
    """Fast and generic paths on `pairs` chained pairs of prompts `ids[:pairs + 1]`."""
    ids_a, ids_b = ids[:pairs], ids[1 : pairs + 1]
    alphas, length = setup.args.alphas, ids.shape[1]

    def fast() -> Curves:
        return interpolate(model, ids_a, ids_b, num_alphas=alphas)

    def generic() -> Curves:
        return interpolate(model, ids_a, ids_b, num_alphas=alphas, decoder=DECODERS[shape.arch])

    samples, peaks, last = run_rounds(setup, {"fast": fast, "generic": generic})
    med = {name: s.median for name, s in samples.items()}
    return {
        "arch": shape.arch,
        "size": f"{shape.layers}x{shape.d_model}",
        "pairs": pairs,
        "length": length,
        "alphas": alphas,
        "rounds": len(samples["fast"].seconds),
        "variants": {
            name: {
                **samples[name].summary(),
                "peak_extra_bytes": peaks[name],
                "points_per_s": pairs * alphas / med[name],
            }
            for name in samples
        },
        "ratios": {
            "generic_vs_fast": med["generic"] / med["fast"],
            "generic_vs_fast_paired": paired_ratio(samples["generic"], samples["fast"]),
            # per pair: T + K query tokens (fast) against (K + 2) rows of T tokens (generic)
            "expected_tokens_ratio": (alphas + 2) * length / (length + alphas),
        },
        "agreement": curve_agreement(last["generic"], last["fast"]),
    }
