"""Pretrain a small GPT-2 in a plain PyTorch loop (nanoGPT style), watching stable regions form.

    python examples/plain_loop.py --out runs/plain
    python examples/plain_loop.py --out runs/plain --resume --steps 400    # continue from ckpt.pt
    torchrun --nproc-per-node 2 examples/plain_loop.py --out runs/plain-ddp  # DDP on CPU (gloo)
    tensorboard --logdir runs/plain/regionwatch/tensorboard

No trainer: the loop is yours, and regionwatch is four marked lines. `Monitor` opens the run (the
step-0 baseline of a new run), `monitor.step` measures when the schedule says so, and leaving the
`with` block takes the final snapshot. Its state goes into the training checkpoint, so that a
resume continues the same run exactly. Under torchrun every rank runs the loop and calls
`monitor.step` on the DDP-wrapped model; rank 0 writes.
"""

from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

import torch
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import GPT2Config, GPT2LMHeadModel

from regionwatch import Monitor, Schedule, WatchConfig  # regionwatch (1/4)
from regionwatch.corpus import builtin_text, token_stream, train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/plain"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=25, help="snapshot every N steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    args = parser.parse_args()

    distributed = "RANK" in os.environ  # launched by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    tokenizer = train_tokenizer([builtin_text()], vocab_size=args.vocab_size)
    ids = torch.from_numpy(token_stream(tokenizer).ids.astype("int64"))
    torch.manual_seed(0)  # the same initial weights on every rank
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=args.seq_len,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=4,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1 + rank)  # each rank draws its own batches
    checkpoint, start = args.out / "ckpt.pt", 0
    if args.resume:
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        data.set_state(saved["data"][rank])
        start = saved["step"]
    trained = DistributedDataParallel(model) if distributed else model
    tokens_per_step = args.batch_size * args.seq_len * world

    watch = WatchConfig(schedule=Schedule.every_steps(args.every))
    monitor = Monitor(watch, trained, tokenizer=tokenizer, run_dir=args.out / "regionwatch")
    if args.resume:
        monitor.load_state_dict(saved["regionwatch"])  # regionwatch (2/4): the same run
    with monitor:  # regionwatch (3/4): a new run measures its step-0 baseline here
        for step in range(start + 1, args.steps + 1):
            starts = torch.randint(len(ids) - args.seq_len, (args.batch_size,), generator=data)
            batch = torch.stack([ids[i : i + args.seq_len] for i in starts.tolist()])
            loss = trained(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            monitor.step(step, tokens=step * tokens_per_step)  # regionwatch (4/4)
            if step % args.checkpoint_every == 0 or step == args.steps:
                save(checkpoint, model, optimizer, data, step, monitor.state_dict(), rank)
    if rank == 0:
        print(f"snapshots: {monitor.run_dir}; view: tensorboard --logdir {monitor.run_dir}")
    if distributed:
        # Free the DDP wrapper and meet before the group goes. A reducer freed after
        # destroy_process_group joins gloo's worker threads holding the GIL, and hangs if one
        # of them is still releasing the last collective's tensors (seen once in CI).
        del trained
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def save(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: torch.Generator,
    step: int,
    monitor_state: dict,
    rank: int,
) -> None:
    """Rank 0 writes the checkpoint; every rank's data generator state goes into it."""
    states = [data.get_state()]
    if dist.is_initialized():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, data.get_state())
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        state |= {"data": states, "step": step, "regionwatch": monitor_state}
        torch.save(state, path)


if __name__ == "__main__":
    main()
