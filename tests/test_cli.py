"""The `measure` and `show` verbs, run in-process on tiny models; `--help` of every verb."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config

from regionwatch import SnapshotStore
from regionwatch.cli import VERBS, main
from regionwatch.errors import ConfigError
from regionwatch.loading import parse_dtype
from tests.conftest import file_states
from tests.support.report_runs import log_tokens, synthetic_run
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory, text_tokenizer) -> Path:
    """A tiny GPT-2 config with the test tokenizer beside it."""
    path = tmp_path_factory.mktemp("tiny")
    GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4).save_pretrained(
        path
    )
    text_tokenizer.save_pretrained(path)
    return path


def measure_args(config_dir: Path, *extra: str) -> list[str]:
    return [
        "measure",
        "--init-from",
        str(config_dir),
        "--pairs",
        "9",
        "--alphas",
        "5",
        "--grid",
        "5",
        *extra,
    ]


def test_measure_prints_the_max_slope_table(
    config_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """A freshly initialised model's quartiles, near 1, and the probe time."""
    assert main(measure_args(config_dir)) == 0
    out = capsys.readouterr().out
    assert "init from" in out
    random_row = next(line for line in out.splitlines() if line.startswith("random"))
    q25, median, q75 = (float(v) for v in random_row.split()[1:])
    assert 1.0 <= q25 <= median <= q75 < 2.0  # random init: close to a straight line
    assert "probe time:" in out


