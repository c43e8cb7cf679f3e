"""Contract: request validation, canonical hashing (property-tested), poison detection."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from eventflow import hashing
from eventflow.contract import SCHEMA_VERSION, JobState, NdviJobRequest, Sensor, StreamEntry
from eventflow.errors import PoisonMessage
from eventflow.hashing import canonical_json, request_hash
from tests.jobs import shuffled

BASE = {"farm_id": "farm-42", "inputs": {"href": "file:///data/scene.tif", "red_band": 3, "nir_band": 4}}

json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8) | \
    st.floats(allow_nan=False, allow_infinity=False, width=32)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=6), st.integers(0, 2**32))
def test_hash_ignores_key_order_and_whitespace(doc: dict[str, Any], seed: int) -> None:
    rng = random.Random(seed)
    reordered = shuffled(doc, rng)
    spaced = json.loads(json.dumps(reordered, indent=rng.choice([None, 1, 4]), separators=(", ", " : ")))
    assert request_hash("t", doc) == request_hash("t", reordered) == request_hash("t", spaced)


@given(st.integers(-10**9, 10**9))
def test_hash_treats_integral_floats_as_ints(n: int) -> None:
    assert request_hash("t", {"x": n}) == request_hash("t", {"x": float(n)})
    assert canonical_json({"x": float(n)}) == f'{{"x":{n}}}'


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_hash_is_tenant_scoped(a: str, b: str) -> None:
    if a != b:
        assert request_hash(a, BASE) != request_hash(b, BASE)


def test_hash_changes_with_content() -> None:
    other = {**BASE, "inputs": {**BASE["inputs"], "nir_band": 5}}
    assert request_hash("t", BASE) != request_hash("t", other)


def test_request_hash_of_equivalent_requests() -> None:
    a = NdviJobRequest.model_validate(BASE)
    b = NdviJobRequest.model_validate(json.loads(json.dumps(
        {"inputs": {"nir_band": 4.0, "red_band": 3, "href": "file:///data/scene.tif"}, "farm_id": "farm-42",
         "output": {"format": "COG"}})))
    assert a.hash_for("t") == b.hash_for("t")


def test_sensor_preset_fills_bands_and_scale() -> None:
    req = NdviJobRequest.model_validate({"farm_id": "f", "inputs": {"href": "file:///x.tif"}, "sensor": "landsat8"})
    norm = req.normalized()
    assert (norm["inputs"]["red_band"], norm["inputs"]["nir_band"]) == (4, 5)
    assert norm["scale"] == 2.75e-5 and norm["offset"] == -0.2


@pytest.mark.parametrize(("body", "field"), [
    ({**BASE, "extra": 1}, "extra"),
    ({**BASE, "farm_id": "Farm 42"}, "farm_id"),
    ({"farm_id": "f", "inputs": {"href": "file:///x.tif"}}, "inputs"),
    ({**BASE, "priority": 10}, "priority"),
    ({**BASE, "fields": {"type": "Feature"}}, "fields"),
    ({**BASE, "scale": float("nan")}, "scale"),
])
def test_invalid_requests_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        NdviJobRequest.model_validate(body)
    locs = {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}
    assert any(field in loc or loc == "" for loc in locs), locs


def _entry() -> StreamEntry:
    req = NdviJobRequest.model_validate(BASE)
    return StreamEntry(job_id="j1", request_hash=req.hash_for("t"), tenant="t", enqueued_at_ms=1, trace_id="x",
                       payload=req.normalized())


def test_stream_entry_round_trip() -> None:
    entry = _entry()
    assert StreamEntry.from_fields(entry.to_fields()) == entry
    assert entry.to_fields()["v"] == str(SCHEMA_VERSION)


@pytest.mark.parametrize("mutate", [
    lambda f: f.update(v="999"),
    lambda f: f.pop("v"),
    lambda f: f.update(payload="{not json"),
    lambda f: f.update(payload=json.dumps({"farm_id": "f"})),
    lambda f: f.pop("job_id"),
    lambda f: f.update(type="teleport"),
])
def test_bad_entries_are_poison_not_crashes(mutate: Any) -> None:
    fields = _entry().to_fields()
    mutate(fields)
    with pytest.raises(PoisonMessage):
        StreamEntry.from_fields(fields)


def _reference_normalize(value: Any) -> Any:
    """eventflow.hashing._normalize before its exact-type fast path (the canonical form must not move)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else value
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return {str(k): _reference_normalize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_reference_normalize(v) for v in value]
    raise TypeError(type(value).__name__)


@given(st.recursive(json_scalars | st.floats() | st.sampled_from([Sensor.landsat8, JobState.queued, 2.0, -0.0, 1e300]),
                    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                    | st.dictionaries(st.text(max_size=6) | st.integers(-5, 5), inner, max_size=4), max_leaves=20))
def test_canonical_form_is_unchanged(value: Any) -> None:
    expected = json.dumps(_reference_normalize(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=True)
    assert json.dumps(hashing._normalize(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=True) == expected
