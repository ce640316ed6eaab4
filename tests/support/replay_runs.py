"""Real checkpoints of tiny GPT-2 runs for the replay tests, and a local stand-in for the hub.

- `save_pretrained` directories of seeded models;
- an HF `Trainer` run saving `checkpoint-N` folders (with trainer_state.json), optionally with a
  live `RegionMonitorCallback`;
- a Lightning run saving `.ckpt` files with `ModelCheckpoint`, optionally with a live
  `RegionMonitor`;
- `add_hub_revision`: a Hugging Face hub cache laid out as `huggingface_hub` downloads it
  (`models--org--name/{refs/<rev>, snapshots/<commit>/<file> -> ../../blobs/<sha256>}`), so that
  `from_pretrained("org/name", revision="step2")` resolves offline through the real client.

Its fixtures (the probe set, its saved directory, corpus windows and two live runs with their
checkpoints) are shared by test_replay, test_checkpoints and test_loading, registered by
`pytest_plugins` in conftest.py; session-scoped, so each live run trains once per test session.
The live runs train on the CPU, where the replays they are compared with measure.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub.file_download import repo_folder_name
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import GPT2Config, GPT2LMHeadModel, Trainer

from regionwatch.probes import ProbeSet
from tests.support.factories import make_monitor
from tests.support.lm import TinyLM, Windows, hf_args, loader, small_probes, tiny_gpt2, trainer
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB


def save_model(path: Path, *, seed: int, tokenizer: Any = None) -> GPT2LMHeadModel:
    """A seeded tiny GPT-2 saved with save_pretrained (and the tokenizer, if given)."""
    model = tiny_gpt2(VOCAB, seed=seed)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return model


def lightning_run(
    root: Path,
    data: Windows,
    *,
    probes: Any = None,
    every: int = 2,
    save_every: int = 1,
    max_steps: int = 6,
    module: TinyLM | None = None,
) -> Path:
    """Train TinyLM saving a .ckpt every `save_every` steps; a live monitor if `probes` is given.

    Returns:
        The directory of the .ckpt files (the live run, if any, is `root / "live"`).
    """
    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=root / "ckpts", every_n_train_steps=save_every, save_top_k=-1, save_last=False
        )
    ]
    if probes is not None:
        callbacks.append(make_monitor("lightning", probes, root / "live", every=every))
    fit = trainer(root, callbacks, max_steps=max_steps, enable_checkpointing=True)
    fit.fit(module or TinyLM(VOCAB), loader(data))
    return root / "ckpts"


class ConfigLM(TinyLM):
    """A TinyLM whose hyper-parameters hold its model config, as an object or as a dict."""

    def __init__(self, config: GPT2Config | dict[str, Any]) -> None:
        super().__init__(VOCAB)
        self.save_hyperparameters()


def trainer_run(
    root: Path, data: Windows, *, probes: Any = None, every: int = 2, max_steps: int = 6
) -> Path:
    """Train with the HF Trainer saving checkpoint-N every `every` steps (live monitor if probes).

    Returns:
        The output dir holding checkpoint-N folders (the live run, if any, is `root / "live"`).
    """
    args = hf_args(root, max_steps=max_steps, save_strategy="steps", save_steps=every)
    callbacks = []
    if probes is not None:
        callbacks.append(make_monitor("hf", probes, root / "live", every=every))
    Trainer(tiny_gpt2(VOCAB), args, train_dataset=data, callbacks=callbacks).train()
    return root / "out"


def add_hub_revision(cache: Path, repo: str, revision: str, files: Path) -> str:
    """Lay out the files of directory `files` as `revision` of `repo` in a hub cache.

    The layout `huggingface_hub` writes when it downloads (file_download.py): each file's bytes
    in `blobs/<sha256>`, the revision's tree in `snapshots/<commit>/` as relative symlinks to the
    blobs, and `refs/<revision>` holding the commit hash.

    Returns:
        The commit hash.
    """
    root = cache / repo_folder_name(repo_id=repo, repo_type="model")
    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for file in sorted(files.iterdir()):
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return commit


def truncate(path: Path) -> None:
    """Cut a file to half its size, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models hold bitwise the same state dict."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="session")
def probes(text_tokenizer) -> ProbeSet:
    """The small probe set of the built-in corpus."""
    return small_probes(text_tokenizer)


@pytest.fixture(scope="session")
def probe_dir(probes, tmp_path_factory) -> Path:
    """`probes` saved, for --probe DIR."""
    return probes.save(tmp_path_factory.mktemp("probes") / "probes")


@pytest.fixture(scope="session")
def data(text_tokenizer) -> Windows:
    """Corpus windows to train the live runs on."""
    return Windows(text_tokenizer)


@pytest.fixture(scope="session")
def lightning_live(tmp_path_factory, data, probes) -> Path:
    """A Lightning run measured live at steps 0, 2, 4, saving a .ckpt after every step."""
    root = tmp_path_factory.mktemp("lightning")
    ckpts = lightning_run(root, data, probes=probes, every=2, save_every=1, max_steps=4)
    tiny_gpt2(VOCAB).config.save_pretrained(ckpts)  # the architecture, beside the .ckpt files
    return root


@pytest.fixture(scope="session")
def trainer_live(tmp_path_factory, data, probes) -> Path:
    """An HF Trainer run measured live at steps 0, 2, 4, saving checkpoint-2 and checkpoint-4."""
    root = tmp_path_factory.mktemp("trainer")
    trainer_run(root, data, probes=probes, every=2, max_steps=4)
    return root
