"""Links are never followed, and never passed over in silence: replay and show name each one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from regionwatch import SnapshotStore
from regionwatch.checkpoints import discover
from regionwatch.cli import main
from regionwatch.errors import StoreError
from tests.support.factories import make_probes, make_snapshot
from tests.support.lm import SMALL_PROBE
from tests.support.replay_runs import save_model

SMALL = ["--alphas", str(SMALL_PROBE.num_alphas), "--grid", str(SMALL_PROBE.grid)]


def test_discover_names_a_linked_checkpoint_folder_as_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A link to a folder outside the SOURCE is a failed checkpoint, named with its reason."""
    save_model(tmp_path / "ckpts" / "step1-tokens100", seed=0)
    save_model(tmp_path / "elsewhere" / "step2-tokens200", seed=1)
    (tmp_path / "ckpts" / "step2-tokens200").symlink_to(tmp_path / "elsewhere" / "step2-tokens200")
    with caplog.at_level(logging.WARNING, logger="regionwatch"):
        found = discover([tmp_path / "ckpts"])
    assert [(c.path.name, c.step) for c in found] == [
        ("step1-tokens100", 1),
        ("step2-tokens200", None),
    ]
    link = found[1]
    assert "a symbolic link to" in link.error
    assert str(tmp_path / "elsewhere" / "step2-tokens200") in link.error
    assert "pass its target as a SOURCE" in link.error
    assert f"{tmp_path / 'ckpts' / 'step2-tokens200'}: skipped: a symbolic link" in caplog.text


def test_a_link_into_the_scanned_folder_is_named_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A `latest` link beside the checkpoint it names: dropped (it is measured anyway), at INFO."""
    save_model(tmp_path / "ckpts" / "step1-tokens100", seed=0)
    (tmp_path / "ckpts" / "latest").symlink_to(tmp_path / "ckpts" / "step1-tokens100")
    with caplog.at_level(logging.INFO, logger="regionwatch"):
        found = discover([tmp_path / "ckpts"])
    assert [(c.path.name, c.error) for c in found] == [("step1-tokens100", "")]
    assert "latest: a link to" in caplog.text
    assert "which this scan covers itself" in caplog.text


@pytest.mark.slow
def test_replay_fails_a_linked_checkpoint_folder(
    tmp_path: Path, text_tokenizer, capsys: pytest.CaptureFixture
) -> None:
    """The issue's case: one real checkpoint and one link; exit 1, the link FAILED with why."""
    save_model(tmp_path / "ckpts" / "step1-tokens100", seed=0, tokenizer=text_tokenizer)
    save_model(tmp_path / "elsewhere" / "step2-tokens200", seed=1, tokenizer=text_tokenizer)
    (tmp_path / "ckpts" / "step2-tokens200").symlink_to(tmp_path / "elsewhere" / "step2-tokens200")
    code = main(["replay", str(tmp_path / "ckpts"), "--out", str(tmp_path / "run"), *SMALL])
    out = capsys.readouterr().out
    assert code == 1
    assert "1 measured, 0 already there, 1 failed" in out
    assert f"FAILED {tmp_path / 'ckpts' / 'step2-tokens200'}: a symbolic link to" in out


@pytest.fixture
def linked_run(tmp_path: Path) -> Path:
    """A folder whose only run is a symbolic link to a run elsewhere."""
    probes = make_probes()
    with SnapshotStore.create(
        tmp_path / "real" / "run", probes=probes, config=SMALL_PROBE, run_id="run-1"
    ) as store:
        store.write(make_snapshot(probes, maps=False))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "regionwatch").symlink_to(tmp_path / "real" / "run")
    return tmp_path / "logs"


def test_show_names_the_link_it_did_not_follow(
    linked_run: Path, capsys: pytest.CaptureFixture
) -> None:
    """`show FOLDER` whose run is a link: the error names the link and its target, exit 2."""
    code = main(["show", str(linked_run)])
    err = capsys.readouterr().err
    assert code != 0
    assert (
        f"passed over {linked_run / 'regionwatch'} -> {linked_run.parent / 'real' / 'run'}" in err
    )
    assert "pass the run directory itself" in err
    assert main(["show", str(linked_run / "regionwatch")]) == 0  # the link given directly


def test_find_run_warns_of_links_beside_a_run(
    linked_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real run and a linked one below a folder: the real one is used, the link is named."""
    from regionwatch.cli.runs import find_run

    probes = make_probes()
    SnapshotStore.create(
        linked_run / "other", probes=probes, config=SMALL_PROBE, run_id="run-2"
    ).close()
    with caplog.at_level(logging.WARNING, logger="regionwatch"):
        assert find_run(linked_run) == linked_run / "other"
    assert "symbolic links not searched for runs" in caplog.text
    assert str(linked_run / "regionwatch") in caplog.text


def test_a_linked_snapshot_file_is_named_by_show(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A snapshot file replaced by a link inside a run: show names it as damaged, exit 1."""
    probes = make_probes()
    run = tmp_path / "run"
    with SnapshotStore.create(run, probes=probes, config=SMALL_PROBE, run_id="run-1") as store:
        written = store.write(make_snapshot(probes, maps=False))
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(written.read_bytes())
    written.unlink()
    written.symlink_to(copy)
    assert main(["show", str(run)]) == 1
    out = capsys.readouterr().out
    assert f"damaged: {written}: not a regular file (a link" in out
    with pytest.raises(StoreError, match="it is a symbolic link, which regionwatch never follows"):
        SnapshotStore(run).read(0)
