"""The headline numbers reach the user's own loggers: Lightning's and the HF Trainer's, for real.

Every logger here is the real one, writing its real files (CSV, MLflow on SQLite, W&B offline,
TensorBoard), read back with that tool's own reader; nothing is mocked.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import struct
import threading
import time
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Trainer

from regionwatch import RegionMonitor, SnapshotStore
from tests.support.factories import make_monitor
from tests.support.lines import Lines
from tests.support.lm import TinyLM, Windows, hf_args, loader, tiny_gpt2, trainer
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB

# The copies at the trainer's step are named apart from regionwatch's token-axis run.
MEDIAN = "regionwatch_step/max_slope/median"
TOKENS = "regionwatch_step/tokens"
MAP_TAG = "regionwatch_step/maps/triple_0"
STEPS = 4  # snapshots at 0, 2, 4 with every_steps(2)


def fit(
    tmp: Path, lm_probes, lm_data: Windows, logger: object, *, device: str, **kwargs
) -> RegionMonitor:
    callback = make_monitor("lightning", lm_probes, tmp / "run", maps_schedule=None, **kwargs)
    fit_trainer = trainer(tmp, [callback], max_steps=STEPS, logger=logger, device=device)
    fit_trainer.fit(TinyLM(VOCAB), loader(lm_data))
    return callback


def stored(tmp: Path) -> dict[int, tuple[int, float]]:
    """step -> (tokens, median max slope), from the run's store."""
    records = SnapshotStore(tmp / "run").records()
    return {r["step"]: (r["tokens"], r["max_slope/median"]) for r in records}


def test_csv_logger_holds_the_median_at_every_snapshot_with_tokens(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """CSVLogger's metrics.csv: the median max slope at every snapshot, tokens in the same row."""
    csv_logger = CSVLogger(tmp_path / "logs", name="csv")
    lightning_lines = Lines()
    channel = logging.getLogger("lightning.pytorch")  # Lightning's own, printed by default
    channel.addHandler(lightning_lines)
    try:
        fit(tmp_path, lm_probes, lm_data, csv_logger, device=device)
    finally:
        channel.removeHandler(lightning_lines)
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(MEDIAN)]
    got = {int(r["step"]): (int(float(r[TOKENS])), float(r[MEDIAN])) for r in rows}
    assert got == stored(tmp_path)
    assert sorted(got) == [0, 2, 4]
    # Live feedback through Lightning's rank-zero info: where the run goes, a line per snapshot.
    assert channel.getEffectiveLevel() <= logging.INFO
    lines = lightning_lines.messages
    assert any(str(tmp_path / "run") in line and "tensorboard --logdir" in line for line in lines)
    per_snapshot = [line for line in lines if "max slope median" in line]
    assert len(per_snapshot) == 3
    assert all("region maps drawn" in line for line in per_snapshot)


