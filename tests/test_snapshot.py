"""Snapshots: stamping, the record, and an exact round trip through safetensors and JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load, save

from regionwatch.errors import StoreError
from regionwatch.measurement import ProbeConfig
from regionwatch.probes import ProbeSet
from regionwatch.sampling import NamedPair
from regionwatch.snapshot import Snapshot, weights_fingerprint
from tests.conftest import tiny_model
from tests.support.factories import make_probes, make_snapshot


@pytest.fixture(scope="module")
def probes() -> ProbeSet:
    return make_probes(named=(NamedPair("U", "user", (1, 2, 3), (1, 2, 4), "x", "y"),))


@pytest.fixture(scope="module")
def snapshot(probes: ProbeSet) -> Snapshot:
    return make_snapshot(probes, step=7, tokens=4096, info={"note": "t"})  # SMALL_PROBE


def round_trip(snap: Snapshot) -> Snapshot:
    """Through the bytes and text that a store writes."""
    header = json.loads(json.dumps(snap.header()))
    return Snapshot.from_parts(header, load(save(snap.arrays())))


def test_round_trip_is_exact(snapshot: Snapshot) -> None:
    """Every array, derived number, scalar and stamp comes back bitwise equal."""
    again = round_trip(snapshot)
    assert again.record() == snapshot.record()
    assert again.info == snapshot.info
    assert again.measurement.config == snapshot.measurement.config
    assert set(again.measurement.curves) == {"random", "similar", "dissimilar", "named"}
    for part, curves in snapshot.measurement.curves.items():
        back = again.measurement.curves[part]
        for name in ("alphas", "distance", "relative", "max_slope", "logit_diff", "top_a", "top_b"):
            assert torch.equal(
                getattr(back, name).nan_to_num(-1), getattr(curves, name).nan_to_num(-1)
            ), (part, name)
    for name in ("axis", "distance", "rgb", "anchors"):
        assert torch.equal(
            getattr(again.measurement.maps, name), getattr(snapshot.measurement.maps, name)
        ), name


def test_stamp_records_fingerprints(snapshot: Snapshot, probes: ProbeSet) -> None:
    """The stamp carries the probe, config and weights fingerprints and the model's facts."""
    assert snapshot.probe_fingerprint == probes.fingerprint
    assert snapshot.config_fingerprint == ProbeConfig(num_alphas=5, grid=5).fingerprint
    assert snapshot.info["model_class"] == "GPT2LMHeadModel"
    assert snapshot.info["dtype"] == "torch.float32"
    assert snapshot.info["note"] == "t"


def test_record_carries_the_headline_scalars(snapshot: Snapshot) -> None:
    """The record is flat JSON with step, tokens and docs/method.md §8's names."""
    record = snapshot.record()
    json.dumps(record, allow_nan=False)
    assert (record["step"], record["tokens"], record["num_alphas"], record["grid"]) == (
        7,
        4096,
        5,
        5,
    )
    assert record["max_slope/median"] == pytest.approx(snapshot.summary["max_slope/median"])
    for key in (
        "max_slope/q25",
        "max_slope/q75",
        "max_slope/similar_median",
        "pairs/excluded",
        "probe_seconds",
    ):
        assert key in record


def test_nan_scalars_are_stored_as_null(snapshot: Snapshot) -> None:
    """A NaN headline scalar becomes JSON null and NaN again on load."""
    header = snapshot.header()
    header["summary"]["max_slope/median"] = None
    again = Snapshot.from_parts(json.loads(json.dumps(header, allow_nan=False)), snapshot.arrays())
    assert math.isnan(again.summary["max_slope/median"])
    assert again.record()["max_slope/median"] is None


def test_weights_fingerprint_tracks_every_weight() -> None:
    """Equal weights give equal fingerprints; one changed element changes it."""
    a, b = tiny_model("llama", seed=3), tiny_model("llama", seed=3)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-6
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(a.to(torch.bfloat16)) != weights_fingerprint(
        tiny_model("llama", seed=3)
    )


def test_newer_format_and_missing_arrays_are_refused(snapshot: Snapshot) -> None:
    """A header from a newer regionwatch, or a file without its arrays, is a StoreError."""
    header = snapshot.header()
    with pytest.raises(StoreError, match="newer than this regionwatch reads"):
        Snapshot.from_parts({**header, "version": 99}, snapshot.arrays())
    arrays = dict(snapshot.arrays())
    del arrays["curves/similar/distance"]
    with pytest.raises(StoreError, match="lacks array 'curves/similar/distance'"):
        Snapshot.from_parts(header, arrays)
    with pytest.raises(StoreError, match="not a regionwatch snapshot"):
        Snapshot.from_parts({"format": "other"}, arrays)
