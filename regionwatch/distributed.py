"""How a model is spread over processes, and the collectives a measurement of it needs.

Four layouts can be measured correctly: one process, data parallel (DDP: every rank holds the
whole model, so each rank measures its own shard of the probe set with plain forwards), FSDP2
(`torch.distributed.fsdp.fully_shard` over a 1-D data-parallel mesh) and FSDP1
(`FullyShardedDataParallel`). Everything else is refused before the first step by `layout`:
DeepSpeed ZeRO-3 (partitioned parameters gathered by its own hooks) and tensor parallelism (a
block's hooks would see local shards of the residual).

FSDP gathers each block's parameters collectively in that block's forward, so every rank must make
the same sequence of forward calls: `engine.run` replicates the clean passes on every rank and
splits each context's patched queries evenly (the short share padded), so the chunk plan is
identical everywhere. The parameters outside the blocks (embeddings, final norm, unembedding: the
FSDP root's own) are gathered for the whole measurement: FSDP2's by `unsharded_outside`, FSDP1's by
running the measurement inside the root's forward (`within_forward`), the only place FSDP1
gathers them. Never `summon_full_params`, never a copy of the model.

The monitor's ranks agree through `broadcast_object` (rank zero's state and probe set) and
`gather_objects` (every rank's measured shard, merged on rank zero); both are no-ops in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn
from torch import distributed as dist

from regionwatch.errors import UnsupportedModelError

SUPPORTED = (
    "regionwatch measures a single process, DDP, FSDP2 (torch.distributed.fsdp.fully_shard, data "
    "parallel only; Lightning ModelParallelStrategy with tensor_parallel_size=1) or FSDP1 "
    "(FullyShardedDataParallel; Lightning FSDPStrategy, HF fsdp=)"
)

Layout = Literal["local", "fsdp1", "fsdp2"]
T = TypeVar("T")


def unwrap(model: nn.Module, root: nn.Module | None = None) -> tuple[nn.Module, nn.Module | None]:
    """The causal LM and its FSDP1 root: an FSDP1-wrapped model is measured through its wrapper.

    Args:
        model: the causal LM, or the `FullyShardedDataParallel` module wrapping it.
        root: the FSDP1 module that wraps `model` from further out (Lightning's FSDPStrategy
            wraps the LightningModule), if any.

    Returns:
        (causal LM, FSDP1 root or None).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return model.module, root or model
    return model, root


