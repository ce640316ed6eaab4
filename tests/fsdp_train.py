"""FSDP on 2 CPU processes (gloo), RegionMonitor: `python -m tests.fsdp_train OUT STEPS [flags]`.

FSDP2 by default: Lightning's `ModelParallelStrategy` with `fully_shard` applied to every GPT-2
block and to the root in `configure_model` (the torchtitan layout). `--fsdp1`: Lightning's
`FSDPStrategy` (FullyShardedDataParallel wrapping the LightningModule, each block its own unit).
Lightning relaunches this script for rank 1. Rank 0 saves the gathered final weights to
OUT/final.pt so that the test can measure them in one process; `--off` trains without the callback
(the observer-effect control); `--tensor-parallel` trains a Llama with its MLPs split over the
ranks (the callback must refuse it before step 1). Checkpoints are saved every 3 steps (FSDP2:
sharded, torch.distributed.checkpoint); the run resumes from OUT/ckpt/last.ckpt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from transformers import AutoTokenizer
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from regionwatch import ProbeSet
from tests.conftest import tiny_model
from tests.support.factories import make_monitor
from tests.support.lm import TinyLM, Windows, loader, trainer


class ShardedLM(TinyLM):
    """TinyLM whose GPT-2 is sharded with FSDP2: each block, then the root."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for block in self.lm.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.lm, mesh=mesh)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's `FSDPStrategy` (FSDP1) on CPU processes, over gloo.

    FSDP1 runs on CPU when told `device_id=cpu`; Lightning refuses FSDP without CUDA only by
    checking for `FSDPStrategy` itself (not subclasses), and hands FSDP `root_device.index`,
    which is None on a CPU. This wraps with the CPU device, then leaves the rest to Lightning,
    which keeps a model that is wrapped already.
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        wrapped = FullyShardedDataParallel(
            model,
            device_id=torch.device("cpu"),
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            **self.kwargs,
        )
        return super()._setup_model(wrapped)


class Steps(Callback):
    def on_train_batch_end(self, trainer: L.Trainer, *_: object) -> None:
        if trainer.global_rank == 0:
            print(f"STEP {trainer.global_step}", flush=True)


class ParallelLM(TinyLM):
    """A Llama whose MLP input projections are split over the ranks (tensor parallelism)."""

    def __init__(self) -> None:
        super().__init__(2)
        self.lm = tiny_model("llama", layers=3)

    def configure_model(self) -> None:
        for layer in self.lm.model.layers:
            parallelize_module(
                layer.mlp, self.device_mesh["tensor_parallel"], {"up_proj": ColwiseParallel()}
            )


def main(out: Path, steps: int, watch: bool) -> None:
    L.seed_everything(0)  # dropout draws from each rank's RNG: the same with and without the probe
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    probes = ProbeSet.load(out / "probes", tokenizer=tokenizer)
    callbacks: list[Callback] = [Steps()]
    if watch:
        callbacks.append(make_monitor("lightning", probes, out / "run", maps_schedule=None))
    callbacks.append(
        ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1, save_last=True)
    )
    tensor_parallel = "--tensor-parallel" in sys.argv
    if "--fsdp1" in sys.argv:
        module = TinyLM(len(tokenizer))
        strategy = CPUFSDPStrategy(auto_wrap_policy={GPT2Block}, state_dict_type="sharded")
    else:
        module = ParallelLM() if tensor_parallel else ShardedLM(len(tokenizer))
        strategy = ModelParallelStrategy(
            data_parallel_size=1 if tensor_parallel else 2,
            tensor_parallel_size=2 if tensor_parallel else 1,
        )
    fit = trainer(
        out,
        callbacks,
        max_steps=steps,
        devices=2,
        strategy=strategy,
        enable_checkpointing=True,
        deterministic=False,
    )
    last = out / "ckpt" / "last.ckpt"
    fit.fit(module, loader(Windows(tokenizer)), ckpt_path=last if last.exists() else None)
    # A collective: every rank takes part, rank 0 keeps the full weights.
    full = get_model_state_dict(fit.strategy.model, options=StateDictOptions(full_state_dict=True))
    if fit.global_rank == 0:
        torch.save({k.removeprefix("lm."): v for k, v in full.items()}, out / "final.pt")
        print("DONE", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(Path(sys.argv[1]), int(sys.argv[2]), "--off" not in sys.argv[3:])
