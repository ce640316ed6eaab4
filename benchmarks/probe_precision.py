"""bench_probe's precision run: bf16 measured with fp32 numerics against fp32 and a bf16 copy."""

from __future__ import annotations

import copy
import gc
from typing import Any

import torch
from harness import Samples, Setup
from probe_models import build_model
from torch import nn

import regionwatch

# bf16 measured with fp32 numerics may cost at most this much beyond its fp32 twin's measurement,
# as a fraction of the bf16 model's parameter bytes (issue 13: a full fp32 copy cost 2.8x).
BF16_EXTRA_TARGET = 0.4


def bench_precision(setup: Setup, device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    """Peak extra memory and time of one measurement with fp32 numerics, fp32 vs bf16 weights.

    The bf16 model is upcast module by module in place (`measure(dtype=float32)`); beside it,
    the way it was measured before issue 13 (`copy.deepcopy(model).float()`) for contrast.
    Peaks are fractions of the measured model's own parameter bytes.
    """
    args = setup.args
    length, pairs = max(args.lengths), max(args.pairs)
    rows = []
    for layers, d_model in args.precision_sizes:
        ids = torch.randint(0, args.vocab, (2 * pairs, length), generator=gen)
        probes = regionwatch.ProbeSet(
            ids, ids[:0].reshape(0, 2, length), ids[:0].reshape(0, 2, length)
        )
        config = regionwatch.ProbeConfig(num_alphas=args.alphas, parts=("random",))
        record: dict[str, Any] = {"size": f"{layers}x{d_model}", "length": length, "pairs": pairs}
        for name in ("fp32", "bf16", "bf16_copy"):
            dtype = torch.float32 if name == "fp32" else torch.bfloat16
            model, _ = build_model("gpt2", layers, d_model, args.vocab, dtype, device)
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

            def call(
                model: nn.Module = model,
                name: str = name,
                probes: regionwatch.ProbeSet = probes,
                config: regionwatch.ProbeConfig = config,
            ) -> Any:
                target = copy.deepcopy(model).float() if name == "bf16_copy" else model
                return regionwatch.measure(target, probes, config, dtype=torch.float32)

            call()  # warm-up: the allocator's and the kernels' first-call costs
            peak, _ = setup.memory(call)
            samples = Samples()
            for _ in range(max(1, args.repeats // 2)):
                seconds, others, _ = setup.clock(call)
                samples.add(seconds, others)
            record[name] = {
                "param_bytes": weight_bytes,
                "peak_extra_bytes": peak,
                "peak_extra_fraction": None if peak is None else peak / weight_bytes,
                **samples.summary(),
            }
            del model
            gc.collect()
        fp32, bf16 = record["fp32"], record["bf16"]
        if fp32["peak_extra_bytes"] is not None and bf16["peak_extra_bytes"] is not None:
            beyond = (bf16["peak_extra_bytes"] - fp32["peak_extra_bytes"]) / bf16["param_bytes"]
            record["bf16_beyond_fp32_fraction"] = beyond
            if layers == 8:  # noqa: PLR2004 - the issue's target is stated at 8 blocks
                record["target"] = {"limit": BF16_EXTRA_TARGET, "met": beyond <= BF16_EXTRA_TARGET}
        record["bf16_time_vs_fp32"] = bf16["median_s"] / fp32["median_s"]
        rows.append(record)
        print(
            f"precision {record['size']}: extra memory x params fp32 "
            f"{_frac(fp32)} | bf16 in place {_frac(bf16)} | bf16 via copy "
            f"{_frac(record['bf16_copy'])} | bf16 beyond fp32 "
            f"{record.get('bf16_beyond_fp32_fraction', float('nan')):.2f} | time bf16/fp32 "
            f"{record['bf16_time_vs_fp32']:.2f}",
            flush=True,
        )
    return rows


def _frac(variant: dict[str, Any]) -> str:
    value = variant["peak_extra_fraction"]
    return "-" if value is None else f"{value:.2f}"
