"""How a model is spread over processes, and the collectives a measurement of it needs.

Three layouts can be measured correctly: one process, data parallel (DDP: every rank holds the
whole model, so each rank measures its own shard of the probe set with plain forwards), and FSDP2
(`torch.distributed.fsdp.fully_shard` over a 1-D data-parallel mesh). Everything else is refused
before the first step by `layout`: FSDP1 (`FullyShardedDataParallel` flattens parameters into
storage only its root forward can gather), DeepSpeed ZeRO-3 (partitioned parameters gathered by
its own hooks), and tensor parallelism (a block's hooks would see local shards of the residual).

FSDP2 gathers each block's parameters collectively in that block's forward pre-hook, so every rank
must make the same sequence of forward calls: `engine.run` replicates the clean passes on every
rank and splits each context's patched queries evenly (the short share padded), so the chunk plan
is identical everywhere; `unsharded_outside` gathers the parameters outside the blocks
(embeddings, final norm, unembedding: the FSDP root's own) for the whole measurement.

The monitor's ranks agree through `broadcast_object` (rank zero's state and probe set) and
`gather_objects` (every rank's measured shard, merged on rank zero); both are no-ops in one process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch import distributed as dist

from regionwatch.errors import UnsupportedModelError

SUPPORTED = (
    "regionwatch measures a single process, DDP, or FSDP2 (torch.distributed.fsdp.fully_shard, "
    "data parallel only; Lightning ModelParallelStrategy with tensor_parallel_size=1)"
)

Layout = Literal["local", "fsdp2"]


def layout(model: nn.Module) -> Layout:
    """How `model`'s parameters are spread: "local" (whole on this rank) or "fsdp2".

    Raises:
        UnsupportedModelError: FSDP1, DeepSpeed ZeRO-3 or tensor-parallel parameters, naming what
            is supported. Raised before any forward pass, on every rank alike (never a hang).
    """
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise UnsupportedModelError(
            f"FSDP1 (FullyShardedDataParallel) cannot be measured in place: its flat parameters "
            f"are gathered only by the root's forward; {SUPPORTED}. Switch to FSDP2 (fully_shard; "
            'HF: fsdp_config={"fsdp_version": 2}) or DDP'
        )
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # DeepSpeed ZeRO-3 tags every partitioned param
        raise UnsupportedModelError(
            f"DeepSpeed ZeRO-3 partitions parameters outside regionwatch's reach; {SUPPORTED}. "
            "Use ZeRO stage 1 or 2, or FSDP2"
        )
    sharded = [p for p in params if isinstance(p, DTensor)]
    if not sharded:
        return "local"
    fsdp = any(isinstance(m, FSDPModule) for m in model.modules())
    # FSDP2 shards dim 0 on one mesh dim (HSDP also replicates on another); a second Shard is
    # tensor parallelism. A mesh of a part of the world (pipeline stages) is not data parallel.
    data_parallel = all(
        sum(isinstance(x, Shard) for x in p.placements) == 1
        and all(x == Shard(0) or isinstance(x, Replicate) for x in p.placements)
        and p.device_mesh.size() == dist.get_world_size()
        for p in sharded
    )
    if not (fsdp and data_parallel):
        raise UnsupportedModelError(
            "the model holds DTensor parameters sharded for tensor parallelism (or on a 2-D mesh): "
            f"the probe's hooks would see local shards of the residual stream; {SUPPORTED}"
        )
    return "fsdp2"


def group_of() -> tuple[int, int, dist.ProcessGroup]:
    """(rank, world, group) sharing an FSDP2 model's queries: the whole world.

    Its mesh covers the world (see `layout`), so every rank of every FSDP collective makes the
    same calls.
    """
    group = dist.group.WORLD
    return dist.get_rank(group), dist.get_world_size(group), group


@contextmanager
def unsharded_outside(
    model: nn.Module, blocks: Sequence[nn.Module], *, cast_inputs: bool = True
) -> Iterator[None]:
    """Gather the FSDP2 parameters that live outside the blocks for the duration; reshard after.

    The probe calls the decoder stack and the unembedding directly, never the FSDP root's forward,
    so the root's own parameters (embeddings, final norm, head) would stay sharded DTensors. They
    are gathered once here, on every rank (a collective); each block still gathers and frees its
    own in its forward, so at most one block's full parameters exist at a time, as in training.
    No `summon_full_params`, no copy of the model. With `cast_inputs=False` a
    `MixedPrecisionPolicy` keeps gathering in its `param_dtype` but no longer rounds each block's
    input to it (fp32 numerics: the residual stream must stay fp32 between blocks).

    Raises:
        UnsupportedModelError: parameters outside the blocks still sharded after the gather (the
            FSDP root wraps the model from outside: apply fully_shard to the causal LM itself).
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    inside = {id(m) for block in blocks for m in block.modules()}
    outer = [m for m in model.modules() if isinstance(m, FSDPModule) and id(m) not in inside]
    states = [m._get_fsdp_state() for m in model.modules() if isinstance(m, FSDPModule)]
    policies = [state._mp_policy for state in states]
    if outer:
        # FSDP2 picks its root lazily, at the first forward; the probe may come first (the step-0
        # baseline), and a block's forward must not be taken for the root's. Private, but the
        # only way to finish FSDP's setup without a forward pass of the whole model.
        outer[0]._get_fsdp_state()._lazy_init()
    try:
        if not cast_inputs:  # private, as above: the policy has no public switch
            for state, policy in zip(states, policies, strict=True):
                state._mp_policy = replace(policy, cast_forward_inputs=False, output_dtype=None)
        for module in outer:
            module.unshard()
        left = [
            f"{name}.{key}" if name else key
            for name, module in model.named_modules()
            if id(module) not in inside
            for key, p in module.named_parameters(recurse=False)
            if isinstance(p, DTensor)
        ]
        if left:
            raise UnsupportedModelError(
                f"parameters {left[:3]} stay sharded outside the blocks: the FSDP2 root wraps the "
                "model from outside; apply fully_shard to the causal LM (after its blocks)"
            )
        yield
    finally:
        for module in outer:
            module.reshard()
        for state, policy in zip(states, policies, strict=True):
            state._mp_policy = policy


def gather_rows(tensor: Tensor, world: int, group: dist.ProcessGroup) -> Tensor:
    """Every rank's equally shaped `tensor`, stacked in rank order: [world, *tensor.shape]."""
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor.contiguous(), group=group)  # gloo has no all_gather_into_tensor
    return torch.stack(out)


def local_shard(tensor: Tensor) -> Tensor:
    """This rank's shard of a parameter (an FSDP2 DTensor), read without a collective."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


def broadcast_object(obj: Any, world: int) -> Any:
    """Rank zero's `obj` on every rank."""
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, rank: int, world: int) -> list[Any]:
    """Every rank's `obj` on rank zero (in rank order); [] elsewhere."""
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []
