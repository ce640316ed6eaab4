"""The HF Trainer on 2 CPU processes (DDP, gloo) with RegionMonitorCallback, under torchrun.

`python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.hf_ddp_train OUT STEPS`
(`--fsdp2` / `--fsdp1`: FSDP through accelerate, GPU only; FSDP1 wraps each GPT-2 block, and its
root is reached through `attach`). Rank 0 saves the final weights to OUT/final.pt so that the
test can measure them in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, Trainer

from regionwatch import ProbeSet
from tests.support.factories import make_monitor
from tests.support.lm import Windows, hf_args, tiny_gpt2


def main(out: Path, steps: int, fsdp: str | None) -> None:
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    probes = ProbeSet.load(out / "probes", tokenizer=tokenizer)
    monitor = make_monitor("hf", probes, out / "run", maps_schedule=None)
    sharding = {}
    if fsdp == "fsdp2":
        sharding = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}}
    elif fsdp == "fsdp1":  # each block its own unit, inside the root
        config = {"fsdp_version": 1, "transformer_layer_cls_to_wrap": ["GPT2Block"]}
        sharding = {"fsdp": "full_shard auto_wrap", "fsdp_config": config}
    args = hf_args(
        out,
        max_steps=steps,
        use_cpu=fsdp is None,
        ddp_backend="gloo" if fsdp is None else None,
        **sharding,
    )
    run = Trainer(
        tiny_gpt2(len(tokenizer)), args, train_dataset=Windows(tokenizer), callbacks=[monitor]
    )
    monitor.attach(run)
    run.train()
    state = run.accelerator.get_state_dict(run.model)  # a collective under FSDP
    if run.is_world_process_zero():
        torch.save({k: v.cpu() for k, v in state.items()}, out / "final.pt")
        print(f"TOKENS {run.state.num_input_tokens_seen}", flush=True)


if __name__ == "__main__":
    flags = [f.removeprefix("--") for f in sys.argv[3:] if f.startswith("--fsdp")]
    main(Path(sys.argv[1]), int(sys.argv[2]), flags[0] if flags else None)
