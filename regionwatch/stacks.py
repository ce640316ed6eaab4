"""Checkpoints of other training stacks: litgpt folders, OLMo-core `step{N}` folders, nanoGPT files.

What replay meets beyond Hugging Face, each with its own records and its own rules:

- **litgpt** (`step-XXXXXXXX/` with `lit_model.pth` and `model_config.yaml`): the step is the
  folder's (or the checkpoint's `step_count`); litgpt records no token count (its log computes
  iter x micro-batch x sequence length x world), so tokens need `--tokens-per-step`. The model is
  litgpt's `GPT` of the YAML config (read with `yaml.safe_load`).
- **OLMo-core** (`step{N}/` with `train/rank0.pt` and `model_and_optim/`): step and tokens from
  the trainer state in `train/rank0.pt` (weights-only unpickling; numpy arrays of its RNG state
  allowed, nothing else); weights from the DCP files, the model's keys only, through
  `regionwatch.dcp` (no process group, no code). The model is OLMo-core's `TransformerConfig`
  from the `config.json` its `ConfigSaverCallback` writes, when every class it names is
  OLMo-core's.
- **nanoGPT** (`ckpt.pt` with `model_args`): step `iter_num`; tokens iter x gradient
  accumulation x batch size x block size from the `config` it saves, else `--tokens-per-step`.
  nanoGPT's model class lives in the user's `model.py`, so the model comes only from a builder
  the user names (`--model-builder pkg.module:function`).

A named builder (`resolve_builder`) is the only code replay imports, and only when named; it is
called with the checkpoint's recorded model settings (a dict) and returns the `nn.Module`. Every
model is first built on the meta device and its weights' names and shapes checked against the
checkpoint's before anything is allocated.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from regionwatch.dcp import is_dcp_folder, read_index
from regionwatch.decoder import Decoder
from regionwatch.errors import CheckpointError, ConfigError
from regionwatch.loading import (
    COMPILED_SEGMENT,
    LoadOptions,
    StackKind,
    read_checkpoint,
    seeded_init,
)

logger = logging.getLogger(__name__)

LITGPT_WEIGHTS, LITGPT_CONFIG = "lit_model.pth", "model_config.yaml"
OLMO_TRAIN_STATE = "train/rank0.pt"  # OLMo-core's trainer state, rank 0's copy
OLMO_WEIGHTS = "model_and_optim"  # the DCP folder of model and optimizer state
OLMO_CONFIG = "config.json"  # ConfigSaverCallback's record; the model's config under "model"
OLMO_MODEL_PREFIX = "model."  # the model's keys in the DCP folder (the optimizer's: "optim.")
OLMO_CLASS_FIELD = "_CLASS_"  # how OLMo-core's configs name the class to build
NANOGPT_FILE = "ckpt.pt"
# nanoGPT's tokens per iteration, from the `config` it saves (train.py's own formula).
NANOGPT_TOKEN_FIELDS = ("gradient_accumulation_steps", "batch_size", "block_size")
# The numpy types of OLMo-core's saved RNG state (its numpy generator state is an array).
NUMPY_STATE = (np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType)
BUILDER_SPEC = re.compile(r"(?P<module>[A-Za-z_]\w*(\.[A-Za-z_]\w*)*):(?P<function>[A-Za-z_]\w*)")

# Where each stack's models keep what the probe reads.
GPT_LAYOUT = Decoder(blocks="transformer.h", final_norm="transformer.ln_f", head="lm_head")
OLMO_CORE_DECODER = Decoder(blocks="blocks", final_norm="lm_head.norm", head="lm_head.w_out")
DECODERS: Mapping[StackKind, Decoder] = MappingProxyType(
    {"litgpt": GPT_LAYOUT, "nanogpt": GPT_LAYOUT, "olmo_core": OLMO_CORE_DECODER}
)

Builder = Callable[[dict[str, Any]], nn.Module]


def stack_kind(path: Path) -> StackKind | None:
    """The stack whose checkpoint `path` is, or None."""
    if path.is_dir() and (path / LITGPT_WEIGHTS).is_file() and (path / LITGPT_CONFIG).is_file():
        return "litgpt"
    if path.is_dir() and (path / OLMO_TRAIN_STATE).is_file() and is_dcp_folder(path / OLMO_WEIGHTS):
        return "olmo_core"
    if path.is_file() and path.name == NANOGPT_FILE:
        return "nanogpt"
    return None


def is_nanogpt(checkpoint: Any) -> bool:
    """Whether a read checkpoint is nanoGPT's dict (its weights beside `model_args`)."""
    return isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model_args"), Mapping)


