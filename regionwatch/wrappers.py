"""Model wrappers: the module a user hands over, peeled down to the causal LM that is measured.

Training code wraps its model: `DistributedDataParallel`, `torch.compile` (`OptimizedModule`),
Lightning Fabric's `_FabricModule`, FSDP1's `FullyShardedDataParallel`. Every wrapper here keeps
the very module it wraps (the same parameters, updated in place), so measuring the inner module
measures the weights being trained; FSDP1 is measured through its wrapper, which `unwrap` returns
as the root (`distributed.unwrap`). FSDP2 (`fully_shard`) shards in place and needs no unwrapping.
A wrapper of any other kind is refused by name, before the first step: guessing at its insides
could measure a copy, or a module the training never updates.
"""

from __future__ import annotations

import sys

from torch import nn
from torch.jit import ScriptModule

from regionwatch import distributed
from regionwatch.errors import ConfigError

# Modules that hold the module they wrap under this attribute, loaded only when the host is: a
# wrapper whose module is not imported cannot be what the user handed over.
_HOST_WRAPPERS = (
    ("lightning.fabric.wrappers", "_FabricModule", "module"),  # Fabric's `module` property
    ("lightning_fabric.wrappers", "_FabricModule", "module"),  # the standalone package
    ("deepspeed", "DeepSpeedEngine", "module"),
)


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The causal LM inside `model`, and its FSDP1 root (or None), every known wrapper peeled.

    Args:
        model: what the user passed: the causal LM or a wrapper of it (nested wrappers too, e.g.
            `torch.compile(DDP(model))`).

    Returns:
        (causal LM, FSDP1 root or None).

    Raises:
        ConfigError: `model` is not an `nn.Module`, a TorchScript module, or a wrapper of an
            unknown kind (a module whose one child is called `module`), naming the fix.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model={model!r}: need the torch.nn.Module being trained, not {type(model).__name__}"
        )
    outer, root = model, None
    while True:  # wrappers nest: FSDP1 around a compiled module, and so on
        peeled, root = distributed.unwrap(model, root)
        inner = peeled if peeled is not model else _inner(model)
        if inner is None:
            break
        model = inner
    if isinstance(model, ScriptModule):
        raise ConfigError(
            f"model is a TorchScript {type(model).__name__}: regionwatch hooks the blocks of an "
            "eager module; pass the module before torch.jit.script"
        )
    children = dict(model.named_children())
    if list(children) == ["module"]:
        raise ConfigError(
            f"model is a {type(model).__name__} wrapping a {type(children['module']).__name__}, "
            "a wrapper regionwatch does not know (it unwraps DistributedDataParallel, "
            "DataParallel, torch.compile, FullyShardedDataParallel, Lightning Fabric and "
            f"DeepSpeed); pass the wrapped model itself, e.g. model.module, instead of the "
            f"{type(outer).__name__}"
        )
    return model, root


def _inner(model: nn.Module) -> nn.Module | None:
    """The module `model` wraps, if it is a wrapper known to keep it; else None."""
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return model.module
    if isinstance(model, OptimizedModule):  # torch.compile's: the original module is kept
        return model._orig_mod
    for module_name, class_name, attribute in _HOST_WRAPPERS:
        kind = getattr(sys.modules.get(module_name), class_name, None)
        if kind is not None and isinstance(model, kind):
            return getattr(model, attribute)
    return None
