"""Pretrain a small Llama with transformers.Trainer, watching stable regions form: a full example.

    python examples/train_hf.py --out runs/hf-example
    tensorboard --logdir runs/hf-example/regionwatch --samples_per_plugin images=100
    # then open http://localhost:6006/?smoothing=0#timeseries

The regionwatch lines are marked. The Trainer counts training tokens only when asked
(`include_num_input_tokens_seen`): regionwatch logs over tokens, so it needs that count.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from regionwatch import RegionMonitorCallback  # regionwatch (1/3)
from regionwatch.corpus import builtin_text, token_stream, train_tokenizer
from regionwatch.tensorboard import view_hint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/hf-example"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()

    tokenizer = train_tokenizer([builtin_text()], vocab_size=2048)
    ids = token_stream(tokenizer).ids
    windows = ids[: len(ids) // args.seq_len * args.seq_len].reshape(-1, args.seq_len).tolist()
    data = datasets.Dataset.from_dict({"input_ids": windows, "labels": windows})

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=args.seq_len,
    )
    training = TrainingArguments(
        output_dir=str(args.out),
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        logging_steps=25,
        save_strategy="no",
        report_to=["tensorboard"],
        include_num_input_tokens_seen="non_padding",  # regionwatch (2/3): tokens seen
    )
    trainer = Trainer(LlamaForCausalLM(config), training, train_dataset=data)
    # regionwatch (3/3): stored in <out>/regionwatch; the scalars also reach report_to's loggers
    RegionMonitorCallback(tokenizer=tokenizer).attach(trainer)
    trainer.train()
    run_dir = args.out / "regionwatch"
    print(f"snapshots: {run_dir}; view: {view_hint(run_dir, snapshots=0)}")


if __name__ == "__main__":
    main()
