"""torch.distributed.checkpoint folders read as data: tensors by name, no process group, no code.

DCP keeps its index (`.metadata`) as a plain pickle, and torch's reader (like OLMo-core's, which
also loads every tensor with `weights_only=False`) unpickles it whole: a checkpoint from
elsewhere could run code. Here the index goes through an unpickler that builds only the index's
own record types (`ALLOWED`), every tensor through `torch.load(weights_only=True)`, and only the
tensors asked for are read, each from a byte range inside the folder. Sizes come from the index,
so a caller checks them against its model before anything is allocated (`tensor_shapes`).
Shards of one tensor (an FSDP checkpoint's chunks) are put back together.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

from regionwatch.errors import CheckpointError

METADATA_FILE = ".metadata"
# What a DCP index may name: its record types, torch's Size and dtypes, the layout helper, and a
# path (read as a pure path: no file system access). Both torch's and OLMo-core's writers record
# byte ranges as a `_StorageInfo` (same fields); either is read as torch's, so that reading an
# OLMo-core index needs no OLMo-core.
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
ALLOWED = (
    {
        (_METADATA_MODULE, name): getattr(dcp_metadata, name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch", "Size"): torch.Size,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
        ("olmo_core.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    }
    | {  # torch records the checkpoint's path
        ("pathlib", name): pathlib.PureWindowsPath if "Windows" in name else pathlib.PurePosixPath
        for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
    }
)


@dataclass(frozen=True)
class Index:
    """A DCP folder's index: each tensor's shape and dtype, and where its chunks lie."""

    folder: Path
    metadata: Any  # torch.distributed.checkpoint.metadata.Metadata, read by `read_index`

    def tensor_shapes(self, prefix: str = "") -> dict[str, tuple[torch.Size, torch.dtype]]:
        """(shape, dtype) of every tensor whose name starts with `prefix`, the prefix dropped."""
        return {
            name[len(prefix) :]: (entry.size, entry.properties.dtype)
            for name, entry in self.metadata.state_dict_metadata.items()
            if name.startswith(prefix) and isinstance(entry, dcp_metadata.TensorStorageMetadata)
        }

    def read(self, names: Iterable[str]) -> dict[str, Tensor]:
        """The named tensors, whole, on the CPU.

        Raises:
            CheckpointError: a name that is no tensor, a byte range outside the folder or its
                file, a chunk that is no tensor of its recorded size, or chunks that do not
                cover their tensor.
        """
        return {name: self._tensor(name) for name in names}

    def _tensor(self, name: str) -> Tensor:
        entry = self.metadata.state_dict_metadata.get(name)
        if not isinstance(entry, dcp_metadata.TensorStorageMetadata):
            raise CheckpointError(f"{self.folder}: holds no tensor {name!r}")
        whole = torch.empty(entry.size, dtype=entry.properties.dtype)
        covered = 0
        for chunk in entry.chunks:
            index = dcp_metadata.MetadataIndex(name, chunk.offsets)
            part = self._chunk(index, chunk.sizes, whole.dtype)
            target = whole
            for dim, (start, length) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                target = target.narrow(dim, start, length)
            target.copy_(part)
            covered += part.numel()
        if covered != whole.numel():
            raise CheckpointError(
                f"{self.folder}: the chunks of {name!r} hold {covered} of its {whole.numel()} "
                "values; the checkpoint is incomplete"
            )
        return whole

    def _chunk(self, index: Any, sizes: torch.Size, dtype: torch.dtype) -> Tensor:
        info = _storage(self.metadata.storage_data, index)
        if info is None or getattr(info, "transform_descriptors", None):
            raise CheckpointError(
                f"{self.folder}: no plain stored chunk for {index.fqn!r} at {list(index.offset)}"
            )
        file = self.folder / info.relative_path
        if Path(info.relative_path).is_absolute() or not file.resolve().is_relative_to(
            self.folder.resolve()
        ):
            raise CheckpointError(
                f"{self.folder}: {index.fqn!r} is stored in {info.relative_path!r}, outside the "
                "checkpoint folder; regionwatch reads weights only from inside it"
            )
        if not file.is_file() or info.offset < 0 or info.offset + info.length > file.stat().st_size:
            raise CheckpointError(
                f"{self.folder}: {index.fqn!r} lies past the end of {info.relative_path} (or the "
                "file is missing); the checkpoint is incomplete"
            )
        with file.open("rb") as stream:
            stream.seek(info.offset)
            data = io.BytesIO(stream.read(info.length))
        try:
            part = torch.load(data, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            raise CheckpointError(
                f"{self.folder}: {index.fqn!r} in {info.relative_path} is not a readable "
                f"tensor ({type(err).__name__})"
            ) from err
        if not isinstance(part, Tensor) or part.shape != sizes or part.dtype != dtype:
            raise CheckpointError(
                f"{self.folder}: {index.fqn!r} in {info.relative_path} is not a {dtype} tensor "
                f"of shape {list(sizes)}"
            )
        return part


def is_dcp_folder(path: Path) -> bool:
    """Whether `path` holds a DCP index."""
    return (path / METADATA_FILE).is_file()


def read_index(folder: Path) -> Index:
    """A DCP folder's index, unpickled with only the index's own types allowed.

    Raises:
        CheckpointError: no index, or one that names anything else (it could run code).
    """
    try:
        with (folder / METADATA_FILE).open("rb") as stream:
            metadata = _IndexUnpickler(stream).load()
    except OSError as err:
        raise CheckpointError(f"{folder}: no readable {METADATA_FILE} ({err})") from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{folder}/{METADATA_FILE}: not a DCP index ({err})") from err
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"{folder}/{METADATA_FILE}: not a DCP index")
    return Index(folder=folder, metadata=metadata)


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"it names {module}.{name}, which a DCP index does not hold; refused, as unpickling "
            "it could run code"
        )


def _storage(storage: Mapping[Any, Any], index: Any) -> Any:
    """A chunk's byte range, by name and offsets (writers differ in the index's `index` hint)."""
    found = storage.get(index)
    if found is not None:
        return found
    offsets = tuple(index.offset)
    return next(
        (v for k, v in storage.items() if k.fqn == index.fqn and tuple(k.offset) == offsets),
        None,
    )
