"""Pretrain a small GPT-2 with Lightning and watch stable regions form: a complete example.

    python examples/train_lightning.py --out runs/lightning-example
    tensorboard --logdir runs/lightning-example/regionwatch --samples_per_plugin images=100
    # then open http://localhost:6006/?smoothing=0#timeseries

The two regionwatch lines are marked. Everything else is an ordinary Lightning pretraining
script: a tokenizer trained locally on the built-in corpus, fixed-length windows, a GPT-2 from
a config, AdamW.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from regionwatch import RegionMonitor, Schedule, WatchConfig  # regionwatch (1/2)
from regionwatch.corpus import builtin_text, token_stream, train_tokenizer
from regionwatch.tensorboard import view_hint


class LanguageModel(L.LightningModule):
    """Holds the HF model as an attribute: RegionMonitor finds and measures it."""

    def __init__(self, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=seq_len, n_embd=128, n_layer=2, n_head=4
        )
        self.model = GPT2LMHeadModel(config)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lightning-example"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()

    tokenizer = train_tokenizer([builtin_text()], vocab_size=2048)
    ids = torch.from_numpy(token_stream(tokenizer).ids.astype("int64"))
    windows = ids[: len(ids) // args.seq_len * args.seq_len].reshape(-1, args.seq_len)
    loader = DataLoader(TensorDataset(windows), batch_size=16, shuffle=True)

    watch = WatchConfig(schedule=Schedule.every_steps(25))
    monitor = RegionMonitor(watch, tokenizer=tokenizer, run_dir=args.out / "regionwatch")
    trainer = L.Trainer(  # regionwatch (2/2): the callback
        max_steps=args.steps,
        callbacks=[monitor],
        default_root_dir=str(args.out),
        accelerator="auto",
    )
    trainer.fit(LanguageModel(len(tokenizer), args.seq_len), loader)
    run_dir = args.out / "regionwatch"
    print(f"snapshots: {run_dir}; view: {view_hint(run_dir, snapshots=0)}")


if __name__ == "__main__":
    main()