def test_measure_out_writes_a_one_snapshot_run_and_show_lists_it(
    tmp_path: Path, config_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """--out stores the snapshot; show prints it as a table and as JSON lines."""
    run = tmp_path / "run"
    assert main(measure_args(config_dir, "--out", str(run), "--step", "7", "--tokens", "1234")) == 0
    capsys.readouterr()
    assert main(["show", str(run)]) == 0
    table = capsys.readouterr().out
    assert "1,234" in table
    assert " ok" in table
    assert main(["show", str(run), "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert (record["step"], record["tokens"]) == (7, 1234)
    for key in ("max_slope/median", "max_slope/q25", "max_slope/q75", "max_slope/similar_median"):
        assert isinstance(record[key], float)


def test_measure_reuses_a_probe_set(tmp_path: Path, config_dir: Path) -> None:
    """--probe measures exactly the saved prompts of another run."""
    first = tmp_path / "first"
    assert main(measure_args(config_dir, "--out", str(first))) == 0
    second = tmp_path / "second"
    reuse = measure_args(config_dir, "--out", str(second), "--probe", str(first / "probes"))
    pairs = reuse.index("--pairs")
    del reuse[pairs : pairs + 2]  # the saved set fixes its pairs: --pairs would be refused
    assert main(reuse) == 0
    a, b = SnapshotStore(first).records()[0], SnapshotStore(second).records()[0]
    assert a["probe_fingerprint"] == b["probe_fingerprint"]
    assert a["max_slope/median"] == b["max_slope/median"]


def test_show_flags_a_damaged_file(
    tmp_path: Path, config_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """A bit flip in a snapshot file is reported by show, with exit status 1."""
    run = tmp_path / "run"
    assert main(measure_args(config_dir, "--out", str(run))) == 0
    (path,) = (run / "snapshots").glob("*.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["show", str(run)]) == 1
    assert "sha256" in capsys.readouterr().out


@pytest.mark.parametrize("entry", ["snapshots", "writer.lock"])
def test_show_refuses_a_linked_run_entry_and_touches_nothing(
    tmp_path: Path, config_dir: Path, capsys: pytest.CaptureFixture, entry: str
) -> None:
    """show on a run whose snapshots/ or writer.lock is a link: exit 2, target files untouched."""
    run = tmp_path / "run"
    assert main(measure_args(config_dir, "--out", str(run))) == 0
    weights = tmp_path / "weights"  # a folder of someone's model weights and a partial download
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"weights")
    (weights / ".model.safetensors.0a.rwtmp").write_bytes(b"partial")
    (weights / "notes.txt").write_text("pid of nobody\n")
    target = weights if entry == "snapshots" else weights / "notes.txt"
    if entry == "snapshots":
        shutil.rmtree(run / entry)
    else:
        (run / entry).unlink(missing_ok=True)
    (run / entry).symlink_to(target)
    before = file_states(weights)
    capsys.readouterr()
    assert main(["show", str(run)]) == 2
    assert f"{entry} is a symbolic link" in capsys.readouterr().err
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 2
    assert file_states(weights) == before


def test_user_errors_exit_2_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A usage error prints one line naming the problem, exit status 2."""
    assert main(["measure"]) == 2
    assert "give a MODEL (a save_pretrained folder, a .gguf file or smollm2) or --init-from" in (
        capsys.readouterr().err
    )
    assert main(["show", str(tmp_path)]) == 2
    assert "regionwatch show: error:" in capsys.readouterr().err


@pytest.mark.parametrize("verb", [v.__name__.rsplit(".", 1)[1] for v in VERBS])
def test_every_verb_has_help(verb: str) -> None:
    """`python -m regionwatch VERB --help` works from a shell."""
    done = subprocess.run(
        [sys.executable, "-m", "regionwatch", verb, "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert verb in done.stdout


def test_a_library_logger_with_its_own_level_prints_once() -> None:
    """Lightning-style loggers (own INFO level and handler) are not echoed by the CLI's handler."""
    script = (
        "import logging\n"
        "from tqdm.contrib.logging import logging_redirect_tqdm\n"
        "from regionwatch.cli import configure_logging\n"
        "configure_logging('warning')\n"
        "lib = logging.getLogger('lib')\n"
        "lib.setLevel(logging.INFO)\n"
        "lib.addHandler(logging.StreamHandler())\n"
        "with logging_redirect_tqdm():\n"
        "    lib.info('hello')\n"
        "    logging.getLogger('regionwatch.x').warning('careful')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stderr.count("hello") == 1  # from the library's own handler only
    assert "WARNING regionwatch.x: careful" in done.stderr


@pytest.mark.parametrize("verb", [None, *(v.__name__.rsplit(".", 1)[1] for v in VERBS)])
def test_help_loads_neither_torch_nor_the_library(verb: str | None) -> None:
    """`--help` imports no torch, transformers or lightning: it answers at once."""
    argv = ["--help"] if verb is None else [verb, "--help"]
    script = (
        "import contextlib, io, sys\n"
        "from regionwatch.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    main({argv!r})\n"
        "print(sorted(m for m in ('torch', 'transformers', 'lightning') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_show_and_report_find_the_one_run_below_a_folder(
    tmp_path: Path, config_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """The demo's printed folder works: the run below it is found; several runs are listed."""
    folder = tmp_path / "demo-out"
    run = folder / "lightning_logs" / "version_0" / "regionwatch"
    assert main(measure_args(config_dir, "--out", str(run), "--tokens", "1234")) == 0
    capsys.readouterr()
    assert main(["show", str(folder)]) == 0
    assert str(run) in capsys.readouterr().out
    assert main(["report", str(folder), "--out", str(tmp_path / "report"), "--quiet"]) == 0
    assert (tmp_path / "report" / "index.html").is_file()
    other = folder / "lightning_logs" / "version_1" / "regionwatch"
    assert main(measure_args(config_dir, "--out", str(other))) == 0
    capsys.readouterr()
    assert main(["show", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "holds 2 regionwatch runs" in err
    assert str(run) in err
    assert str(other) in err


def test_show_json_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`show --json | head`: the reader leaves early; no BrokenPipeError traceback, exit 1."""
    run = tmp_path / "run"
    synthetic_run(run, log_tokens(10))
    # `true` exits at once, long before Python has imported regionwatch: every write hits a
    # closed pipe, as the lines after the first do with `head -1`.
    shell = f"{sys.executable} -m regionwatch show --json {run} | true; echo ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert done.stderr == ""
    assert done.stdout.strip() == "1"


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float32", torch.float32),  # the old spellings are still read
        ("bfloat16", torch.bfloat16),
    ],
)
def test_one_precision_vocabulary_old_spellings_read(name: str, dtype: torch.dtype) -> None:
    """`--dtype` takes precision='s names (fp32, bf16, fp16), and the torch names it took before."""
    assert parse_dtype(name) == dtype


def test_dtype_help_names_the_new_spelling_and_the_old(capsys) -> None:
    """Both verbs' help give fp32 as the default and say the old spellings are read."""
    for verb in ("replay", "measure"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "fp32 (default), bf16, fp16" in text
        assert "float32, bfloat16, float16" in text
        assert "are read too" in text
    with pytest.raises(ConfigError, match="not one of fp32, fp64, bf16, fp16"):
        parse_dtype("half")
