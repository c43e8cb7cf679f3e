"""NDVI engine: open red and NIR, compute NDVI window by window, write a float32 GeoTIFF, report stats.

Pixel rules (also written into the output tags):

- Digital numbers are cast to float32 before any arithmetic (uint16 ``nir - red`` would wrap).
- Reflectance = DN * scale + offset. Scale and offset come from the parameters, else from what the
  file declares for the band (``dataset.scales`` / ``dataset.offsets``), else 1.0 and 0.0.
- A pixel is *nodata* when either band equals its nodata value (the override from the parameters,
  else the band's own), is NaN, or is masked by an internal/per-dataset mask or alpha band.
- Negative reflectance after the offset (water, shadow, sensor noise) is clipped to 0 before NDVI.
- A pixel whose red + NIR reflectance is 0 is invalid and counted as *zero_sum*, not nodata.
- NDVI = (NIR - red) / (NIR + red), clamped to [-1, 1]; invalid pixels are NaN in the output.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader
from rasterio.windows import Window

from eventflow.errors import InputError, RasterTooLarge
from eventflow.ndvi.stats import SceneStats, StatsAccumulator

#: Rule recorded in the ``EVENTFLOW_NEGATIVE_REFLECTANCE_RULE`` tag.
NEGATIVE_REFLECTANCE_RULE = "clip-to-0"

#: Rows per processing window; equal to the output tile height so each window writes whole tile rows.
WINDOW_ROWS = 512
_TILE = 512

# GDAL drivers tried, in order, when opening user inputs. rasterio 1.4.4 documents a list for
# ``rasterio.open(driver=...)`` but its open() rejects anything but a str ("invalid driver"), so each
# driver is tried on its own: a single name still reaches GDALOpenEx as its allowed-driver list, which
# keeps VRT, HDF, netCDF and other drivers that can read or reference arbitrary files away from user
# paths. Cloud Optimized GeoTIFFs are read by GTiff (GDAL's COG driver only writes).
_INPUT_DRIVERS = ("GTiff", "JP2OpenJPEG")


@dataclass(frozen=True, slots=True)
class BandSource:
    """One band of a local raster file: ``path`` (already vetted by the caller) and 1-based ``band``."""

    path: str
    band: int


@dataclass(frozen=True, slots=True)
class NdviParams:
    """What to compute: the red and NIR bands, optional radiometric overrides and the size limit."""

    red: BandSource
    nir: BandSource
    #: reflectance = DN * scale + offset; None uses the file-declared scale (1.0 if none).
    scale: float | None = None
    #: None uses the file-declared offset (0.0 if none).
    offset: float | None = None
    #: Replaces the input nodata value of both bands; None keeps each band's own.
    nodata: float | None = None
    #: width * height above this raises RasterTooLarge.
    max_pixels: int = 20_000 * 20_000


@dataclass(frozen=True, slots=True)
class NdviOutcome:
    """What run_ndvi wrote and measured."""

    output_path: str
    width: int
    height: int
    crs: str | None
    stats: SceneStats
    applied_scale: float
    applied_offset: float

    def to_dict(self) -> dict[str, Any]:
        """Return the outcome as a JSON-serialisable dict."""
        return {
            "output_path": self.output_path,
            "width": self.width,
            "height": self.height,
            "crs": self.crs,
            "stats": self.stats.to_dict(),
            "applied_scale": self.applied_scale,
            "applied_offset": self.applied_offset,
        }


def open_input(source: BandSource, role: str) -> DatasetReader:
    """Open a user input with the allow-listed drivers; InputError names the problem."""
    path = Path(source.path)
    if not path.is_file():
        raise InputError(f"{role} input {source.path!r} does not exist or is not a file")
    last_error: RasterioError | None = None
    for driver in _INPUT_DRIVERS:
        try:
            dataset: DatasetReader = rasterio.open(path, driver=driver)
        except RasterioError as exc:
            last_error = exc
            continue
        if not 1 <= source.band <= dataset.count:
            dataset.close()
            raise InputError(f"{role} band {source.band} is out of range: {source.path!r} has {dataset.count} band(s)")
        return dataset
    raise InputError(
        f"{role} input {source.path!r} is not a readable GeoTIFF or JPEG 2000 file ({last_error})"
    ) from last_error


def _check_size(dataset: DatasetReader, role: str, max_pixels: int) -> None:
    pixels = dataset.width * dataset.height
    if pixels > max_pixels:
        raise RasterTooLarge(
            f"{role} raster is {dataset.width}x{dataset.height} = {pixels} pixels, above the limit of {max_pixels}"
        )


def _check_same_grid(red: DatasetReader, nir: DatasetReader) -> None:
    # Resampling one band onto the other must be a deliberate choice, never a silent one.
    if (red.width, red.height) != (nir.width, nir.height):
        raise InputError(f"red and NIR grids differ: size {red.width}x{red.height} vs {nir.width}x{nir.height}")
    if red.crs != nir.crs:
        raise InputError(f"red and NIR grids differ: CRS {red.crs} vs {nir.crs}")
    if not red.transform.almost_equals(nir.transform):
        raise InputError(f"red and NIR grids differ: transform {tuple(red.transform)} vs {tuple(nir.transform)}")


def _declared(values: tuple[float, ...], band: int, default: float) -> float:
    value = values[band - 1] if values else None
    return default if value is None or math.isnan(value) else float(value)


def _resolve_radiometry(params: NdviParams, red: DatasetReader, nir: DatasetReader) -> tuple[float, float]:
    """Pick the scale and offset applied to both bands; refuse ambiguous file declarations."""
    resolved: list[float] = []
    for name, override, attr, default in (
        ("scale", params.scale, "scales", 1.0),
        ("offset", params.offset, "offsets", 0.0),
    ):
        if override is not None:
            resolved.append(float(override))
            continue
        red_value = _declared(getattr(red, attr), params.red.band, default)
        nir_value = _declared(getattr(nir, attr), params.nir.band, default)
        if red_value != nir_value:
            # The outcome records one scale and one offset; per-band values must be given explicitly.
            raise InputError(
                f"red and NIR bands declare different {name}s ({red_value} vs {nir_value}); pass {name} explicitly"
            )
        resolved.append(red_value)
    return resolved[0], resolved[1]


def _nodata_value(dataset: DatasetReader, band: int, override: float | None) -> float | None:
    if override is not None:
        return float(override)
    value = dataset.nodatavals[band - 1]
    return None if value is None else float(value)


def _uses_mask_band(dataset: DatasetReader, band: int) -> bool:
    # Only real masks: a nodata-derived mask would ignore the nodata override, so nodata is compared by value.
    flags = dataset.mask_flag_enums[band - 1]
    return MaskFlags.per_dataset in flags or MaskFlags.alpha in flags


def _read_band(
    dataset: DatasetReader, band: int, window: Window, nodata: float | None, scale: float, offset: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Return (reflectance as float32 with negatives clipped to 0, invalid mask) for one window."""
    raw = dataset.read(band, window=window)
    invalid = np.zeros(raw.shape, dtype=bool)
    if nodata is not None and not math.isnan(nodata):
        # Compare in the raw dtype, before the float32 cast can merge nearby values.
        invalid |= raw == nodata
    if _uses_mask_band(dataset, band):
        invalid |= dataset.read_masks(band, window=window) == 0
    reflectance = raw.astype(np.float32)
    invalid |= np.isnan(reflectance)
    if scale != 1.0 or offset != 0.0:
        reflectance = reflectance * np.float32(scale) + np.float32(offset)
    np.maximum(reflectance, np.float32(0.0), out=reflectance)
    return reflectance, invalid


