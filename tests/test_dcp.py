"""DCP folders read as data: the tensors asked for, no process group, no code from the index."""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

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
