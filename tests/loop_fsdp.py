"""FSDP2 in a plain loop: `python -m torch.distributed.run --standalone --nproc-per-node 2
-m tests.loop_fsdp OUT`, 2 CPU processes (gloo).

Every rank shards the seeded tiny GPT-2 with `fully_shard` (each block, then the root), trains
it in a plain loop on its own batches and calls `monitor.step` after every optimizer step. Rank 0
saves the gathered final weights to OUT/final.pt, so that the test can measure them in one
process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoTokenizer

from regionwatch import Monitor, ProbeSet
from tests.support.factories import make_watch
from tests.support.lm import BATCH, SEQ, Windows, tiny_gpt2
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB

STEPS = 3


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    probes = ProbeSet.load(out / "probes", tokenizer=tokenizer)
    model = tiny_gpt2(VOCAB)  # seeded: the same weights on every rank before sharding
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = Windows(tokenizer)
    watch = make_watch(2, maps_schedule=None)
    with Monitor(watch, model, probes=probes, run_dir=out / "run") as monitor:
        for step in range(1, STEPS + 1):
            batch = data.ids[(world * step + rank) * BATCH :][:BATCH]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            monitor.step(step, tokens=step * world * BATCH * SEQ)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if rank == 0:
        torch.save(full, out / "final.pt")
        print("DONE", flush=True)
    dist.barrier()  # every rank's gloo workers idle before the group goes (examples/plain_loop.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(Path(sys.argv[1]))
