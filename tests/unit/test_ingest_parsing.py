"""The lean submit handler parses request bytes in pydantic's JSON mode; FastAPI parses with json.loads and
validates the result. Whatever the JSON mode accepts, FastAPI's way must accept too, as the same request
(same model, same normalized payload, same hash); where the JSON mode refuses, the handler hands the
request to FastAPI, so refusals need not agree."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from eventflow.contract import NdviJobRequest

#: FastAPI's body validation: json.loads, then the body field's adapter in Python mode.
FASTAPI_BODY = TypeAdapter(NdviJobRequest)

BASES: list[dict[str, Any]] = [
    {"farm_id": "farm-1", "sensor": "sentinel2", "inputs": {
        "red": {"href": "file:///data/B04.jp2", "band": 1}, "nir": {"href": "file:///data/B08.jp2", "band": 1}}},
    {"farm_id": "farm-2", "inputs": {"href": "s3://bucket/x.tif", "red_band": 3, "nir_band": 4},
     "scale": 0.0001, "offset": -0.1, "nodata": 0, "priority": 5,
     "output": {"name": "out", "compress": "deflate", "previews": True, "vegetation_threshold": 0.25}},
    {"farm_id": "farm-3", "sensor": "landsat8", "inputs": {"href": "https://h.example/x.tif"},
     "qa": {"href": "file:///data/qa.tif", "kind": "qa_pixel"}, "resample": "bilinear",
     "fields": {"type": "FeatureCollection", "features": [
         {"type": "Feature", "properties": {"n": 1.5, "id": 7}, "geometry": {
             "type": "Polygon", "coordinates": [[[0, 0], [1, 0.5], [1, 1], [0, 0]]]}}]}},
]

#: Values that JSON and Python parsing might read differently, spelled as JSON text.
TRICKY = ["1", "1.0", "1e0", "10E-1", "-0", "-0.0", "0.1", "1e400", "-1e400", "NaN", "Infinity", "-Infinity",
          "123456789012345678901234567890", "1.00000000000000001", "true", "false", "null", '"1"', '"true"',
          '""', '"sentinel2"', '"SENTINEL2"', '"\\u00e9"', '"\\ud83d\\ude00"', '"\\ud800"', '"a\\u0000b"', "[]",
          "{}", '{"type": "FeatureCollection", "features": []}', '"file:///data/x.tif"', '"05.10"', "3", "9", "10"]

FIELDS = ["farm_id", "sensor", "scale", "offset", "nodata", "priority", "processing_baseline", "resample", "fields",
          "output", "qa", "inputs", "unknown"]


def fastapi_parse(raw: bytes) -> NdviJobRequest | None:
    try:
        return FASTAPI_BODY.validate_python(json.loads(raw), from_attributes=True)
    except (ValueError, ValidationError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def assert_lean_parse_is_fastapi_parse(raw: bytes) -> None:
    try:
        lean = NdviJobRequest.model_validate_json(raw)
    except ValidationError:
        return  # handed to FastAPI, which answers as it always did
    full = fastapi_parse(raw)
    assert full is not None, f"JSON mode accepted what FastAPI refuses: {raw!r}"
    assert lean == full
    assert json.dumps(lean.normalized(), sort_keys=True) == json.dumps(full.normalized(), sort_keys=True)
    assert lean.hash_for("t") == full.hash_for("t")


@settings(max_examples=400)
@given(st.sampled_from(BASES), st.sampled_from(FIELDS), st.sampled_from(TRICKY), st.booleans())
@example(BASES[0], "priority", "1e0", False)
def test_a_field_set_to_a_tricky_value(base: dict[str, Any], field: str, value: str, nested: bool) -> None:
    doc = json.loads(json.dumps(base))
    marker = "__VALUE__"
    if nested and isinstance(doc.get("inputs"), dict) and "red" in doc["inputs"]:
        doc["inputs"]["red"]["band"] = marker
    elif nested and isinstance(doc.get("output"), dict):
        doc["output"]["vegetation_threshold"] = marker
    else:
        doc[field] = marker
    assert_lean_parse_is_fastapi_parse(json.dumps(doc).replace(f'"{marker}"', value).encode())


@given(st.sampled_from(BASES), st.sampled_from(FIELDS), st.sampled_from(TRICKY))
def test_duplicate_keys(base: dict[str, Any], field: str, value: str) -> None:
    text = json.dumps(base)
    assert_lean_parse_is_fastapi_parse((text[:-1] + f', "{field}": {value}' + "}").encode())
    assert_lean_parse_is_fastapi_parse(("{" + f'"{field}": {value}, ' + text[1:]).encode())


@given(st.sampled_from(BASES), st.sampled_from(["", " ", "\n", "\t", "\r\n", "\ufeff", "\x00", "x", " []"]),
       st.sampled_from(["utf-8", "utf-16", "utf-8-sig"]))
def test_framing_and_encodings(base: dict[str, Any], around: str, encoding: str) -> None:
    text = json.dumps(base, ensure_ascii=False)
    for raw in (around + text, text + around):
        assert_lean_parse_is_fastapi_parse(raw.encode(encoding))


@given(st.binary(max_size=64))
def test_arbitrary_bytes(raw: bytes) -> None:
    assert_lean_parse_is_fastapi_parse(raw)
