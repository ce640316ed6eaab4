"""Training for the kill -9 test: `python -m tests.resume_train lightning|hf OUT STEPS`.

Resumes from the newest checkpoint in OUT if there is one. Prints `STEP n` after every optimizer
step and `WRITE n` as a snapshot write begins, and after each of these waits for a line on stdin:
the test either answers (go on) or kills the process right there, at a point fixed by the
output, not by the clock (`WROTE n` follows a finished write). Snapshots every 2 steps,
checkpoints every 3, so that a resume usually restarts before snapshots that must be cut and
retaken.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from transformers import AutoTokenizer, Trainer, TrainerCallback

from regionwatch import ProbeSet, Schedule, SnapshotStore
from regionwatch.store import SnapshotStore as _Store
from tests.support.factories import make_monitor
from tests.support.lm import TinyLM, Windows, hf_args, loader, tiny_gpt2, trainer

_write = _Store.write
# Snapshots are written on regionwatch's background thread, so two threads pause here; one at a
# time, since a text stream read from two threads can swallow an answer and hang both.
_one_pause = threading.Lock()


def say(line: str) -> None:
    """Write `line` whole, in one call: `print` writes the text and its newline separately, so
    another thread's output (HF's PrinterCallback, say) could land between them and hide a mark."""
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def pause(line: str) -> None:
    """Say `line` and wait for the test's answer: a kill aimed at `line` lands exactly here."""
    with _one_pause:
        say(line)
        sys.stdin.readline()


def paused_write(self: SnapshotStore, snapshot: object) -> Path:
    pause(f"WRITE {snapshot.step}")
    path = _write(self, snapshot)
    say(f"WROTE {snapshot.step}")
    return path


_Store.write = paused_write


class Steps(Callback):
    def on_train_batch_end(self, trainer: L.Trainer, *_: object) -> None:
        pause(f"STEP {trainer.global_step}")


class HFSteps(TrainerCallback):
    def on_step_end(self, args: object, state: object, control: object, **_: object) -> None:
        pause(f"STEP {state.global_step}")


def main(kind: str, out: Path, steps: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    probes = ProbeSet.load(out / "probes", tokenizer=tokenizer)
    data = Windows(tokenizer)
    schedule = Schedule.every_steps(2)
    if kind == "lightning":
        monitor = make_monitor("lightning", probes, out / "run", schedule=schedule)
        saver = ModelCheckpoint(
            dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1, save_last=True
        )
        last = out / "ckpt" / "last.ckpt"
        fit = trainer(out, [monitor, saver, Steps()], max_steps=steps, enable_checkpointing=True)
        fit.fit(TinyLM(len(tokenizer)), loader(data), ckpt_path=last if last.exists() else None)
    else:
        monitor = make_monitor("hf", probes, out / "run", schedule=schedule)
        args = hf_args(out, max_steps=steps, save_strategy="steps", save_steps=3)
        run = Trainer(
            tiny_gpt2(len(tokenizer)), args, train_dataset=data, callbacks=[monitor, HFSteps()]
        )
        run.train(resume_from_checkpoint=any((out / "out").glob("checkpoint-*")))
    say("DONE")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
