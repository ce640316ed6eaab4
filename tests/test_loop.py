"""The plain-loop API: `with Monitor(watch, model, ...)` and `monitor.step` in a user's own loop.

Real training loops on a tiny GPT-2 (with dropout, so that the global RNG matters), the real
store and TensorBoard files; DDP on 2 gloo processes through examples/plain_loop.py.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import GPT2Config, GPT2LMHeadModel

from regionwatch import ConfigError, Monitor, SnapshotStore, WatchConfig, measure
from regionwatch.tensorboard import TB_SUBDIR
from regionwatch.wrappers import unwrap
from tests.support.factories import make_watch
from tests.support.lm import (
    BATCH,
    SEQ,
    SMALL_PROBE,
    Windows,
    assert_same_numbers,
    small_probes,
    tiny_gpt2,
)
from tests.support.nanogpt import NANOGPT, nanogpt
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB

ROOT = Path(__file__).resolve().parents[1]
TOKENS_PER_STEP = BATCH * SEQ
CHEAP = dataclasses.replace(SMALL_PROBE, parts=("random",))  # for tests of refusals only


class Crash(Exception):
    """Stands for a crash in the middle of training."""


def train(
    model: torch.nn.Module,
    monitor: Monitor | None,
    data: Windows,
    steps: range,
    *,
    saved: dict[str, Any] | None = None,
    save_at: int | None = None,
    crash_at: int | None = None,
) -> None:
    """A nanoGPT-style loop over `steps` (SGD: no optimizer state); checkpoints into `saved`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in steps:
        batch = data.ids[(step * BATCH) % len(data.ids) :][:BATCH]
        loss = model(input_ids=batch, labels=batch).loss  # dropout draws from the global RNG
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.step(step, tokens=step * TOKENS_PER_STEP)
        if step == save_at:
            saved["model"] = {k: v.clone() for k, v in model.state_dict().items()}
            saved["rng"] = torch.get_rng_state()
            saved["regionwatch"] = monitor.state_dict()
        if step == crash_at:
            raise Crash


def run_loop(
    tmp: Path, lm_probes, lm_data: Windows, steps: int, watch: WatchConfig | None = None
) -> Path:
    """A fresh monitored run of `steps` steps (default: every 2 steps); returns its run dir."""
    model = tiny_gpt2(VOCAB).train()
    watch = watch or make_watch(2)
    with Monitor(watch, model, probes=lm_probes, run_dir=tmp / "run") as monitor:
        train(model, monitor, lm_data, range(1, steps + 1))
    return tmp / "run"


def test_plain_loop_stores_the_baseline_the_schedule_and_the_final_step(
    tmp_path: Path, lm_probes, lm_data: Windows
) -> None:
    """Entering measures step 0, `step` the scheduled steps, leaving the last one with maps;
    every snapshot is in the store and in the TensorBoard run, at its tokens."""
    run = run_loop(tmp_path, lm_probes, lm_data, steps=5)
    records = SnapshotStore(run).records()
    assert [(r["step"], r["tokens"]) for r in records] == [
        (s, s * TOKENS_PER_STEP) for s in (0, 2, 4, 5)
    ]
    assert "maps" in records[-1]["parts"]
    assert SnapshotStore(run).read(5).info["driver"] == "loop"
    events = EventAccumulator(str(run / TB_SUBDIR), size_guidance={"scalars": 0})
    events.Reload()
    median = events.Scalars("regionwatch/max_slope/median")
    assert [e.step for e in median] == [r["tokens"] for r in records]


def test_plain_loop_leaves_training_bit_identical(
    tmp_path: Path, lm_probes, lm_data: Windows
) -> None:
    """Weights and the global RNG after a monitored loop equal those of an unmonitored one."""
    torch.manual_seed(7)
    plain = tiny_gpt2(VOCAB).train()
    train(plain, None, lm_data, range(1, 5))
    rng_plain = torch.get_rng_state()
    torch.manual_seed(7)
    watched = tiny_gpt2(VOCAB).train()
    with Monitor(make_watch(1), watched, probes=lm_probes, run_dir=tmp_path / "run") as monitor:
        train(watched, monitor, lm_data, range(1, 5))
    assert torch.equal(torch.get_rng_state(), rng_plain)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert SnapshotStore(tmp_path / "run").steps() == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_plain_loop_resumes_exactly_from_its_own_checkpoint(
    tmp_path: Path, lm_probes, lm_data: Windows
) -> None:
    """Crash after the checkpoint, resume from it with `load_state_dict`: the later snapshots
    are cut back and retaken, every step is stored once, and the numbers equal a run that never
    stopped."""
    watch = make_watch(1, maps_schedule=None)  # maps at every step: every number compared
    torch.manual_seed(3)
    whole = run_loop(tmp_path / "whole", lm_probes, lm_data, steps=6, watch=watch)
    torch.manual_seed(3)
    model = tiny_gpt2(VOCAB).train()
    run_dir = tmp_path / "resumed" / "run"
    saved: dict[str, Any] = {}
    with (
        pytest.raises(Crash),
        Monitor(watch, model, probes=lm_probes, run_dir=run_dir) as monitor,
    ):
        train(model, monitor, lm_data, range(1, 7), saved=saved, save_at=3, crash_at=5)
    assert SnapshotStore(run_dir).steps() == [0, 1, 2, 3, 4, 5]  # 4, 5: after the checkpoint
    again = tiny_gpt2(VOCAB, seed=1).train()
    again.load_state_dict(saved["model"])
    torch.set_rng_state(saved["rng"])
    monitor = Monitor(watch, again, probes=lm_probes, run_dir=run_dir)
    monitor.load_state_dict(saved["regionwatch"])
    with monitor:
        train(again, monitor, lm_data, range(4, 7))
    resumed = SnapshotStore(run_dir)
    assert resumed.steps() == SnapshotStore(whole).steps() == [0, 1, 2, 3, 4, 5, 6]
    for step in resumed.steps():
        assert_same_numbers(
            resumed.read(step).measurement, SnapshotStore(whole).read(step).measurement
        )


