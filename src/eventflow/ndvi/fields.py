"""Per-field NDVI statistics for a GeoJSON FeatureCollection of polygons.

- CRS: the FeatureCollection's ``crs`` member (e.g. ``urn:ogc:def:crs:EPSG::32633``) if present, else
  EPSG:4326 (RFC 7946, longitude/latitude order); geometries are reprojected to the raster CRS.
- Pixel rule: a pixel belongs to a field when its centre is inside the polygon (like rasterstats'
  ``all_touched=False``); ``all_touched=True`` takes every pixel the polygon touches.
- A field partly outside the raster uses the overlapping pixels; one fully outside (or with a null
  geometry) gets ``pixel_count`` 0 and null statistics, not an error.
- Field id: the feature's ``id``, else its ``pid`` or ``id`` property, else its index in the collection.

Each field's pixels are read from the written NDVI (and the invalid-reason raster) inside the field's
bounding box only, so memory follows the largest field, not the scene.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.features import bounds as geometry_bounds
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom
from rasterio.windows import Window

from eventflow.errors import InputError
from eventflow.ndvi.stats import DEFAULT_VEGETATION_THRESHOLD, exact_stats

#: CRS assumed when the collection declares none (RFC 7946).
DEFAULT_FIELDS_CRS = "EPSG:4326"

#: Codes of the invalid-reason raster the engine writes when fields are requested.
REASON_VALID, REASON_NODATA, REASON_ZERO_SUM, REASON_MASKED = 0, 1, 2, 3

_POLYGONAL = ("Polygon", "MultiPolygon")


@dataclass(frozen=True, slots=True)
class Field:
    """One polygon feature, already in the raster CRS (``geometry`` None when null)."""

    id: Any
    geometry: dict[str, Any] | None


def declared_crs(collection: dict[str, Any]) -> CRS:
    """Return the CRS the collection declares (legacy ``crs`` member), else EPSG:4326."""
    member = collection.get("crs")
    if not member:
        return CRS.from_user_input(DEFAULT_FIELDS_CRS)
    name = member.get("properties", {}).get("name") if isinstance(member, dict) else None
    if not isinstance(name, str):
        raise InputError("fields: the crs member must be {'type': 'name', 'properties': {'name': ...}}")
    try:
        return CRS.from_user_input(name)
    except CRSError as exc:
        raise InputError(f"fields: unknown crs {name!r} ({exc})") from exc


def _feature_id(feature: dict[str, Any], index: int) -> Any:
    if feature.get("id") is not None:
        return feature["id"]
    properties = feature.get("properties") or {}
    for key in ("pid", "id"):
        if properties.get(key) is not None:
            return properties[key]
    return index


def parse_fields(collection: dict[str, Any], raster_crs: CRS | None) -> list[Field]:
    """Validate a FeatureCollection and return its polygons reprojected to ``raster_crs``."""
    if not isinstance(collection, dict) or collection.get("type") != "FeatureCollection":
        raise InputError("fields must be a GeoJSON FeatureCollection")
    features = collection.get("features")
    if not isinstance(features, list):
        raise InputError("fields: the FeatureCollection has no features list")
    source_crs = declared_crs(collection)
    if raster_crs is None:
        raise InputError("fields need a georeferenced raster, but the red input has no CRS")
    reproject = source_crs != raster_crs
    parsed: list[Field] = []
    for index, feature in enumerate(features):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise InputError(f"fields: item {index} is not a GeoJSON Feature")
        geometry = feature.get("geometry")
        if geometry is not None:
            if geometry.get("type") not in _POLYGONAL:
                raise InputError(f"fields: feature {index} is a {geometry.get('type')}, not a (Multi)Polygon")
            if reproject:
                geometry = transform_geom(source_crs, raster_crs, geometry)
        parsed.append(Field(_feature_id(feature, index), geometry))
    return parsed


def _window(geometry: dict[str, Any], transform: Any, width: int, height: int) -> Window | None:
    """Pixel window covering the geometry's bounding box, clipped to the raster; None if outside."""
    left, bottom, right, top = geometry_bounds(geometry)
    inverse = ~transform
    # Spelled out: affine >= 3 deprecates `*` for points and older releases lack `@`.
    corners = [
        (inverse.a * x + inverse.b * y + inverse.c, inverse.d * x + inverse.e * y + inverse.f)
        for x in (left, right)
        for y in (bottom, top)
    ]
    cols = [c for c, _ in corners]
    rows = [r for _, r in corners]
    col0, col1 = max(0, math.floor(min(cols))), min(width, math.ceil(max(cols)))
    row0, row1 = max(0, math.floor(min(rows))), min(height, math.ceil(max(rows)))
    if col1 <= col0 or row1 <= row0:
        return None
    return Window(col0, row0, col1 - col0, row1 - row0)


def _window_transform(transform: Affine, window: Window) -> Affine:
    # rasterio's window_transform multiplies Affines with `*`, which affine >= 3 warns about.
    col, row = window.col_off, window.row_off
    return Affine(
        transform.a, transform.b, transform.c + transform.a * col + transform.b * row,
        transform.d, transform.e, transform.f + transform.d * col + transform.e * row,
    )  # fmt: skip


def field_stats(
    fields: list[Field],
    ndvi_path: Path,
    reasons_path: Path,
    all_touched: bool = False,
    vegetation_threshold: float = DEFAULT_VEGETATION_THRESHOLD,
) -> list[dict[str, Any]]:
    """Return one dict per field: ``id``, ``pixel_count`` (pixels in the field) and the stats fields."""
    results: list[dict[str, Any]] = []
    empty = np.zeros(0, dtype=np.float32)
    with rasterio.open(ndvi_path) as ndvi_ds, rasterio.open(reasons_path) as reasons_ds:
        for field in fields:
            window = None
            if field.geometry is not None:
                window = _window(field.geometry, ndvi_ds.transform, ndvi_ds.width, ndvi_ds.height)
            inside = None
            if window is not None:
                inside = geometry_mask(
                    [field.geometry],
                    out_shape=(int(window.height), int(window.width)),
                    transform=_window_transform(ndvi_ds.transform, window),
                    all_touched=all_touched,
                    invert=True,
                )
            if inside is None or not inside.any():
                stats = exact_stats(empty, 0, 0, 0, vegetation_threshold)
                results.append({"id": field.id, "pixel_count": 0, **stats.to_dict()})
                continue
            ndvi = ndvi_ds.read(1, window=window)[inside]
            reasons = reasons_ds.read(1, window=window)[inside]
            counts = np.bincount(reasons, minlength=4)
            stats = exact_stats(
                ndvi[reasons == REASON_VALID],
                int(counts[REASON_NODATA]),
                int(counts[REASON_ZERO_SUM]),
                int(counts[REASON_MASKED]),
                vegetation_threshold,
            )
            results.append({"id": field.id, "pixel_count": int(inside.sum()), **stats.to_dict()})
    return results