def _windows(width: int, height: int) -> Iterator[Window]:
    for row in range(0, height, WINDOW_ROWS):
        yield Window(0, row, width, min(WINDOW_ROWS, height - row))


def _ndvi(
    red: npt.NDArray[np.float32], nir: npt.NDArray[np.float32], invalid: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Return (NDVI with NaN where invalid or zero-sum, zero-sum mask excluding nodata pixels)."""
    total = nir + red
    zero_sum = (total == 0) & ~invalid
    bad = invalid | zero_sum
    with np.errstate(divide="ignore", invalid="ignore"):
        ndvi = (nir - red) / total
    np.clip(ndvi, np.float32(-1.0), np.float32(1.0), out=ndvi)
    ndvi[bad] = np.nan
    return ndvi.astype(np.float32, copy=False), zero_sum


def _source_tag(source: BandSource) -> str:
    return f"{source.path}:{source.band}"


def run_ndvi(
    params: NdviParams,
    output_path: str | os.PathLike[str],
    progress: Callable[[float], None] | None = None,
) -> NdviOutcome:
    """Compute NDVI from ``params`` into a tiled float32 GeoTIFF at ``output_path`` and return its stats.

    Raises InputError for unusable inputs and RasterTooLarge above ``params.max_pixels``. The file is
    written under a temporary name next to ``output_path`` and renamed at the end, so a crash never
    leaves a half-written file under the final name. ``progress`` gets increasing fractions ending at 1.0.
    """
    output = Path(output_path)
    partial = output.with_name(f".{output.name}.partial")
    with ExitStack() as stack:
        red_ds = stack.enter_context(open_input(params.red, "red"))
        _check_size(red_ds, "red", params.max_pixels)
        nir_ds = stack.enter_context(open_input(params.nir, "NIR"))
        _check_size(nir_ds, "NIR", params.max_pixels)
        _check_same_grid(red_ds, nir_ds)
        scale, offset = _resolve_radiometry(params, red_ds, nir_ds)
        red_nodata = _nodata_value(red_ds, params.red.band, params.nodata)
        nir_nodata = _nodata_value(nir_ds, params.nir.band, params.nodata)
        width, height = red_ds.width, red_ds.height
        crs = red_ds.crs.to_string() if red_ds.crs else None
        windows = list(_windows(width, height))
        # Pass 2 (exact median) rereads the output, so progress counts each window twice.
        steps = 2 * len(windows)
        profile = {
            "driver": "GTiff",
            "dtype": "float32",
            "count": 1,
            "width": width,
            "height": height,
            "crs": red_ds.crs,
            "transform": red_ds.transform,
            "nodata": float("nan"),
            "tiled": True,
            "blockxsize": _TILE,
            "blockysize": _TILE,
            "compress": "deflate",
            "predictor": 3,
            "BIGTIFF": "IF_SAFER",
        }
        accumulator = StatsAccumulator()
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            with rasterio.open(partial, "w", **profile) as dst:
                dst.set_band_description(1, "NDVI")
                dst.update_tags(
                    EVENTFLOW_SCALE=repr(scale),
                    EVENTFLOW_OFFSET=repr(offset),
                    EVENTFLOW_NEGATIVE_REFLECTANCE_RULE=NEGATIVE_REFLECTANCE_RULE,
                    EVENTFLOW_RED=_source_tag(params.red),
                    EVENTFLOW_NIR=_source_tag(params.nir),
                )
                for done, window in enumerate(windows, start=1):
                    try:
                        red, red_invalid = _read_band(red_ds, params.red.band, window, red_nodata, scale, offset)
                        nir, nir_invalid = _read_band(nir_ds, params.nir.band, window, nir_nodata, scale, offset)
                    except RasterioError as exc:
                        raise InputError(f"reading the inputs failed at rows {window.row_off}+: {exc}") from exc
                    invalid = red_invalid | nir_invalid
                    ndvi, zero_sum = _ndvi(red, nir, invalid)
                    dst.write(ndvi, 1, window=window)
                    accumulator.add(ndvi[~(invalid | zero_sum)], int(invalid.sum()), int(zero_sum.sum()))
                    if progress is not None:
                        progress(done / steps)
            stats = accumulator.finish(_reread_valid(partial, windows, progress, len(windows), steps))
            os.replace(partial, output)
        finally:
            partial.unlink(missing_ok=True)
    if progress is not None:
        progress(1.0)
    return NdviOutcome(
        output_path=str(output),
        width=width,
        height=height,
        crs=crs,
        stats=stats,
        applied_scale=scale,
        applied_offset=offset,
    )


def _reread_valid(
    path: Path, windows: list[Window], progress: Callable[[float], None] | None, first: int, steps: int
) -> Iterator[npt.NDArray[np.float32]]:
    """Yield the valid values of the written NDVI, window by window, for the median's second pass."""
    with rasterio.open(path) as src:
        for done, window in enumerate(windows, start=first + 1):
            values = src.read(1, window=window)
            yield values[~np.isnan(values)]
            # The last step is reported by run_ndvi itself once the file is in place.
            if progress is not None and done < steps:
                progress(done / steps)


def reference_ndvi(params: NdviParams) -> npt.NDArray[np.float64]:
    """Whole-array float64 NDVI with NaN where invalid: a simple, independent check for tests and small files.

    Follows the pixel rules in the module docstring but reads each band at once, without windows,
    streaming statistics or the engine's helpers (except driver-restricted opening and validation).
    """
    bands: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]] = []
    with open_input(params.red, "red") as red_ds, open_input(params.nir, "NIR") as nir_ds:
        _check_same_grid(red_ds, nir_ds)
        for dataset, source in ((red_ds, params.red), (nir_ds, params.nir)):
            raw = dataset.read(source.band)
            values = raw.astype(np.float64)
            nodata = params.nodata if params.nodata is not None else dataset.nodatavals[source.band - 1]
            invalid = np.isnan(values)
            if nodata is not None:
                invalid |= raw == nodata
            flags = dataset.mask_flag_enums[source.band - 1]
            if MaskFlags.per_dataset in flags or MaskFlags.alpha in flags:
                invalid |= dataset.read_masks(source.band) == 0
            scale = params.scale if params.scale is not None else (dataset.scales[source.band - 1] or 1.0)
            offset = params.offset if params.offset is not None else (dataset.offsets[source.band - 1] or 0.0)
            bands.append((np.maximum(values * scale + offset, 0.0), invalid))
    (red, red_invalid), (nir, nir_invalid) = bands
    total = red + nir
    with np.errstate(divide="ignore", invalid="ignore"):
        ndvi = np.clip((nir - red) / total, -1.0, 1.0)
    ndvi[red_invalid | nir_invalid | (total == 0)] = np.nan
    return ndvi