def position(kind: StackKind, path: Path, trust_pickle: bool) -> tuple[int | None, int | None]:
    """(step, tokens) as the checkpoint records them; None where it records none.

    Raises:
        CheckpointError: an unreadable record.
    """
    if kind == "olmo_core":
        state = _olmo_train_state(path)
        return _count(state.get("global_step")), _count(state.get("global_train_tokens_seen"))
    if kind == "litgpt":
        data = read_checkpoint(path / LITGPT_WEIGHTS, trust_pickle=trust_pickle)
        step = data.get("step_count") if isinstance(data, Mapping) else None
        return _count(step), None
    data = read_checkpoint(path, trust_pickle=trust_pickle)
    if not is_nanogpt(data):
        raise CheckpointError(f"{path}: not a nanoGPT checkpoint (no model_args in it)")
    step = _count(data.get("iter_num"))
    config = data.get("config")
    sizes = [config.get(k) for k in NANOGPT_TOKEN_FIELDS] if isinstance(config, Mapping) else []
    if step is None or len(sizes) != len(NANOGPT_TOKEN_FIELDS) or None in map(_count, sizes):
        return step, None
    return step, step * int(np.prod(sizes))


def resolve_builder(spec: str) -> Builder:
    """Import the function `pkg.module:function` names: the one code replay runs, when named.

    Raises:
        ConfigError: a malformed name, a module that does not import, or no such function.
    """
    match = BUILDER_SPEC.fullmatch(spec)
    if match is None:
        raise ConfigError(
            f"--model-builder {spec!r}: need pkg.module:function, e.g. model:build for a "
            "build(model_args) -> nn.Module in model.py on the Python path"
        )
    try:
        module = importlib.import_module(match["module"])
    except ImportError as err:
        raise ConfigError(
            f"--model-builder {spec}: cannot import {match['module']} ({err}); run from the "
            "directory holding it, or add it to PYTHONPATH"
        ) from err
    builder = getattr(module, match["function"], None)
    if not callable(builder):
        raise ConfigError(
            f"--model-builder {spec}: {match['module']} has no function {match['function']!r}"
        )
    return builder


def load_stack_model(kind: StackKind, path: Path, options: LoadOptions) -> nn.Module:
    """Build a stack checkpoint's model and load its weights, in eval mode.

    Raises:
        CheckpointError: unreadable, no way to build the model (the message names
            `--model-builder`), or weights that do not fit it.
        ConfigError: a builder that returns no `nn.Module`.
    """
    if kind == "olmo_core":
        index = read_index(path / OLMO_WEIGHTS)
        shapes = {k: v[0] for k, v in index.tensor_shapes(OLMO_MODEL_PREFIX).items()}
        build = _olmo_build(path, options.model_builder)
        model = _checked_build(build, shapes, path)
        weights = index.read(OLMO_MODEL_PREFIX + name for name in shapes)
        state = {name[len(OLMO_MODEL_PREFIX) :]: t for name, t in weights.items()}
    else:
        file = path / LITGPT_WEIGHTS if kind == "litgpt" else path
        data = read_checkpoint(file, trust_pickle=options.trust_pickle)
        state = _weights(data, file)
        if kind == "litgpt":
            build = _litgpt_build(path, options.model_builder)
        elif options.model_builder is None:
            raise CheckpointError(
                f"{path}: a nanoGPT checkpoint; its model class lives in your code, so name the "
                "function that builds it from model_args: --model-builder pkg.module:function "
                "(e.g. model:build with def build(args): return GPT(GPTConfig(**args)))"
            )
        else:
            build = _builder_build(options.model_builder, dict(data["model_args"]), path)
        model = _checked_build(build, {k: v.shape for k, v in state.items()}, path)
    model.load_state_dict(state, strict=True)
    return model.to(device=options.device, dtype=options.dtype).eval()


def _checked_build(
    build: Callable[[], nn.Module], shapes: Mapping[str, torch.Size], path: Path
) -> nn.Module:
    """Build on the meta device, check names and shapes against the checkpoint's, then for real."""
    with torch.device("meta"):
        skeleton = build()
    wanted = {k: v.shape for k, v in skeleton.state_dict().items()}
    missing = sorted(set(wanted) - set(shapes))
    extra = sorted(set(shapes) - set(wanted))
    wrong = sorted(k for k in set(wanted) & set(shapes) if tuple(wanted[k]) != tuple(shapes[k]))
    if missing or extra or wrong:
        raise CheckpointError(
            f"{path}: its weights do not fit the {type(skeleton).__name__} built for it: missing "
            f"{_some(missing)}, unexpected {_some(extra)}, wrong shape "
            f"{_some(f'{k} {list(shapes[k])} != {list(wanted[k])}' for k in wrong)}; the wrong "
            "model config or builder"
        )
    with seeded_init(0):  # the init is overwritten; the caller's RNG stays as it was
        return build()


