"""A `Snapshot`: one Measurement stamped with where in training it was taken, and its files' form.

A snapshot is what every sink receives and what the store keeps. It records the run, the global
step, the tokens seen, the wall time, and fingerprints of the probe set, the probe config and the
model's weights, so that any number can be traced to the exact prompts, settings and weights that
produced it. On disk it is a safetensors file of raw arrays plus a JSON header; derived numbers
(relative curves, max slopes, map colours) are recomputed from the raw ones by `metrics` on load,
so every number keeps one home.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from regionwatch import metrics
from regionwatch.atomic import float_from_json, json_float
from regionwatch.distributed import local_shard
from regionwatch.errors import StoreError
from regionwatch.probes import ProbeSet
from regionwatch.results import Curves, Measurement, ProbeConfig, RegionMaps

SNAPSHOT_FORMAT = "regionwatch.snapshot"
# Where a snapshot lies in training: a one-off measurement (`regionwatch measure` of a saved model
# without --step/--tokens) knows neither; it is stored in the step-0, 0-token slot with the parts it
# does not know listed under POSITION_KEY, and is never drawn at 0 tokens nor taken for an init.
POSITION_PARTS = ("step", "tokens")
POSITION_KEY = "position_unknown"
# The run info `regionwatch measure` wrote before positions were recorded: its step-0, 0-token
# snapshots were the flags' defaults, not facts, so they are read as of unknown position.
LEGACY_ONE_OFF_INFO = frozenset({"source"})
SNAPSHOT_VERSION = 1  # bump, and keep a reader for the old one, whenever the stored arrays change
FINGERPRINT_CHARS = 16  # hex digits, as ProbeSet.fingerprint and ProbeConfig.fingerprint
# Raw arrays stored per pair part; relative, max_slope and alphas are derived on load.
CURVE_ARRAYS = ("distance", "logit_diff", "top_a", "top_b")
MAP_ARRAYS = ("axis", "distance", "anchors")


@dataclass(frozen=True)
class Snapshot:
    """A measurement at one point of training.

    Attributes:
        measurement: the numbers.
        run_id: the run this snapshot belongs to.
        step: the host's global step (optimizer steps taken).
        tokens: training tokens seen so far, summed over ranks.
        wall_time: Unix time the measurement finished.
        probe_fingerprint: `ProbeSet.fingerprint` of the prompts measured.
        config_fingerprint: `ProbeConfig.fingerprint` of the settings.
        weights_fingerprint: hash of the model's parameters and buffers (see `weights_fingerprint`).
        info: free-form JSON-able facts: model class, dtype, device, checkpoint path, precision.
        position_unknown: which of "step" and "tokens" are not known (a one-off measurement);
            an unknown one is stored as 0, a slot, not a position.
    """

    measurement: Measurement
    run_id: str
    step: int
    tokens: int
    wall_time: float
    probe_fingerprint: str
    config_fingerprint: str
    weights_fingerprint: str
    info: Mapping[str, Any] = field(default_factory=dict)
    position_unknown: tuple[str, ...] = ()

    @classmethod
    def stamp(
        cls,
        measurement: Measurement,
        *,
        run_id: str,
        step: int | None,
        tokens: int | None,
        probes: ProbeSet,
        model: nn.Module,
        info: Mapping[str, Any] | None = None,
        weights: str | None = None,
    ) -> Snapshot:
        """Stamp a fresh measurement of `model` on `probes` at (step, tokens); None: not known.

        `weights` is `weights_fingerprint(model)` when the caller has it already (None: computed).
        """
        facts = {
            "model_class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(_dtype(model)),
            "device": str(_device(model)),
        }
        return cls(
            measurement=measurement,
            run_id=run_id,
            step=0 if step is None else int(step),
            tokens=0 if tokens is None else int(tokens),
            wall_time=time.time(),
            probe_fingerprint=probes.fingerprint,
            config_fingerprint=measurement.config.fingerprint,
            weights_fingerprint=weights or weights_fingerprint(model),
            info={**facts, **(info or {})},
            position_unknown=tuple(
                part
                for part, value in zip(POSITION_PARTS, (step, tokens), strict=True)
                if value is None
            ),
        )

    @property
    def on_tokens_axis(self) -> bool:
        """Whether the tokens seen are known, so that the snapshot has a place over tokens."""
        return "tokens" not in self.position_unknown

    @property
    def summary(self) -> Mapping[str, float]:
        """The headline scalars (docs/method.md §8 names)."""
        return self.measurement.summary

    def record(self) -> dict[str, Any]:
        """One flat strict-JSON dict (NaN as null): the index row and `show --json` line.

        Keys: `step`, `tokens`, `position_unknown` (the parts of the position not known, [] for a
        snapshot taken in training), `wall_time`, `run_id`, the fingerprints, every summary scalar
        under its docs/method.md §8 name (`max_slope/median`, ...), `probe_seconds`, the settings
        that make max slopes comparable (`num_alphas`, `grid`, `write_layer`), and `parts`
        (the parts measured, e.g. ["dissimilar", "maps", "named", "random", "similar"]).
        """
        config = self.measurement.config
        return {
            "step": self.step,
            "tokens": self.tokens,
            POSITION_KEY: list(self.position_unknown),
            "wall_time": self.wall_time,
            "run_id": self.run_id,
            "probe_fingerprint": self.probe_fingerprint,
            "config_fingerprint": self.config_fingerprint,
            "weights_fingerprint": self.weights_fingerprint,
            "num_alphas": config.num_alphas,
            "grid": config.grid,
            "write_layer": config.write_layer,
            "parts": sorted(
                [*self.measurement.curves, *(["maps"] if self.measurement.maps else [])]
            ),
            **{k: json_float(v) for k, v in self.summary.items()},
            "probe_seconds": json_float(self.measurement.timing.get("total", math.nan)),
        }

    def header(self) -> dict[str, Any]:
        """Everything but the arrays, JSON-able: stored as the safetensors metadata and sidecar."""
        m = self.measurement
        return {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "run_id": self.run_id,
            "step": self.step,
            "tokens": self.tokens,
            POSITION_KEY: list(self.position_unknown),
            "wall_time": self.wall_time,
            "probe_fingerprint": self.probe_fingerprint,
            "config_fingerprint": self.config_fingerprint,
            "weights_fingerprint": self.weights_fingerprint,
            "config": m.config.to_dict(),
            "parts": sorted(m.curves),
            "maps": m.maps is not None,
            "summary": {k: json_float(v) for k, v in m.summary.items()},
            "timing": dict(m.timing),
            "info": dict(self.info),
        }

    def arrays(self) -> dict[str, Tensor]:
        """The raw arrays, CPU and contiguous, named `curves/<part>/<array>` and `maps/<array>`."""
        out = {
            f"curves/{part}/{name}": getattr(curves, name)
            for part, curves in self.measurement.curves.items()
            for name in CURVE_ARRAYS
        }
        if self.measurement.maps is not None:
            out |= {f"maps/{name}": getattr(self.measurement.maps, name) for name in MAP_ARRAYS}
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def from_parts(
        cls,
        header: Mapping[str, Any],
        arrays: Mapping[str, Tensor],
        *,
        run_info: Mapping[str, Any] | None = None,
    ) -> Snapshot:
        """Rebuild a snapshot from `header()` and `arrays()`; derived numbers are recomputed.

        `run_info` (the store's run info) tells a header written before positions were recorded
        by `regionwatch measure` (see `position_unknown`).

        Raises:
            StoreError: another format, a newer version, or missing arrays.
        """
        if header.get("format") != SNAPSHOT_FORMAT or not isinstance(header.get("version"), int):
            raise StoreError(f"not a regionwatch snapshot header: format={header.get('format')!r}")
        if header["version"] > SNAPSHOT_VERSION:
            raise StoreError(
                f"snapshot format version {header['version']} is newer than this regionwatch reads "
                f"({SNAPSHOT_VERSION}); upgrade regionwatch"
            )
        config = ProbeConfig.from_dict(header["config"])
        try:
            curves = {part: _curves(config, arrays, part) for part in header["parts"]}
            maps = _maps(arrays) if header["maps"] else None
        except KeyError as err:
            raise StoreError(f"snapshot at step {header.get('step')} lacks array {err}") from None
        summary = {k: float_from_json(v) for k, v in header["summary"].items()}
        measurement = Measurement(
            config=config, curves=curves, maps=maps, summary=summary, timing=header["timing"]
        )
        return cls(
            measurement=measurement,
            run_id=header["run_id"],
            step=header["step"],
            tokens=header["tokens"],
            wall_time=header["wall_time"],
            probe_fingerprint=header["probe_fingerprint"],
            config_fingerprint=header["config_fingerprint"],
            weights_fingerprint=header["weights_fingerprint"],
            info=header.get("info", {}),
            position_unknown=position_unknown(header, run_info or {}),
        )


def position_unknown(stored: Mapping[str, Any], run_info: Mapping[str, Any]) -> tuple[str, ...]:
    """The parts of a stored row's or header's position that are not known.

    Rows and headers written since positions are recorded say it under POSITION_KEY. Older ones
    do not: a snapshot at step 0 and 0 tokens in a run `regionwatch measure` made (its run info
    is exactly LEGACY_ONE_OFF_INFO) got them as the defaults of --step and --tokens, so its
    position is unknown; every other old snapshot was placed by a training run or a replay.

    Args:
        stored: an index row or snapshot header (`step`, `tokens`, maybe POSITION_KEY).
        run_info: the run's info (`SnapshotStore.info`).

    Returns:
        A sub-tuple of POSITION_PARTS; () for a snapshot placed in training.
    """
    if POSITION_KEY in stored:
        return tuple(part for part in POSITION_PARTS if part in stored[POSITION_KEY])
    legacy = set(run_info) == LEGACY_ONE_OFF_INFO and stored["step"] == stored["tokens"] == 0
    return POSITION_PARTS if legacy else ()


def is_init(row: Mapping[str, Any]) -> bool:
    """Whether an index row is a snapshot at initialization: step 0, and its position known."""
    return row["step"] == 0 and not row.get(POSITION_KEY)


def on_tokens_axis(row: Mapping[str, Any]) -> bool:
    """Whether an index row's tokens seen are known (see `Snapshot.on_tokens_axis`)."""
    return "tokens" not in row.get(POSITION_KEY, ())


def _curves(config: ProbeConfig, arrays: Mapping[str, Tensor], part: str) -> Curves:
    raw = {name: arrays[f"curves/{part}/{name}"] for name in CURVE_ARRAYS}
    rel = metrics.relative(raw["distance"])
    return Curves(
        alphas=metrics.alpha_grid(config.num_alphas),
        distance=raw["distance"],
        relative=rel,
        max_slope=metrics.max_slope(rel),
        logit_diff=raw["logit_diff"],
        top_a=raw["top_a"],
        top_b=raw["top_b"],
    )


def _maps(arrays: Mapping[str, Tensor]) -> RegionMaps:
    raw = {name: arrays[f"maps/{name}"] for name in MAP_ARRAYS}
    return RegionMaps(
        axis=raw["axis"],
        distance=raw["distance"],
        rgb=metrics.region_rgb(raw["distance"]),
        anchors=raw["anchors"],
    )


def weights_fingerprint(model: nn.Module) -> str:
    """BLAKE2b of every parameter and buffer (names, shapes, dtypes and bytes), 16 hex digits.

    Equal iff the weights are bitwise equal: replay uses it to spot checkpoints that ship the same
    weights twice, and live-vs-replay checks compare it. Costs one pass over the weights (~1 GB/s
    on CPU; GPU tensors are copied to the host a tensor at a time). Of a sharded (FSDP) model, it
    hashes the calling rank's shards: a fingerprint of the run's weights, not equal to the gathered
    ones'.
    """
    digest = hashlib.blake2b(digest_size=FINGERPRINT_CHARS // 2)
    for name, tensor in sorted(_state_tensors(model)):
        tensor = local_shard(tensor)  # a DTensor (FSDP2): this rank's shard, no collective
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.detach().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).cpu().numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def _state_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The (name, tensor) items of `model.state_dict()`, read from the modules themselves.

    An FSDP1 model's state_dict hooks all-gather the full weights: a collective that would hang,
    called on rank zero alone, and a full copy.
    """
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            yield dot + name, param
        for name, buffer in module.named_buffers(recurse=False, remove_duplicate=False):
            if name not in module._non_persistent_buffers_set:
                yield dot + name, buffer


def _dtype(model: nn.Module) -> torch.dtype | None:
    param = next(model.parameters(), None)
    return None if param is None else param.dtype


def _device(model: nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return None if param is None else param.device