def test_copy_to_loggers_off_leaves_the_users_loggers_alone(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """copy_to_loggers=False: no regionwatch column in the CSV; regionwatch's own run stays."""
    csv_logger = CSVLogger(tmp_path / "logs", name="csv")
    fit(tmp_path, lm_probes, lm_data, csv_logger, device=device, copy_to_loggers=False)
    metrics = Path(csv_logger.log_dir) / "metrics.csv"
    assert not metrics.exists() or MEDIAN not in metrics.read_text()
    assert sorted(stored(tmp_path)) == [0, 2, 4]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_mlflow_logger_on_sqlite_gets_scalars_and_images(
    tmp_path: Path, lm_probes, lm_data: Windows, device: str
) -> None:
    """MLFlowLogger (SQLite store): every snapshot's median and tokens, and the region maps."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_logger = MLFlowLogger(
        experiment_name="regionwatch",
        tracking_uri=uri,
        artifact_location=str(tmp_path / "artifacts"),
    )
    fit(tmp_path, lm_probes, lm_data, mlflow_logger, device=device)
    client = MlflowClient(uri)
    medians = client.get_metric_history(mlflow_logger.run_id, MEDIAN)
    tokens = {m.step: int(m.value) for m in client.get_metric_history(mlflow_logger.run_id, TOKENS)}
    got = {m.step: (tokens[m.step], m.value) for m in medians}
    assert got == stored(tmp_path)
    images = [a.path for a in client.list_artifacts(mlflow_logger.run_id, "images")]
    assert any("maps" in path and "triple_0" in path for path in images), images


# W&B's transaction log (.wandb): LevelDB's log format, records are wandb's own protobufs.
WANDB_HEADER = struct.Struct("<4sHB")  # ":W&B", magic, version
WANDB_CHUNK = struct.Struct("<IHB")  # crc32, length, type
WANDB_BLOCK = 32 * 1024
WANDB_FULL, WANDB_LAST = 1, 4
WANDB_FLUSH_S = 60


def wandb_records(run_file: Path) -> list:
    """Every record of an offline run's transaction log, parsed with wandb's own schema."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = run_file.read_bytes()
    assert WANDB_HEADER.unpack_from(data)[0] == b":W&B"
    pos, pending, records = WANDB_HEADER.size, b"", []
    while pos + WANDB_CHUNK.size <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < WANDB_CHUNK.size:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = WANDB_CHUNK.unpack_from(data, pos)
        pos += WANDB_CHUNK.size
        pending += data[pos : pos + length]
        pos += length
        if kind in (WANDB_FULL, WANDB_LAST):
            records.append(Record.FromString(pending))
            pending = b""
    return records


def wandb_history(run_file: Path) -> list[dict[str, float]]:
    """The history rows of a finished offline run (waits for its exit record)."""
    deadline = time.monotonic() + WANDB_FLUSH_S
    records = wandb_records(run_file)
    # wandb.finish() returns before wandb-core has written the log's tail to disk.
    while not records or records[-1].WhichOneof("record_type") != "exit":
        assert time.monotonic() < deadline, "the offline run's log never got its exit record"
        time.sleep(0.2)
        records = wandb_records(run_file)
    return [
        {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in record.history.item
        }
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]


@pytest.mark.slow
def test_wandb_offline_run_holds_scalars_over_tokens(
    tmp_path: Path, lm_probes, lm_data: Windows, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    """WandbLogger offline: each snapshot's median with its tokens, and the region-map images
    with their tokens (W&B charts regionwatch_step/* over tokens)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_logger = WandbLogger(project="regionwatch", save_dir=str(tmp_path), offline=True)
    fit(tmp_path, lm_probes, lm_data, wandb_logger, device=device)
    import wandb

    wandb.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    got = {int(r["trainer/global_step"]): (int(r[TOKENS]), r[MEDIAN]) for r in rows if MEDIAN in r}
    assert got == stored(tmp_path)
    # The region maps of snapshots, at their step and tokens (the first and last draw maps).
    maps = {
        int(r["trainer/global_step"]): int(r[TOKENS])
        for r in rows
        if r.get(f"{MAP_TAG}/_type") == "images/separated"
    }
    assert {min(got), max(got)} <= set(maps)
    assert maps.items() <= {step: tokens for step, (tokens, _) in got.items()}.items()


@pytest.mark.slow
def test_hf_report_to_tensorboard_and_mlflow_get_the_scalars(
    tmp_path: Path, lm_probes, lm_data: Windows, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    """report_to=["tensorboard", "mlflow"]: the Trainer's own event files and run hold them."""
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the cwd
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # HF's MLflowCallback reads the variable only while MLflow's process-wide URI is unset, and
    # Lightning's MLFlowLogger (an earlier test) sets that: point it here as well.
    mlflow.set_tracking_uri(uri)
    args = hf_args(tmp_path, device=device, report_to=["tensorboard", "mlflow"])
    run = Trainer(tiny_gpt2(VOCAB), args, train_dataset=lm_data)
    make_monitor("hf", lm_probes, tmp_path / "run").attach(run)
    run.train()
    want = stored(tmp_path)
    assert sorted(want) == [0, 2, 4, 6]

    (tb_dir,) = {p.parent for p in Path(args.output_dir).rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    (median_tag,) = [t for t in events.Tags()["scalars"] if t.endswith(MEDIAN)]
    (tokens_tag,) = [t for t in events.Tags()["scalars"] if t.endswith(TOKENS)]
    tb_tokens = {e.step: int(e.value) for e in events.Scalars(tokens_tag)}
    tb = {e.step: (tb_tokens[e.step], e.value) for e in events.Scalars(median_tag)}
    assert sorted(tb) == sorted(want)
    for step, (tokens, median) in tb.items():  # TensorBoard keeps float32
        assert tokens == want[step][0]
        assert math.isclose(median, want[step][1], rel_tol=1e-6)

    client = MlflowClient(uri)
    (mlflow_run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = client.get_metric_history(mlflow_run.info.run_id, MEDIAN)
    assert {m.step: m.value for m in history} == {s: m for s, (_, m) in want.items()}


class LossLM(TinyLM):
    """TinyLM that logs its own loss at every step, as the trainer's own rows in the CSV."""

    def training_step(self, batch: dict, batch_idx: int) -> object:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


def test_csv_logger_keeps_every_row_of_the_trainer_and_of_regionwatch(
    tmp_path: Path, lm_probes, lm_data: Windows
) -> None:
    """The copies run on a helper thread while the training thread waits: CSVLogger, which loses
    rows written from two threads at once, holds every trainer row and every snapshot's row."""
    csv_logger = CSVLogger(tmp_path / "logs", name="csv")
    callback = make_monitor("lightning", lm_probes, tmp_path / "run", every=1, maps_schedule=None)
    steps = 6
    fit_trainer = trainer(
        tmp_path, [callback], max_steps=steps, logger=csv_logger, log_every_n_steps=1
    )
    fit_trainer.fit(LossLM(VOCAB), loader(lm_data))
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["step"]) for r in rows if r.get("train_loss")) == list(range(steps))
    got = {int(r["step"]): float(r[MEDIAN]) for r in rows if r.get(MEDIAN)}
    assert got == {step: median for step, (_, median) in stored(tmp_path).items()}
    assert sorted(got) == list(range(steps + 1))


class HangingLogger(CSVLogger):
    """A real CSVLogger whose regionwatch rows never come back (a dead connection), until the
    test lets them go."""

    def __init__(self, *args: object, release: threading.Event, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.release = release

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if MEDIAN in metrics:
            self.release.wait()
        super().log_metrics(metrics, step)


def test_a_hanging_logger_is_dropped_and_named_and_training_goes_on(
    tmp_path: Path, lm_probes, lm_data: Windows, caplog: pytest.LogCaptureFixture
) -> None:
    """A logger that never returns holds training up for logger_timeout_s once, then gets no
    more copies (a warning names it); every snapshot is still stored."""
    release = threading.Event()
    hanging = HangingLogger(tmp_path / "logs", name="csv", release=release)
    try:
        with caplog.at_level(logging.WARNING, logger="regionwatch"):
            callback = fit(
                tmp_path, lm_probes, lm_data, hanging, device="cpu", logger_timeout_s=0.5
            )
    finally:
        release.set()
    assert sorted(stored(tmp_path)) == [0, 2, 4]
    [warning] = [r.getMessage() for r in caplog.records if "did not return" in r.getMessage()]
    assert "trainer logger 0 (HangingLogger), step 0 did not return within 0.5 s" in warning
    assert [f.what for f in callback.monitor.sink_failures] == [
        "trainer logger 0 (HangingLogger), step 0"
    ]
