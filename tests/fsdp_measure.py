"""Raw FSDP2 and FSDP1 + `regionwatch.measure` under torchrun, 2 CPU processes (gloo).

`python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.fsdp_measure OUT`.
Measures a seeded tiny GPT-2, all with fp32 numerics (upcast in place):
- sharded with FSDP2 (`fully_shard`) per block and at the root, in fp32, in bf16 and in fp32
  gathered as bf16 (a MixedPrecisionPolicy), and in fp32 named by a `Decoder` (the generic
  full-row path, which calls the FSDP root's forward);
- wrapped with FSDP1 (`FullyShardedDataParallel`) per block and at the root: fp32 measured
  through the root, bf16 with `use_orig_params=False` given as the inner model and its `root=`,
  fp32 gathered as bf16 with inputs cast (MixedPrecision), and only the blocks wrapped (no root);
and refusals: a tensor-parallel Llama, and an FSDP1 model whose root is not given. Rank 0 saves
the numbers to OUT/sharded.pt, keyed `<layout>:<weights>` where weights names the one-process
reference; both ranks print `REFUSED <what> <rank>` for each refusal.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
from torch import distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    FullyShardedDataParallel,
    MixedPrecision,
    MixedPrecisionPolicy,
    fully_shard,
)
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from regionwatch import ProbeSet, measure
from regionwatch.decoder import Decoder
from regionwatch.errors import UnsupportedModelError
from tests.conftest import tiny_model
from tests.support.lm import SMALL_PROBE, tiny_gpt2
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB

GPT2 = Decoder(blocks="transformer.h", final_norm="transformer.ln_f", head="lm_head")


def numbers(measurement: object) -> dict[str, torch.Tensor]:
    """The arrays the test compares: every part's curves and the region maps."""
    out = {f"{name}/relative": c.relative for name, c in measurement.curves.items()}
    out |= {f"{name}/distance": c.distance for name, c in measurement.curves.items()}
    out |= {f"{name}/top_a": c.top_a for name, c in measurement.curves.items()}
    return out | {"maps/rgb": measurement.maps.rgb}


def fsdp1(dtype: torch.dtype, *, root: bool = True, **kwargs: object) -> torch.nn.Module:
    """The seeded tiny GPT-2 wrapped with FSDP1: every block, and the model unless `root=False`."""
    model = tiny_gpt2(VOCAB, layers=3).to(dtype)  # in train mode: `measure` sets eval itself
    kwargs = {"device_id": torch.device("cpu"), **kwargs}
    if not root:
        for i, block in enumerate(model.transformer.h):
            model.transformer.h[i] = FullyShardedDataParallel(block, **kwargs)
        return model
    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({GPT2Block}), **kwargs)


def refused(what: str, call: object) -> None:
    try:
        call()
    except UnsupportedModelError as err:
        print(f"REFUSED {what} {dist.get_rank()} {err}", flush=True)


def measured(mesh: object, probes: ProbeSet) -> dict[str, dict[str, torch.Tensor]]:
    """Every layout's numbers, and the refusals printed; the models die with this frame."""
    saved = {}
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for name, dtype, policy in (
        ("fsdp2:fp32", torch.float32, MixedPrecisionPolicy()),
        ("fsdp2:bf16", torch.bfloat16, MixedPrecisionPolicy()),
        ("fsdp2-gathered-bf16:bf16", torch.float32, mixed),
    ):
        model = tiny_gpt2(VOCAB, layers=3).to(dtype).eval()
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        saved[name] = numbers(measure(model, probes, SMALL_PROBE, dtype=torch.float32))
    # The generic full-row path: the model called as a whole through a Decoder, its queries
    # split among the ranks as the fast engine's are.
    model = tiny_gpt2(VOCAB, layers=3).eval()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    saved["fsdp2-decoder:fp32"] = numbers(measure(model, probes, SMALL_PROBE, decoder=GPT2))

    root = fsdp1(torch.float32, use_orig_params=True)
    saved["fsdp1-root:fp32"] = numbers(measure(root, probes, SMALL_PROBE, dtype=torch.float32))
    plain = fsdp1(torch.bfloat16, use_orig_params=False)
    saved["fsdp1-inner-flat:bf16"] = numbers(
        measure(plain.module, probes, SMALL_PROBE, dtype=torch.float32, root=plain)
    )
    cast = MixedPrecision(param_dtype=torch.bfloat16, cast_forward_inputs=True)
    gathered = fsdp1(torch.float32, use_orig_params=True, mixed_precision=cast)
    saved["fsdp1-gathered-bf16:bf16"] = numbers(
        measure(gathered, probes, SMALL_PROBE, dtype=torch.float32)
    )
    blocks = fsdp1(torch.float32, root=False)
    saved["fsdp1-blocks:fp32"] = numbers(measure(blocks, probes, SMALL_PROBE))
    refused("root", lambda: measure(root.module, probes, SMALL_PROBE))

    parallel = tiny_model("llama", layers=3)
    parallelize_module(parallel.model.layers[0].mlp, mesh, {"up_proj": ColwiseParallel()})
    refused("parallel", lambda: measure(parallel, probes, SMALL_PROBE))
    return saved


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    saved = measured(mesh, ProbeSet.load(out / "probes"))
    if dist.get_rank() == 0:
        torch.save(saved, out / "sharded.pt")
    # Every sharded model freed and every rank done before the groups go: a rank that exits
    # while FSDP state still references a group can abort in gloo's teardown.
    del mesh
    gc.collect()
    dist.barrier()
    print(f"DONE {dist.get_rank()}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
