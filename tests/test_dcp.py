"""DCP folders read as data: the tensors asked for, no process group, no code from the index."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

from regionwatch.dcp import METADATA_FILE, read_index
from regionwatch.errors import CheckpointError

WEIGHTS = {"model.w": torch.arange(12.0).reshape(3, 4), "model.b": torch.tensor([0.5, -1.0])}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A DCP folder saved by torch itself, in one process: two model tensors and a step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save({**WEIGHTS, "optim.m": torch.zeros(4), "step": 3}, checkpoint_id=tmp_path / "c")
    return tmp_path / "c"


def rewrite_storage(folder: Path, **changes: object) -> None:
    """Change every byte-range record of the index (a damaged or hostile checkpoint)."""
    index = read_index(folder).metadata
    index.storage_data = {
        key: dataclasses.replace(info, **changes) for key, info in index.storage_data.items()
    }
    (folder / METADATA_FILE).write_bytes(pickle.dumps(index))


def test_dcp_reads_the_named_tensors(folder: Path) -> None:
    """Shapes of one prefix from the index alone; the tensors equal what was saved."""
    index = read_index(folder)
    assert index.tensor_shapes("model.") == {
        "w": (torch.Size([3, 4]), torch.float32),
        "b": (torch.Size([2]), torch.float32),
    }
    read = index.read(["model.w", "model.b"])
    for name, tensor in WEIGHTS.items():
        assert torch.equal(read[name], tensor)


class Exploit:
    """What a hostile index could hold: unpickling it runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_dcp_index_naming_code_is_refused_unrun(folder: Path, tmp_path: Path) -> None:
    """An index that names anything but DCP's records is refused, and nothing in it runs."""
    marker = tmp_path / "ran"
    (folder / METADATA_FILE).write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(CheckpointError, match=r"names posix\.system.*could run code"):
        read_index(folder)
    assert not marker.exists()


def test_dcp_weights_outside_the_folder_are_refused(folder: Path) -> None:
    """A byte range in a file outside the checkpoint folder is never read."""
    rewrite_storage(folder, relative_path="../elsewhere.distcp")
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        read_index(folder).read(["model.w"])


def test_dcp_truncated_shard_is_refused(folder: Path) -> None:
    """A byte range past the end of its file says the checkpoint is incomplete."""
    for shard in folder.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="past the end"):
        read_index(folder).read(["model.w"])


def test_dcp_unknown_tensor_is_refused(folder: Path) -> None:
    """A name the index does not hold as a tensor is named in the error."""
    with pytest.raises(CheckpointError, match=r"no tensor 'model\.missing'"):
        read_index(folder).read(["model.missing"])


def test_dcp_shards_are_put_back_together(tmp_path: Path) -> None:
    """A tensor saved as two row shards (as FSDP ranks write it) reads back whole."""
    whole = torch.arange(24.0).reshape(6, 4)
    folder = tmp_path / "sharded"
    folder.mkdir()
    storage, chunks = {}, []
    for rank, (start, rows) in enumerate([(0, 2), (2, 4)]):  # uneven, as FSDP pads the last
        offsets, sizes = torch.Size([start, 0]), torch.Size([rows, 4])
        buffer = io.BytesIO()
        torch.save(whole[start : start + rows].clone(), buffer)
        (folder / f"__{rank}_0.distcp").write_bytes(buffer.getvalue())
        index = dcp_metadata.MetadataIndex("model.w", offsets)
        storage[index] = _StorageInfo(f"__{rank}_0.distcp", 0, len(buffer.getvalue()))
        chunks.append(dcp_metadata.ChunkStorageMetadata(offsets=offsets, sizes=sizes))
    entry = dcp_metadata.TensorStorageMetadata(
        properties=dcp_metadata.TensorProperties(dtype=torch.float32),
        size=whole.shape,
        chunks=chunks,
    )
    metadata = dcp_metadata.Metadata(state_dict_metadata={"model.w": entry}, storage_data=storage)
    (folder / METADATA_FILE).write_bytes(pickle.dumps(metadata))
    assert torch.equal(read_index(folder).read(["model.w"])["model.w"], whole)
    metadata.state_dict_metadata["model.w"].chunks.pop()  # the second rank's shard went missing
    (folder / METADATA_FILE).write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="hold 8 of its 24 values"):
        read_index(folder).read(["model.w"])
