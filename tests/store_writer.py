"""A snapshot writer to kill -9: test_store.py's crash test drives it over stdin and stdout.

    python tests/store_writer.py RUN_DIR BASE_FILE

Prints `ready` once torch and the base snapshot are loaded, then answers one line per command:
`fork SEED` forks a child that opens the store and writes, rewrites and truncates snapshots until
it is killed (answers `child PID`; the child prints `done N` after each operation, or `dead` if
it fails); `reap PID` waits for that child (answers `status STATUS`); `exit` ends.
Forking from a warm interpreter makes each kill cost milliseconds instead of a 2 s torch import,
so the test can afford dozens of kills; each child is still a separate process that opens the
store itself and dies by SIGKILL mid-write.

Every snapshot is `derive(base, step, variant)`, so the test can check any visible snapshot
against what the writer wrote for that step.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import traceback
from pathlib import Path

import safetensors.torch
import torch

from regionwatch.snapshot import Snapshot
from regionwatch.store import SnapshotStore

TOKENS_PER_STEP = 1000  # tokens = step * TOKENS_PER_STEP + variant
VARIANTS = (0, 1)  # a rewrite may change a step's tokens, which renames its file
MAX_SNAPSHOTS = 24  # beyond this the writer truncates, keeping the test's checks cheap
REWRITE_P, FAILURE_P, TRUNCATE_P = 0.25, 0.05, 0.3


def save_base(snapshot: Snapshot, path: Path) -> None:
    metadata = {"header": json.dumps(snapshot.header())}
    safetensors.torch.save_file(snapshot.arrays(), str(path), metadata=metadata)


def load_base(path: Path) -> Snapshot:
    with safetensors.safe_open(str(path), "pt") as file:
        header = json.loads(file.metadata()["header"])
        arrays = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    return Snapshot.from_parts(header, arrays)


def derive(base: Snapshot, step: int, variant: int) -> Snapshot:
    """The snapshot the writer stores for (step, variant): stamps and one array depend on both."""
    header = base.header()
    header.update(
        step=step, tokens=step * TOKENS_PER_STEP + variant, wall_time=1e9 + step + variant / 4
    )
    arrays = base.arrays()
    arrays["curves/random/distance"] = arrays["curves/random/distance"] + step + variant / 2
    return Snapshot.from_parts(header, arrays)


def write_until_killed(run_dir: str, base: Snapshot, seed: int) -> None:
    rng = random.Random(seed)
    store = SnapshotStore(run_dir)
    for done in itertools.count(1):
        steps = store.steps()
        draw = rng.random()
        if len(steps) > MAX_SNAPSHOTS and draw < TRUNCATE_P:
            store.truncate_after(rng.choice(steps))
        elif steps and draw < REWRITE_P:
            store.write(derive(base, rng.choice(steps), rng.choice(VARIANTS)))
        elif steps and draw < REWRITE_P + FAILURE_P:
            store.record_failure(step=steps[-1], tokens=0, error=f"simulated {seed}")
        else:
            store.write(derive(base, steps[-1] + 1 if steps else 0, rng.choice(VARIANTS)))
        sys.stdout.write(f"done {done}\n")  # one line, under PIPE_BUF: a kill cannot split it
        sys.stdout.flush()


def main() -> None:
    run_dir, base_file = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)  # no OpenMP pool alive at fork time: children must not inherit one
    base = load_base(base_file)
    derive(base, 0, 0)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "fork":
            pid = os.fork()
            if pid == 0:
                try:
                    write_until_killed(run_dir, base, int(argument))
                except BaseException:  # noqa: BLE001 - reported to the test, which then fails
                    traceback.print_exc()
                    sys.stderr.flush()
                    sys.stdout.write("dead 1\n")
                    sys.stdout.flush()
                os._exit(1)
            sys.stdout.write(f"child {pid}\n")
        elif command == "exit":
            return
        elif command == "reap":
            _, status = os.waitpid(int(argument), 0)
            sys.stdout.write(f"status {status}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