def _litgpt_build(path: Path, builder: Builder | None) -> Callable[[], nn.Module]:
    try:
        config = yaml.safe_load((path / LITGPT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path}/{LITGPT_CONFIG}: not readable YAML ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}/{LITGPT_CONFIG}: holds no mapping of model settings")
    if builder is not None:
        return _builder_build(builder, config, path)
    litgpt = _stack_module("litgpt", path)

    def build() -> nn.Module:
        return litgpt.GPT(litgpt.Config(**config))

    return build


def _olmo_build(path: Path, builder: Builder | None) -> Callable[[], nn.Module]:
    config = _olmo_model_config(path)
    if builder is not None:
        return _builder_build(builder, config or {}, path)
    if config is None:
        raise CheckpointError(
            f"{path}: no {OLMO_CONFIG} with the model's config beside it (OLMo-core's "
            "ConfigSaverCallback writes one); name the function that builds the model: "
            "--model-builder pkg.module:function"
        )
    classes = set(_classes(config))
    foreign = sorted(c for c in classes if not c.startswith("olmo_core."))
    if foreign:
        raise CheckpointError(
            f"{path}/{OLMO_CONFIG}: its model config names classes outside OLMo-core "
            f"({', '.join(foreign)}); regionwatch imports no code a checkpoint names: build the "
            "model yourself with --model-builder pkg.module:function"
        )
    transformer = _stack_module("olmo_core.nn.transformer", path)
    model_config = transformer.TransformerConfig.from_dict(config)

    def build() -> nn.Module:
        return model_config.build(init_device=str(torch.get_default_device()))

    return build


def _builder_build(builder: Builder, config: dict[str, Any], path: Path) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = builder(dict(config))
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"--model-builder returned a {type(model).__name__} for {path}; it must return "
                "the model (an nn.Module) built from the settings it is given"
            )
        return model

    return build


def _olmo_model_config(path: Path) -> dict[str, Any] | None:
    file = path / OLMO_CONFIG
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: not readable JSON ({err})") from err
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, dict) else None


def _classes(config: Any) -> Iterator[str]:
    """Every class an OLMo-core config names, at any depth."""
    if isinstance(config, Mapping):
        for key, value in config.items():
            if key == OLMO_CLASS_FIELD:
                yield str(value)
            else:
                yield from _classes(value)
    elif isinstance(config, list):
        for value in config:
            yield from _classes(value)


def _olmo_train_state(path: Path) -> Mapping[str, Any]:
    file = path / OLMO_TRAIN_STATE
    with _numpy_arrays():
        state = read_checkpoint(file)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{file}: holds no trainer state")
    return state


@contextmanager
def _numpy_arrays() -> Iterator[None]:
    # Plain numpy arrays only (no object arrays without further allowed types): data, not code.
    with torch.serialization.safe_globals(list(NUMPY_STATE)):
        yield


def _weights(data: Any, path: Path) -> dict[str, Tensor]:
    """The model's weights in a litgpt or nanoGPT checkpoint: under "model", or the whole dict."""
    found = data.get("model") if isinstance(data, Mapping) and "model" in data else data
    if not isinstance(found, Mapping) or not all(isinstance(v, Tensor) for v in found.values()):
        raise CheckpointError(f"{path}: no state dict of tensors in it (looked under 'model')")
    return {COMPILED_SEGMENT.sub(r"\1", k): v for k, v in found.items()}


def _stack_module(name: str, path: Path) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise CheckpointError(
            f"{path}: building its model needs {name.split('.')[0]} ({err}); install the "
            'stacks extra (pip install "regionwatch[stacks]", see the README), or name your '
            "own builder with --model-builder pkg.module:function"
        ) from err


def _count(value: Any) -> int | None:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        return None
    return int(value)


def _some(items: Any, count: int = 3) -> str:
    items = list(items)
    if not items:
        return "none"
    return (
        f"[{', '.join(map(str, items[:count]))}{', ...' if len(items) > count else ''}] "
        f"({len(items)})"
    )
