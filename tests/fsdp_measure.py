"""Raw `fully_shard` + `regionwatch.measure` under torchrun, 2 CPU processes (gloo).

`python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.fsdp_measure OUT`.
Measures a seeded tiny GPT-2 sharded with FSDP2 per block and at the root, in fp32, in bf16 and
in fp32 gathered as bf16 (a MixedPrecisionPolicy), all with fp32 numerics (upcast in place), and
a tensor-parallel Llama (which must be refused). Rank 0
saves the numbers to OUT/sharded.pt; both ranks print `REFUSED <rank>` for the refusal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

from regionwatch import ProbeSet, measure
from regionwatch.errors import UnsupportedModelError
from tests.conftest import tiny_model
from tests.support.lm import SMALL_PROBE, tiny_gpt2
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB


def numbers(measurement: object) -> dict[str, torch.Tensor]:
    """The arrays the test compares: every part's curves and the region maps."""
    out = {f"{name}/relative": c.relative for name, c in measurement.curves.items()}
    out |= {f"{name}/distance": c.distance for name, c in measurement.curves.items()}
    out |= {f"{name}/top_a": c.top_a for name, c in measurement.curves.items()}
    return out | {"maps/rgb": measurement.maps.rgb}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    probes = ProbeSet.load(out / "probes")
    saved = {}
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for name, dtype, policy in (
        ("fp32", torch.float32, MixedPrecisionPolicy()),
        ("bf16", torch.bfloat16, MixedPrecisionPolicy()),
        ("fp32-gathered-bf16", torch.float32, mixed),
    ):
        model = tiny_gpt2(VOCAB, layers=3).to(dtype).eval()
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        saved[name] = numbers(measure(model, probes, SMALL_PROBE, dtype=torch.float32))
    parallel = tiny_model("llama", layers=3)
    parallelize_module(parallel.model.layers[0].mlp, mesh, {"up_proj": ColwiseParallel()})
    try:
        measure(parallel, probes, SMALL_PROBE)
    except UnsupportedModelError as err:
        print(f"REFUSED {dist.get_rank()} {err}", flush=True)
    if dist.get_rank() == 0:
        torch.save(saved, out / "sharded.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