def test_a_new_run_into_a_used_run_dir_is_refused_before_the_first_step(
    tmp_path: Path, lm_probes, lm_data: Windows
) -> None:
    """Without the checkpoint's monitor state, entering refuses a run dir holding another run."""
    run = run_loop(tmp_path, lm_probes, lm_data, steps=2)
    model = tiny_gpt2(VOCAB, seed=1)
    with (
        pytest.raises(ConfigError, match=r"already holds run .*monitor\.load_state_dict"),
        Monitor(make_watch(2), model, probes=lm_probes, run_dir=run),
    ):
        pytest.fail("the run must not start")
    assert SnapshotStore(run).steps() == [0, 2]


def step_back(monitor: Monitor) -> None:
    monitor.step(3, tokens=30)
    monitor.step(2, tokens=40)


def tokens_back(monitor: Monitor) -> None:
    monitor.step(3, tokens=30)
    monitor.step(4, tokens=20)


def late_restore(monitor: Monitor) -> None:
    monitor.load_state_dict(monitor.state_dict())


BAD_STEPS = [
    (step_back, r"step=2, tokens=40\) after step=3, tokens=30: the step went back"),
    (tokens_back, r"the tokens went back.*load_state_dict"),
    (lambda m: m.step(1, tokens=2.5), r"got tokens 2\.5 as a token count.*an int >= 0"),
    (lambda m: m.step(-1, tokens=0), r"Monitor\.step: step=-1: need an int >= 0"),
    (late_restore, r"load_state_dict after the run started.*before `with monitor:`"),
]


@pytest.mark.parametrize(("call", "match"), BAD_STEPS)
def test_bad_steps_are_refused_naming_the_fix(
    tmp_path: Path, lm_probes, call: Any, match: str
) -> None:
    """Steps or tokens that go back, a token count that is not one, a restore too late."""
    model = tiny_gpt2(VOCAB)
    run_dir = tmp_path / "run"
    watch = make_watch(100, probe=CHEAP)
    with (
        Monitor(watch, model, probes=lm_probes, run_dir=run_dir) as monitor,
        pytest.raises(ConfigError, match=match),
    ):
        call(monitor)


def test_misuse_outside_the_with_block_is_refused(tmp_path: Path, lm_probes) -> None:
    """`step` before the run is open; `with` without a model; a changed model at start."""
    model = tiny_gpt2(VOCAB)
    monitor = Monitor(make_watch(2), model, probes=lm_probes, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"Monitor\.step before the run is open.*with Monitor"):
        monitor.step(1, tokens=1)
    with (
        pytest.raises(ConfigError, match=r"needs the model: Monitor\(watch, model"),
        Monitor(make_watch(2), probes=lm_probes, run_dir=tmp_path / "other"),
    ):
        pass
    hosted = Monitor(make_watch(2), probes=lm_probes, run_dir=tmp_path / "hosted")
    hosted.setup(model, log_dir=None)
    with pytest.raises(ConfigError, match=r"different model object .*load_state_dict"):
        hosted.start(tiny_gpt2(VOCAB), step=0, tokens=0)


class Wrapper(torch.nn.Module):
    """A wrapper regionwatch does not know, holding the model as `module` like most do."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def test_known_wrappers_are_unwrapped_to_the_trained_module() -> None:
    """torch.compile, DataParallel, Fabric's module and nestings of them give the module itself."""
    from lightning.fabric import Fabric

    model = tiny_gpt2(VOCAB)
    fabric = Fabric(accelerator="cpu", devices=1)
    for wrapped in (
        torch.compile(model),
        torch.nn.DataParallel(model),
        fabric.setup_module(model),
        torch.compile(torch.nn.DataParallel(model)),
    ):
        assert unwrap(wrapped) == (model, None), type(wrapped).__name__