def layout(model: nn.Module, root: nn.Module | None = None) -> Layout:
    """How `model`'s parameters are spread: "local" (whole on this rank), "fsdp1" or "fsdp2".

    Args:
        model: the causal LM (see `unwrap`).
        root: the FSDP1 module wrapping `model`, when there is one.

    Raises:
        UnsupportedModelError: DeepSpeed ZeRO-3 or tensor-parallel parameters, or FSDP1 parameters
            outside the blocks sharded by a root that was not given, naming what is supported.
            Raised before any forward pass, on every rank alike (never a hang).
    """
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if root is not None or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        _check_fsdp1(model, root)
        return "fsdp1"
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # DeepSpeed ZeRO-3 tags every partitioned param
        raise UnsupportedModelError(
            f"DeepSpeed ZeRO-3 partitions parameters outside regionwatch's reach; {SUPPORTED}. "
            "Use ZeRO stage 1 or 2, or FSDP"
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


def fsdp1_root(top: nn.Module, model: nn.Module) -> nn.Module | None:
    """The outermost FSDP1 module in `top` (itself included) that wraps `model`, or None.

    `top` is what the trainer runs: Lightning's `trainer.strategy.model`, HF's `model_wrapped`.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    for module in top.modules():  # pre-order: the outermost come first
        if isinstance(module, FullyShardedDataParallel) and _holds(module, model):
            return module
    return None


def _holds(outer: nn.Module, model: nn.Module) -> bool:
    return any(m is model for m in outer.modules())


def _check_fsdp1(model: nn.Module, root: nn.Module | None) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrappers = [m for m in (root, *model.modules()) if isinstance(m, FullyShardedDataParallel)]
    if any(m.cpu_offload.offload_params for m in wrappers):
        raise UnsupportedModelError(
            "FSDP1 with CPUOffload(offload_params=True) keeps the weights on the host and computes "
            f"elsewhere, out of the probe's sight; {SUPPORTED}, without parameter offload"
        )
    if root is not None:
        if not (isinstance(root, FullyShardedDataParallel) and _holds(root, model)):
            raise UnsupportedModelError(
                f"root={type(root).__name__} is not the FullyShardedDataParallel module that "
                "wraps the measured model; pass the outermost FSDP module (Lightning: "
                "trainer.strategy.model), or root=None for a model FSDP1 does not wrap as a whole"
            )
        return
    # Without a root, every parameter outside the blocks must be whole on this rank. An FSDP1
    # root shards them into its flat parameter: 1-D views (use_orig_params=True) or nothing.
    embed = model.get_input_embeddings()
    weight = getattr(embed, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.shape != (
        embed.num_embeddings,
        embed.embedding_dim,
    ):
        raise UnsupportedModelError(
            "the parameters outside the decoder blocks are sharded by a FullyShardedDataParallel "
            "(FSDP1) root that wraps the model from outside, and FSDP1 gathers them only in that "
            "root's forward: pass the root (measure(model, ..., root=fsdp_root), or "
            "measure(fsdp_root, ...) when it wraps the causal LM itself; HF Trainer: "
            "RegionMonitorCallback(...).attach(trainer), through which the callback finds it)"
        )


def within_forward(root: nn.Module, fn: Callable[[], T]) -> T:
    """Run `fn` inside the forward of FSDP1 root `root`, and return what it returns.

    FSDP1 gathers the root's own parameters (embeddings, final norm, head) only in the root's
    forward, and has no public call to gather them otherwise (`summon_full_params` must not wrap a
    forward, and gathers every block at once). So the wrapped module's forward is swapped for
    `fn` for one call of the root, the way Lightning redirects a LightningModule's steps through
    its FSDP wrapper: the root gathers, `fn` runs the blocks (each gathers and frees its own, as
    in training). A collective: every rank must call it. As after any forward of the root (a
    validation pass, say), FSDP1 keeps the root's gathered parameters until the next training
    step's backward frees them; the drivers measure only after an optimizer step, so those stay
    the current weights.
    """
    inner = root.module
    own = vars(inner).get("forward")  # a forward patched onto the instance (accelerate's autocast)
    out: list[T] = []

    def put_back() -> None:
        if own is None:
            vars(inner).pop("forward", None)
        else:
            inner.forward = own

    def redirected(*_args: Any, **_kwargs: Any) -> None:
        put_back()  # `fn` sees the module as it was
        out.append(fn())

    inner.forward = redirected
    try:
        root()
    finally:
        put_back()
    return out[0]


def group_of() -> tuple[int, int, dist.ProcessGroup]:
    """(rank, world, group) sharing a sharded model's queries: the whole world.

    An FSDP2 mesh covers the world (see `layout`), and FSDP1 collectives only need every rank of
    its process group to make the same calls, which every rank of the world does.
    """
    group = dist.group.WORLD
    return dist.get_rank(group), dist.get_world_size(group), group


@contextmanager
def keeping_input_dtype(model: nn.Module) -> Iterator[None]:
    """Stop FSDP mixed precision from rounding each block's input to its `param_dtype`.

    fp32 numerics need the residual stream to stay fp32 between blocks; the blocks still gather
    their parameters in `param_dtype`, which `access.upcasting` widens. Neither FSDP has a public
    switch: this sets FSDP2's per-module `_mp_policy` and FSDP1's `mixed_precision` for the
    duration (private; tests/test_fsdp.py fails if they move).
    """
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    saved: list[tuple[Any, str, Any]] = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state, name = module._get_fsdp_state(), "_mp_policy"
        elif isinstance(module, FullyShardedDataParallel):
            state, name = module, "mixed_precision"
        else:
            continue
        policy = getattr(state, name)
        saved.append((state, name, policy))
        fields = {"cast_forward_inputs": False}
        if hasattr(policy, "output_dtype"):
            fields["output_dtype"] = None
        setattr(state, name, replace(policy, **fields))
    try:
        yield
    finally:
        for state, name, policy in saved:
            setattr(state, name, policy)


@contextmanager
def unsharded_outside(model: nn.Module, blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Gather the FSDP2 parameters that live outside the blocks for the duration; reshard after.

    The probe calls the decoder stack and the unembedding directly, never the FSDP root's forward,
    so the root's own parameters (embeddings, final norm, head) would stay sharded DTensors. They
    are gathered once here, on every rank (a collective); each block still gathers and frees its
    own in its forward, so at most one block's full parameters exist at a time, as in training.
    No `summon_full_params`, no copy of the model.

    Raises:
        UnsupportedModelError: parameters outside the blocks still sharded after the gather (the
            FSDP root wraps the model from outside: apply fully_shard to the causal LM itself).
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    inside = {id(m) for block in blocks for m in block.modules()}
    outer = [m for m in model.modules() if isinstance(m, FSDPModule) and id(m) not in inside]
    if outer:
        # FSDP2 picks its root lazily, at the first forward; the probe may come first (the step-0
        # baseline), and a block's forward must not be taken for the root's. Private, but the
        # only way to finish FSDP's setup without a forward pass of the whole model.
        outer[0]._get_fsdp_state()._lazy_init()
    try:
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


def gather_rows(tensor: Tensor, world: int, group: dist.ProcessGroup) -> Tensor:
    """Every rank's equally shaped `tensor`, stacked in rank order: [world, *tensor.shape]."""
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor.contiguous(), group=group)  # gloo has no all_gather_into_tensor
    return torch.stack(out)


def local_shard(tensor: Tensor) -> Tensor:
    """This rank's shard of a parameter (an FSDP2 DTensor), read without a collective."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


def rank_and_world() -> tuple[int, int]:
    """This process's global rank and the number of processes: (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
