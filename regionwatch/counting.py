"""Token counting: how many training tokens a batch holds, and what counts as a token count.

regionwatch's axis is training tokens seen (STYLE.md §2.2, `tokens_seen`). The Lightning driver
counts every batch with `count_batch_tokens` (or the user's `count_tokens`); the HF Trainer counts
its own; a plain loop passes its count to `Monitor.step`. Each count goes through `token_count`,
so every host refuses the same bad values with the same message.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from regionwatch.errors import ConfigError

CountTokens = Callable[[Any], int]  # a batch -> its number of training tokens


def token_count(value: Any, *, what: str) -> int:
    """A token count as an int: an integer >= 0 (NumPy and 1-element integer tensors too).

    Args:
        value: the count to check.
        what: who gave it, for the message (e.g. "count_tokens returned").

    Raises:
        ConfigError: a float, a bool, None, a negative number, ..., with the fix.
    """
    try:
        count = None if isinstance(value, bool) else operator.index(value)
    except TypeError:  # a float, a float tensor, None, ...
        count = None
    if isinstance(value, Tensor) and value.dtype == torch.bool:
        count = None
    if count is None or count < 0:
        raise ConfigError(
            f"{what} {value!r} as a token count; need the number of training tokens seen, an "
            "int >= 0, e.g. int(batch['attention_mask'].sum()) summed over steps and ranks"
        )
    return count


def count_batch_tokens(batch: Any) -> int:
    """Non-padding tokens of a batch: its attention mask's sum, else the size of its input ids.

    Understands dicts (`attention_mask`, `input_ids`), a bare id tensor, and a tuple/list whose
    first item is the id tensor.

    Raises:
        ConfigError: a batch it cannot read, with the fix (pass `count_tokens=`).
    """
    if isinstance(batch, Mapping):
        if isinstance(batch.get("attention_mask"), Tensor):
            return int(batch["attention_mask"].sum())
        if isinstance(batch.get("input_ids"), Tensor):
            return batch["input_ids"].numel()
    if isinstance(batch, Tensor) and not batch.is_floating_point():
        return batch.numel()
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
        return batch[0].numel()
    raise ConfigError(
        f"cannot count the tokens of a {type(batch).__name__} batch; pass "
        "count_tokens=lambda batch: <number of training tokens in it>"
    )