@pytest.mark.parametrize(
    ("wrap", "match"),
    [
        (Wrapper, r"a Wrapper wrapping a GPT2LMHeadModel, a wrapper regionwatch does not know"),
        (lambda m: torch.jit.script(torch.nn.Linear(2, 2)), r"TorchScript .*before torch\.jit"),
        (lambda m: "gpt2", r"model='gpt2': need the torch\.nn\.Module"),
    ],
)
def test_unknown_wrappers_are_refused_by_name(
    tmp_path: Path, lm_probes, wrap: Any, match: str
) -> None:
    """A wrapper regionwatch cannot see through is refused at construction, naming the fix."""
    with pytest.raises(ConfigError, match=match):
        Monitor(make_watch(2), wrap(tiny_gpt2(VOCAB)), probes=lm_probes, run_dir=tmp_path)


@pytest.mark.slow
def test_plain_loop_example_under_ddp_equals_one_process(tmp_path: Path) -> None:
    """examples/plain_loop.py on 2 gloo processes (every rank calls `step` on its DDP model):
    the final snapshot equals measuring the final weights in one process, tokens count both
    ranks, and a resume continues the same run."""
    out = tmp_path / "out"
    args = ["--out", str(out), "--every", "2", "--width", "32", "--vocab-size", "512"]
    args += ["--batch-size", "2", "--seq-len", "64", "--checkpoint-every", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*torchrun, "--nproc-per-node", "2", "examples/plain_loop.py", *args]
    for steps in (["--steps", "3"], ["--steps", "4", "--resume"]):
        done = subprocess.run(
            [*command, *steps],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert re.search(r"snapshots: .*regionwatch", done.stdout)
    store = SnapshotStore(out / "regionwatch")
    assert [(r["step"], r["tokens"]) for r in store.records()] == [
        (s, s * 2 * 64 * 2) for s in (0, 2, 3, 4)
    ]
    final = store.read(4)
    assert (final.info["world_size"], final.info["layout"]) == (2, "local")
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    vocab = saved["model"]["transformer.wte.weight"].shape[0]
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config)  # the example's model, at the run's final weights
    model.load_state_dict(saved["model"])
    assert_same_numbers(final.measurement, measure(model.eval(), store.probes(), store.config))


def test_plain_loop_measures_a_non_hf_model_through_its_decoder(
    tmp_path: Path, lm_probes, lm_data: Windows
) -> None:
    """A nanoGPT-style `nn.Module` named by a `Decoder`: the loop's snapshots equal measuring
    the same weights directly."""
    model = nanogpt(vocab_size=VOCAB, block_size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = make_watch(2)
    run_dir = tmp_path / "run"
    with Monitor(watch, model, probes=lm_probes, run_dir=run_dir, decoder=NANOGPT) as monitor:
        for step in range(1, 3):
            batch = lm_data.ids[step * BATCH :][:BATCH]
            _, loss = model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            monitor.step(step, tokens=step * TOKENS_PER_STEP)
    store = SnapshotStore(run_dir)
    assert store.steps() == [0, 2]
    direct = measure(model.eval(), lm_probes, watch.probe, decoder=NANOGPT)
    live = store.read(2).measurement
    for part, curves in direct.curves.items():  # a tiny model leaves pairs excluded: NaN alike
        got = live.curves[part]
        close = {"atol": 1e-5, "rtol": 1e-5, "equal_nan": True}
        torch.testing.assert_close(got.relative[:, 1:], curves.relative[:, 1:], **close)
        torch.testing.assert_close(got.distance, curves.distance, **close)
    torch.testing.assert_close(live.maps.rgb, direct.maps.rgb, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_plain_loop_under_fsdp2_equals_one_process(tmp_path: Path, text_tokenizer) -> None:
    """FSDP2 (`fully_shard` in place) on 2 gloo processes, every rank calling `step`: measured
    in place, the final snapshot equals measuring the gathered weights in one process."""
    text_tokenizer.save_pretrained(tmp_path / "tokenizer")
    small_probes(text_tokenizer).save(tmp_path / "probes")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = subprocess.run(
        [*torchrun, "--nproc-per-node", "2", "-m", "tests.loop_fsdp", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert "DONE" in done.stdout, done.stderr[-3000:]
    store = SnapshotStore(tmp_path / "run")
    assert store.steps() == [0, 2, 3]
    final = store.read(3)
    assert (final.info["world_size"], final.info["layout"]) == (2, "fsdp2")
    model = tiny_gpt2(VOCAB)
    model.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True))
    assert_same_numbers(final.measurement, measure(model.eval(), store.probes(), store.config))
