"""DDP on 2 CPU processes (gloo) with RegionMonitor: `python tests/ddp_train.py OUT STEPS`.

Lightning relaunches this script for rank 1 (both print to the same stdout). Each rank prints
the non-padding tokens it trained on; rank 0 saves the final GPT-2 weights to OUT/final.pt so
that the test can measure them in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoTokenizer

from regionwatch import ProbeSet
from tests.support.factories import make_monitor
from tests.support.lm import TinyLM, Windows, loader, trainer


class Seen(Callback):
    """Counts this rank's non-padding tokens independently of regionwatch, and prints them."""

    def __init__(self) -> None:
        self.tokens = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, module: object, out: object, batch: dict, i: int
    ) -> None:
        self.tokens += int(batch["attention_mask"].sum())

    def on_train_end(self, trainer: L.Trainer, module: object) -> None:
        print(f"LOCAL {trainer.global_rank} {self.tokens}", flush=True)


def main(out: Path, steps: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    probes = ProbeSet.load(out / "probes", tokenizer=tokenizer)
    monitor = make_monitor("lightning", probes, out / "run")
    module = TinyLM(len(tokenizer))
    fit = trainer(
        out, [monitor, Seen()], max_steps=steps, devices=2, strategy="ddp", deterministic=False
    )
    fit.fit(module, loader(Windows(tokenizer)))
    if fit.global_rank == 0:
        torch.save(module.lm.state_dict(), out / "final.pt")
        print(f"TOKENS {monitor.tokens}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(Path(sys.argv[1]), int(sys.argv[2]))
