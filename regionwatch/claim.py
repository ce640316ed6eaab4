"""The run claim: whose run a run directory holds, and the proof that lets a resume cut it back.

A training run that starts into a run directory makes the store there its own (`claim`). Only a
proven resume (the driver's restored state names the store's run id) may delete snapshots: those
after the restored step, of weights that no longer exist. Every other start into a directory that
already holds snapshots is refused, since continuing would splice two models under one run id and
cutting back would delete the earlier run's snapshots. Two restarts need no proof, as they lose
and mix nothing: into an empty run, and at step 0 into a run holding only a step-0 baseline of
these very weights (the same seeded script, restarted before its first checkpoint).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from regionwatch.errors import ConfigError
from regionwatch.snapshot import weights_fingerprint
from regionwatch.store import SnapshotStore

logger = logging.getLogger(__name__)


def check_writable(run_dir: Path) -> None:
    """Create `run_dir` and write a file in it, or refuse it naming the fix.

    Raises:
        ConfigError: the directory cannot be created or written.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".regionwatch-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"run dir {run_dir} is not writable ({err}); pass a writable run_dir=..."
        ) from err


def claim(
    store: SnapshotStore, restored: Mapping[str, Any] | None, *, step: int, model: nn.Module
) -> str | None:
    """Make `store` this training run's: cut it back on a proven resume; else say why not.

    Args:
        store: the opened run.
        restored: the driver's restored `Monitor.state_dict()`, or None on a fresh start.
        step: the global step the run starts or resumes at.
        model: the model about to train (its weights prove a restarted step-0 baseline).

    Returns:
        None when the run is this one's (cut back on a resume), else the refusal's message.
    """
    if resumes(store, restored):
        dropped = store.truncate_after(step)
        if dropped:
            logger.warning(
                "resumed run %s at step %d: dropped later snapshots %s from %s",
                store.run_id,
                step,
                dropped,
                store.path,
            )
        return None
    records, failures = store.records(), store.failures()
    if not records and not failures:
        return None  # an empty run: nothing to lose or to mix
    if (
        step == 0
        and not failures
        and [r["step"] for r in records] == [0]
        and records[0]["weights_fingerprint"] == weights_fingerprint(model)
    ):
        return None  # its own baseline: the same initial weights, bit for bit
    steps = sorted(r["step"] for r in records)
    held = f"{len(steps)} snapshots, steps {steps[0]}..{steps[-1]}" if steps else "no snapshots"
    restored = restored or {}
    if restored.get("run_id"):
        why = f"the checkpoint this run resumed from belongs to run {restored['run_id']}"
    elif step > 0:  # a checkpoint was restored, but it names no run (older regionwatch)
        why = f"the checkpoint this run resumed from (step {step}) does not name that run"
    else:
        why = "this training run did not resume from a checkpoint of it"
    return (
        f"run_dir {store.path} already holds run {store.run_id} ({held}, "
        f"{len(failures)} failed), and {why}. regionwatch never mixes two runs in one "
        "directory nor deletes an earlier run's snapshots: to continue that run, resume "
        "from its checkpoint (Lightning: trainer.fit(..., ckpt_path=...); HF: "
        "trainer.train(resume_from_checkpoint=...); a plain loop: "
        "monitor.load_state_dict(checkpoint[...]) before `with monitor:`); to start a new run, "
        f"pass a new run_dir, or delete {store.path} to discard the old one"
    )


def resumes(store: SnapshotStore, restored: Mapping[str, Any] | None) -> bool:
    """Whether the restored driver state proves this run resumes `store`'s run."""
    if not restored:
        return False
    if restored.get("run_id") is not None:
        return restored["run_id"] == store.run_id
    # Resume state saved before it held the run id names only the run directory.
    return bool(restored.get("run_dir")) and Path(restored["run_dir"]).resolve() == (
        store.path.resolve()
    )
