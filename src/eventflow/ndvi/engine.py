"""NDVI engine: open red and NIR, compute NDVI window by window, write a float32 COG, report stats.

Pixel rules (also written into the output tags):

- Digital numbers are cast to float32 before any arithmetic (uint16 ``nir - red`` would wrap).
- Reflectance = DN * scale + offset. Scale and offset come from the parameters, else from what the
  file declares for the band (``dataset.scales`` / ``dataset.offsets``, e.g. the Sentinel-2 baseline
  >= 04.00 offset of -1000 DN), else 1.0 and 0.0.
- A pixel is *nodata* when either band equals its nodata value (the override from the parameters,
  else the band's own), is NaN, is masked by an internal/per-dataset mask or alpha band, or is fill
  in the optional quality band.
- A pixel the quality band rejects (cloud, shadow, snow... see quality.py) is *masked*.
- Negative reflectance after the offset (water, shadow, sensor noise) is clipped to 0 before NDVI.
- A remaining pixel whose red + NIR reflectance is 0 is invalid and counted as *zero_sum*.
- NDVI = (NIR - red) / (NIR + red), clamped to [-1, 1]; invalid pixels are NaN in the output.

Each invalid pixel is counted once, with the precedence nodata > masked > zero_sum.

The NDVI is first written block by block to an uncompressed tiled GeoTIFF in a work directory next to
the output (memory stays flat whatever the scene size); the second statistics pass, the per-field
statistics and GDAL's COG driver (compression) then read that file.

Pass 1 is a three-stage pipeline on two cores: a reader thread decodes window k + 1 (GDAL, which
also decodes the tiles of one window on several threads) while the calling thread computes NDVI
and pass-1 statistics of window k and a writer thread stores window k - 1 and its 2 x 2 average (the
first overview level). The statistics' second pass then runs beside the COG compression. GDAL and
numpy release the GIL for the heavy parts, so the stages really overlap (see bench/README.md).
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import rasterio
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from eventflow.errors import InputError, RasterTooLarge
from eventflow.ndvi.cog import COG_BLOCKSIZE, Codec, write_cog
from eventflow.ndvi.fields import (
    REASON_MASKED,
    REASON_NODATA,
    REASON_ZERO_SUM,
    field_stats,
    parse_fields,
)
from eventflow.ndvi.preview import write_previews
from eventflow.ndvi.quality import MASK_RULES, QaKind, classify
from eventflow.ndvi.stats import DEFAULT_VEGETATION_THRESHOLD, SceneStats, StatsAccumulator

#: Rule recorded in the ``EVENTFLOW_NEGATIVE_REFLECTANCE_RULE`` tag.
NEGATIVE_REFLECTANCE_RULE = "clip-to-0"

#: Rows per processing window; equal to the output tile height so each window writes whole tile rows.
WINDOW_ROWS = 512
_TILE = COG_BLOCKSIZE

#: GDAL block cache while run_ndvi runs, in MB: bounds memory on full tiles (GDAL's default is 5 % of RAM).
GDAL_CACHE_MB = 192

# GDAL drivers tried, in order, when opening user inputs. rasterio 1.4.4 documents a list for
# ``rasterio.open(driver=...)`` but its open() rejects anything but a str ("invalid driver"), so each
# driver is tried on its own: a single name still reaches GDALOpenEx as its allowed-driver list, which
# keeps VRT, HDF, netCDF and other drivers that can read or reference arbitrary files away from user
# paths. Cloud Optimized GeoTIFFs are read by GTiff (GDAL's COG driver only writes).
_INPUT_DRIVERS = ("GTiff", "JP2OpenJPEG")

_RESAMPLING = {"nearest": Resampling.nearest, "bilinear": Resampling.bilinear}

# Progress fractions reached after each stage (pass 1 advances window by window).
_PASS1_END, _OVERVIEWS_END, _COG_END = 0.6, 0.7, 0.9

#: Windows the writer thread may lag behind: bounds memory to a few windows whatever the scene size.
_WRITE_BACKLOG = 2


@dataclass(frozen=True, slots=True)
class BandSource:
    """One band of a local raster file: ``path`` (already vetted by the caller) and 1-based ``band``."""

    path: str
    band: int


@dataclass(frozen=True, slots=True)
class NdviParams:
    """What to compute: the red and NIR bands, optional radiometric overrides, masks, products and limits."""

    red: BandSource
    nir: BandSource
    #: reflectance = DN * scale + offset; None uses the file-declared scale (1.0 if none).
    scale: float | None = None
    #: None uses the file-declared offset (0.0 if none), e.g. -0.1 for Sentinel-2 baseline >= 04.00 at scale 1e-4.
    offset: float | None = None
    #: Replaces the input nodata value of both bands; None keeps each band's own.
    nodata: float | None = None
    #: width * height above this raises RasterTooLarge.
    max_pixels: int = 20_000 * 20_000
    #: Free-text sensor name recorded in the output tags (e.g. "Sentinel-2A MSI").
    sensor: str | None = None
    #: Optional quality band (SCL, QA_PIXEL or Fmask); on another grid it is resampled with nearest.
    qa: BandSource | None = None
    #: How to read ``qa``; required with it.
    qa_kind: QaKind | None = None
    #: GeoJSON FeatureCollection of (Multi)Polygons for per-field stats (see fields.py); None for none.
    fields: dict[str, Any] | None = None
    #: Per-field pixel rule: False = pixel centre inside the polygon, True = every touched pixel.
    all_touched: bool = False
    #: NDVI at or above this counts as vegetation in ``vegetation_fraction``.
    vegetation_threshold: float = DEFAULT_VEGETATION_THRESHOLD
    #: Also write RGBA PNG previews (absolute and p2-p98 stretch) next to the output.
    previews: bool = False
    #: NIR on a different grid: "none" refuses, else it is warped onto the red grid with this resampling.
    resample: Literal["none", "nearest", "bilinear"] = "none"
    #: Output codec (always with the floating-point predictor 3).
    compress: Codec = "zstd"
    #: Codec level; None uses the engine default (ZSTD 1, DEFLATE 1: see bench/README.md).
    compress_level: int | None = None
    #: GDAL threads for decoding inputs, compressing and building overviews ("ALL_CPUS" or a number).
    num_threads: str = "ALL_CPUS"


#: Default level per codec: the fastest levels; higher ones cost seconds per tile for a few % of size.
DEFAULT_LEVELS: dict[str, int] = {"zstd": 1, "deflate": 1}


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
    #: Per-field results (see fields.field_stats), None when no fields were given.
    fields: list[dict[str, Any]] | None = None
    #: {"absolute": path, "relative": path} when previews were requested.
    previews: dict[str, str] | None = None
    #: Wall-clock seconds per stage: read, compute, write (stage file), stats (pass 2), cog, fields, previews, total.
    timings: dict[str, float] = field(default_factory=dict)
    #: The tags written into the output.
    tags: dict[str, str] = field(default_factory=dict)
    #: Where applied_offset came from: request, file, a Sentinel-2 baseline tag, default (0), none (unknown).
    offset_source: str = "request"
    #: Things the user should know about the result (e.g. an assumed Sentinel-2 baseline).
    warnings: list[str] = field(default_factory=list)

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
            "offset_source": self.offset_source,
            "warnings": self.warnings,
            "fields": self.fields,
            "previews": self.previews,
            "timings": self.timings,
            "tags": self.tags,
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


def _s2_offset_from_tags(datasets: tuple[DatasetReader, ...], scale: float) -> tuple[float | None, str]:
    """A Sentinel-2 offset from file metadata: a PROCESSING_BASELINE tag or BOA/RADIO_ADD_OFFSET (in DN)."""
    for dataset in datasets:
        tags = {key.upper(): value.strip() for key, value in dataset.tags().items()}
        for key, value in tags.items():
            if key.endswith("PROCESSING_BASELINE"):
                dn = -1000.0 if value >= "04.00" else 0.0
                return dn * scale, f"Sentinel-2 processing baseline {value} (file tag {key})"
        offsets = {value for key, value in tags.items() if "ADD_OFFSET" in key}
        if len(offsets) == 1:
            dn = float(offsets.pop())
            return dn * scale, f"Sentinel-2 offset {dn:g} DN (file tag)"
    return None, ""


def _resolve_radiometry(params: NdviParams, red: DatasetReader,
                        nir: DatasetReader) -> tuple[float, float, str, list[str]]:
    """Pick the scale and offset applied to both bands; refuse ambiguous file declarations.

    Returns (scale, offset, where the offset came from, warnings).
    """
    resolved: list[float] = []
    source, warnings = "request", []
    for name, override, attr, default in (
        ("scale", params.scale, "scales", 1.0),
        ("offset", params.offset, "offsets", 0.0),
    ):
        if override is not None:
            resolved.append(float(override))
            continue
        if name == "offset":
            declared = [_declared(getattr(ds, attr), src.band, math.nan) for ds, src in ((red, params.red),
                                                                                            (nir, params.nir))]
            # GDAL reports 0.0 for a band that declares no offset, so 0 counts as "not declared" here.
            if all(math.isnan(v) or v == 0.0 for v in declared) and params.sensor == "sentinel2":
                found, source = _s2_offset_from_tags((red, nir), resolved[0])
                if found is None:
                    found, source = 0.0, "none (Sentinel-2 processing baseline unknown)"
                    warnings.append("Sentinel-2 processing baseline unknown and no offset declared by the file: no "
                                    "offset applied, which is right only for baselines before 04.00 (products "
                                    "processed before 25 Jan 2022); pass processing_baseline or offset")
                resolved.append(found)
                continue
            source = "file" if any(not math.isnan(v) and v != 0.0 for v in declared) else "default (0)"
        red_value = _declared(getattr(red, attr), params.red.band, default)
        nir_value = _declared(getattr(nir, attr), params.nir.band, default)
        if red_value != nir_value:
            # The outcome records one scale and one offset; per-band values must be given explicitly.
            raise InputError(
                f"red and NIR bands declare different {name}s ({red_value} vs {nir_value}); pass {name} explicitly"
            )
        resolved.append(red_value)
    return resolved[0], resolved[1], source, warnings


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
    dataset: DatasetReader | WarpedVRT,
    band: int,
    window: Window,
    nodata: float | None,
    scale: float,
    offset: float,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Return (reflectance as float32 with negatives clipped to 0, invalid mask) for one window."""
    raw = dataset.read(band, window=window)
    if nodata is not None and not math.isnan(nodata):
        # Compare in the raw dtype, before the float32 cast can merge nearby values.
        invalid = raw == nodata
    else:
        invalid = np.zeros(raw.shape, dtype=bool)
    if _uses_mask_band(dataset, band):
        invalid |= dataset.read_masks(band, window=window) == 0
    reflectance = raw.astype(np.float32)
    if scale != 1.0:
        reflectance *= np.float32(scale)
    if offset != 0.0:
        reflectance += np.float32(offset)
    if _may_be_non_finite(raw.dtype, scale, offset):
        # NaN or inf in a float band, or an overflow of scale/offset: either would poison the statistics.
        invalid |= ~np.isfinite(reflectance)
    if raw.dtype.kind != "u" or scale < 0 or offset < 0:  # unsigned DN * scale >= 0 + offset >= 0 is >= 0
        np.maximum(reflectance, np.float32(0.0), out=reflectance)
    return reflectance, invalid


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _may_be_non_finite(dtype: np.dtype[Any], scale: float, offset: float) -> bool:
    """Whether DN * scale + offset can be NaN or inf in float32 for this input dtype (always for floats)."""
    if dtype.kind not in "iub":
        return True
    info = np.iinfo(dtype) if dtype.kind != "b" else np.iinfo(np.uint8)
    largest = max(abs(int(info.min)), abs(int(info.max)))
    return largest * abs(scale) + abs(offset) >= _FLOAT32_MAX / 2


def _read_qa(
    dataset: DatasetReader | WarpedVRT, band: int, window: Window, kind: QaKind
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Return (fill, masked) for one window of the quality band; its own nodata and mask count as fill."""
    raw = dataset.read(band, window=window)
    fill, masked = classify(raw, kind)
    nodata = dataset.nodatavals[band - 1]
    if nodata is not None and not math.isnan(nodata):
        fill |= raw == nodata
    if _uses_mask_band(dataset, band):
        fill |= dataset.read_masks(band, window=window) == 0
    return fill, masked & ~fill


def _windows(width: int, height: int) -> Iterator[Window]:
    for row in range(0, height, WINDOW_ROWS):
        yield Window(0, row, width, min(WINDOW_ROWS, height - row))


def _ndvi(
    red: npt.NDArray[np.float32], nir: npt.NDArray[np.float32], invalid: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Return (NDVI with NaN where invalid or zero-sum, that NaN mask); overwrites ``nir``.

    The zero-sum pixels are ``bad & ~invalid``: callers count them as ``count(bad) - count(invalid)``.
    """
    total = nir + red
    bad = total == 0
    bad |= invalid
    # nir - red reuses nir's buffer and the division writes into it: three full-size arrays, not five.
    ndvi = np.subtract(nir, red, out=nir)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(ndvi, total, out=ndvi)
    # With both reflectances >= 0 and finite, |nir - red| <= nir + red survives rounding (it is monotonic),
    # so this clamp changes nothing today; it stays as the documented guarantee of the output range.
    np.clip(ndvi, np.float32(-1.0), np.float32(1.0), out=ndvi)
    np.copyto(ndvi, np.float32(np.nan), where=bad)
    return ndvi, bad


def _average_2x2(block: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The first overview level of an even-sized block as GDAL's AVERAGE computes it with NaN nodata.

    GDAL sums the valid pixels of each 2 x 2 cell in double, row by row, divides by their number and
    rounds to float32 (NaN when none is valid); doing the same in the same order gives the same bits,
    which a test checks against ``build_overviews``.
    """
    valid = ~np.isnan(block)
    zeroed = np.where(valid, block, np.float32(0.0))  # adding 0.0 for a NaN pixel is skipping it
    corners = ((0, 0), (0, 1), (1, 0), (1, 1))
    total = zeroed[0::2, 0::2].astype(np.float64)
    count = valid[0::2, 0::2].astype(np.uint8)
    for row, col in corners[1:]:
        total += zeroed[row::2, col::2]
        count += valid[row::2, col::2]
    with np.errstate(divide="ignore", invalid="ignore"):
        total /= count
    return total.astype(np.float32)


def _source_tag(source: BandSource) -> str:
    return f"{source.path}:{source.band}"


def _align(dataset: DatasetReader, onto: DatasetReader, resampling: Resampling, nodata: float | None) -> WarpedVRT:
    """Warp ``dataset`` onto the grid of ``onto``; without a nodata value an alpha band marks what is outside."""
    options: dict[str, Any] = {
        "crs": onto.crs,
        "transform": onto.transform,
        "width": onto.width,
        "height": onto.height,
        "resampling": resampling,
    }
    if nodata is not None:
        options.update(src_nodata=nodata, nodata=nodata)
    else:
        options["add_alpha"] = True
    return WarpedVRT(dataset, **options)


def _same_grid(red: DatasetReader, other: DatasetReader) -> bool:
    return (
        (red.width, red.height) == (other.width, other.height)
        and red.crs == other.crs
        and red.transform.almost_equals(other.transform)
    )


def _tags(params: NdviParams, scale: float, offset: float, compress: str, level: int) -> dict[str, str]:
    tags = {
        "EVENTFLOW_SENSOR": params.sensor or "unknown",
        "EVENTFLOW_SCALE": repr(scale),
        "EVENTFLOW_OFFSET": repr(offset),
        "EVENTFLOW_NEGATIVE_REFLECTANCE_RULE": NEGATIVE_REFLECTANCE_RULE,
        "EVENTFLOW_MASK_RULE": MASK_RULES[params.qa_kind] if params.qa_kind else "none",
        "EVENTFLOW_RED": _source_tag(params.red),
        "EVENTFLOW_NIR": _source_tag(params.nir),
        "EVENTFLOW_RESAMPLING": params.resample,
        "EVENTFLOW_COMPRESSION": f"{compress.upper()} level {level}, predictor 3",
    }
    if params.qa is not None:
        tags["EVENTFLOW_QA"] = _source_tag(params.qa)
    return tags


def _validate(params: NdviParams) -> None:
    if (params.qa is None) != (params.qa_kind is None):
        raise InputError("qa and qa_kind must be given together")
    if params.qa_kind is not None and params.qa_kind not in MASK_RULES:
        raise InputError(f"qa_kind must be one of {sorted(MASK_RULES)}, not {params.qa_kind!r}")
    if params.resample not in ("none", *_RESAMPLING):
        raise InputError(f"resample must be none, nearest or bilinear, not {params.resample!r}")
    if params.compress not in DEFAULT_LEVELS:
        raise InputError(f"compress must be one of {sorted(DEFAULT_LEVELS)}, not {params.compress!r}")
    if not -1.0 <= params.vegetation_threshold <= 1.0:
        raise InputError("vegetation_threshold must be within [-1, 1]")


def overview_levels(width: int, height: int, blocksize: int = _TILE) -> list[int]:
    """Overview decimation factors 2, 4, ... until the smallest level fits in one tile (none if it already does)."""
    levels: list[int] = []
    factor = 2
    while math.ceil(max(width, height) / (factor // 2)) > blocksize:
        levels.append(factor)
        factor *= 2
    return levels


class _Clock:
    """Adds seconds to named stages: wall-clock laps of the calling thread, and busy time of pipeline threads."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._last = time.perf_counter()
        self._lock = threading.Lock()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.add(stage, now - self._last)
        self._last = now

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.totals[stage] = self.totals.get(stage, 0.0) + seconds


def run_ndvi(
    params: NdviParams,
    output_path: str | os.PathLike[str],
    progress: Callable[[float], None] | None = None,
) -> NdviOutcome:
    """Compute NDVI from ``params`` into a float32 Cloud Optimized GeoTIFF at ``output_path``; return its stats.

    Raises InputError for unusable inputs and RasterTooLarge above ``params.max_pixels``. The file is
    written under a temporary name next to ``output_path`` and renamed at the end, so a crash never
    leaves a half-written file under the final name. ``progress`` gets increasing fractions ending at 1.0.
    """
    _validate(params)
    started = time.perf_counter()
    output = Path(output_path)
    partial = output.with_name(f".{output.name}.partial")
    output.parent.mkdir(parents=True, exist_ok=True)
    level = params.compress_level if params.compress_level is not None else DEFAULT_LEVELS[params.compress]
    env_options = {"GDAL_NUM_THREADS": params.num_threads, "GDAL_CACHEMAX": GDAL_CACHE_MB}
    env = rasterio.Env(**env_options)
    with ExitStack() as stack:
        stack.enter_context(env)
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent)))
        red_ds = stack.enter_context(open_input(params.red, "red"))
        _check_size(red_ds, "red", params.max_pixels)
        nir_ds = stack.enter_context(open_input(params.nir, "NIR"))
        _check_size(nir_ds, "NIR", params.max_pixels)
        scale, offset, offset_source, warnings = _resolve_radiometry(params, red_ds, nir_ds)
        red_nodata = _nodata_value(red_ds, params.red.band, params.nodata)
        nir_nodata = _nodata_value(nir_ds, params.nir.band, params.nodata)
        nir_src: DatasetReader | WarpedVRT = nir_ds
        if params.resample == "none" or _same_grid(red_ds, nir_ds):
            _check_same_grid(red_ds, nir_ds)
        else:
            if red_ds.crs is None or nir_ds.crs is None:
                raise InputError("red and NIR grids differ and one has no CRS, so NIR cannot be resampled")
            nir_src = stack.enter_context(_align(nir_ds, red_ds, _RESAMPLING[params.resample], nir_nodata))
        qa_src: DatasetReader | WarpedVRT | None = None
        if params.qa is not None:
            qa_ds = stack.enter_context(open_input(params.qa, "quality"))
            qa_src = qa_ds
            if not _same_grid(red_ds, qa_ds):
                if red_ds.crs is None or qa_ds.crs is None:
                    raise InputError("the quality band is on another grid and one of them has no CRS")
                # Class codes must never be averaged: nearest is the only meaningful resampling (SCL is 20 m).
                qa_src = stack.enter_context(_align(qa_ds, red_ds, Resampling.nearest, None))
        fields = parse_fields(params.fields, red_ds.crs) if params.fields is not None else None
        width, height = red_ds.width, red_ds.height
        crs = red_ds.crs.to_string() if red_ds.crs else None
        windows = list(_windows(width, height))
        tags = _tags(params, scale, offset, params.compress, level)
        tags["EVENTFLOW_OFFSET_SOURCE"] = offset_source
        stage_profile: dict[str, Any] = {
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
            "compress": "none",
            "BIGTIFF": "IF_SAFER",
        }
        stage = work / "ndvi.tif"
        reasons_path = work / "reasons.tif" if fields is not None else None
        accumulator = StatsAccumulator(params.vegetation_threshold, extra_quantiles=(0.02, 0.98))
        inputs = _Inputs(red_ds, nir_src, qa_src, params, red_nodata, nir_nodata, scale, offset)
        clock = _Clock()
        levels = overview_levels(width, height)
        # The 2 x 2 average of each window is the first overview level only when every cell is a whole
        # 2 x 2 block; on odd sizes GDAL's cells straddle pixels, so it builds all levels itself.
        first_level_here = bool(levels) and width % 2 == 0 and height % 2 == 0
        _pass1(inputs, windows, stage_profile, tags, stage, reasons_path, first_level_here, accumulator,
               env_options, clock, progress)
        clock.lap("pass1")
        _build_overviews(stage, levels, first_level_here)
        if progress is not None:
            progress(_OVERVIEWS_END)
        clock.lap("overviews")
        try:
            # Pass 2 of the statistics reads the stage file beside the COG driver, which mostly waits on
            # compression threads: the two overlap instead of running one after the other.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ndvi-stats") as pool:
                stats_future = pool.submit(_timed, clock, "stats", env_options,
                                           lambda: accumulator.finish(_reread_values(stage, windows)))
                write_cog(stage, partial, params.compress, level, params.num_threads)
                stats = stats_future.result()
            if progress is not None:
                progress(_COG_END)
            clock.lap("cog")
            field_results = None
            if fields is not None and reasons_path is not None:
                field_results = field_stats(
                    fields, stage, reasons_path, params.all_touched, params.vegetation_threshold
                )
                clock.lap("fields")
            previews = None
            if params.previews:
                stem = output.with_name(output.name.removesuffix(output.suffix) if output.suffix else output.name)
                previews = write_previews(
                    partial, stem, accumulator.quantiles.get(0.02), accumulator.quantiles.get(0.98)
                )
                clock.lap("previews")
            os.replace(partial, output)
        finally:
            partial.unlink(missing_ok=True)
    if progress is not None:
        progress(1.0)
    timings = dict(clock.totals)
    timings["total"] = time.perf_counter() - started
    return NdviOutcome(
        output_path=str(output),
        width=width,
        height=height,
        crs=crs,
        stats=stats,
        applied_scale=scale,
        applied_offset=offset,
        offset_source=offset_source,
        warnings=warnings,
        fields=field_results,
        previews=previews,
        timings=timings,
        tags=tags,
    )


@dataclass(frozen=True, slots=True)
class _Inputs:
    """The opened inputs and how to read them; used by the reader thread only while pass 1 runs."""

    red: DatasetReader
    nir: DatasetReader | WarpedVRT
    qa: DatasetReader | WarpedVRT | None
    params: NdviParams
    red_nodata: float | None
    nir_nodata: float | None
    scale: float
    offset: float


@dataclass(slots=True)
class _Block:
    """One window's inputs as the reader thread hands them to the compute stage."""

    red: npt.NDArray[np.float32]
    red_invalid: npt.NDArray[np.bool_]
    nir: npt.NDArray[np.float32]
    nir_invalid: npt.NDArray[np.bool_]
    fill: npt.NDArray[np.bool_] | None
    masked: npt.NDArray[np.bool_] | None


def _timed(clock: _Clock, stage: str, env_options: dict[str, Any], work: Callable[[], Any]) -> Any:
    """Run ``work`` in a worker thread with the run's GDAL options, adding its busy seconds to ``stage``."""
    started = time.perf_counter()
    try:
        # rasterio keeps GDAL options per thread outside the main thread, and run_ndvi itself may run in a
        # worker thread, so each pipeline thread sets them again (a thread-local GDAL setting).
        with rasterio.Env(**env_options):
            return work()
    finally:
        clock.add(stage, time.perf_counter() - started)


def _read_block(inputs: _Inputs, window: Window) -> _Block:
    params = inputs.params
    try:
        red, red_invalid = _read_band(inputs.red, params.red.band, window, inputs.red_nodata, inputs.scale,
                                      inputs.offset)  # fmt: skip
        nir, nir_invalid = _read_band(inputs.nir, params.nir.band, window, inputs.nir_nodata, inputs.scale,
                                      inputs.offset)  # fmt: skip
        fill = masked = None
        if inputs.qa is not None and params.qa is not None and params.qa_kind is not None:
            fill, masked = _read_qa(inputs.qa, params.qa.band, window, params.qa_kind)
    except RasterioError as exc:
        raise InputError(f"reading the inputs failed at rows {window.row_off}+: {exc}") from exc
    return _Block(red, red_invalid, nir, nir_invalid, fill, masked)


def _pass1(
    inputs: _Inputs,
    windows: list[Window],
    stage_profile: dict[str, Any],
    tags: dict[str, str],
    stage: Path,
    reasons_path: Path | None,
    first_level_here: bool,
    accumulator: StatsAccumulator,
    env_options: dict[str, Any],
    clock: _Clock,
    progress: Callable[[float], None] | None,
) -> None:
    """Read, compute and write every window through the reader / compute / writer pipeline."""
    with ExitStack() as stack:
        dst = stack.enter_context(rasterio.open(stage, "w", **stage_profile))
        dst.set_band_description(1, "NDVI")
        dst.update_tags(**tags)
        reasons_dst = None
        if reasons_path is not None:
            reasons_profile = {**stage_profile, "dtype": "uint8", "nodata": None}
            reasons_dst = stack.enter_context(rasterio.open(reasons_path, "w", **reasons_profile))
        overview_dst = None
        if first_level_here:
            # An external .ovr next to the stage file: GDAL treats its full-resolution image as the first
            # overview level of the stage file and its own overviews as the following levels.
            overview_profile = {**stage_profile, "width": stage_profile["width"] // 2,
                                "height": stage_profile["height"] // 2}  # fmt: skip
            overview_dst = stack.enter_context(rasterio.open(f"{stage}.ovr", "w", **overview_profile))
        # Entered after the datasets, so the pools finish their last read and write before those close.
        reader = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="ndvi-read"))
        writer = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="ndvi-write"))

        def read(window: Window) -> Future[_Block]:
            return reader.submit(_timed, clock, "read", env_options, lambda: _read_block(inputs, window))

        def write(window: Window, ndvi: npt.NDArray[np.float32], reasons: npt.NDArray[np.uint8] | None) -> None:
            dst.write(ndvi, 1, window=window)
            if overview_dst is not None:
                half = Window(0, window.row_off // 2, window.width // 2, window.height // 2)
                overview_dst.write(_average_2x2(ndvi), 1, window=half)
            if reasons_dst is not None and reasons is not None:
                reasons_dst.write(reasons, 1, window=window)

        writes: deque[Future[None]] = deque()
        next_block = read(windows[0])
        for done, window in enumerate(windows, start=1):
            block = next_block.result()
            if done < len(windows):
                next_block = read(windows[done])
            started = time.perf_counter()
            ndvi, reasons = _compute(block, accumulator, reasons_dst is not None)
            clock.add("compute", time.perf_counter() - started)
            writes.append(writer.submit(_timed, clock, "write", env_options, lambda w=window, n=ndvi, r=reasons:
                                        write(w, n, r)))  # fmt: skip
            while len(writes) > _WRITE_BACKLOG:
                writes.popleft().result()
            if progress is not None:
                progress(_PASS1_END * done / len(windows))
        while writes:
            writes.popleft().result()


def _compute(
    block: _Block, accumulator: StatsAccumulator, want_reasons: bool
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8] | None]:
    """NDVI and pass-1 statistics of one window; the per-pixel reason codes when fields need them."""
    nodata = block.red_invalid
    nodata |= block.nir_invalid
    invalid = nodata
    masked = block.masked
    masked_count = 0
    if block.fill is not None and masked is not None:
        nodata |= block.fill
        masked &= ~nodata
        masked_count = int(np.count_nonzero(masked))
        invalid = nodata | masked
    nodata_count = int(np.count_nonzero(nodata))
    invalid_count = nodata_count + masked_count
    ndvi, bad = _ndvi(block.red, block.nir, invalid)
    zero_sum_count = int(np.count_nonzero(bad)) - invalid_count
    valid = ndvi[~bad] if invalid_count or zero_sum_count else ndvi.ravel()
    accumulator.add(valid, nodata_count, zero_sum_count, masked_count)
    reasons = None
    if want_reasons:
        reasons = np.zeros(ndvi.shape, dtype=np.uint8)
        reasons[bad] = REASON_ZERO_SUM  # then overwritten where the pixel was invalid for another reason
        reasons[nodata] = REASON_NODATA
        if masked is not None:
            reasons[masked] = REASON_MASKED
    return ndvi, reasons


def _build_overviews(stage: Path, levels: list[int], first_level_here: bool) -> None:
    """Average overviews for ``levels``; built on the uncompressed stage file, which the COG driver copies.

    About twice as fast as letting the COG driver build them (bench/README.md). When pass 1 wrote the
    first level into ``stage.tif.ovr``, only the further levels are built, from that file, as GDAL
    itself would (it computes each AVERAGE level from the previous one).
    """
    if not levels:
        return
    if first_level_here:
        further = [factor // 2 for factor in levels[1:]]
        if further:
            with rasterio.open(f"{stage}.ovr", "r+") as overview_ds:
                overview_ds.build_overviews(further, Resampling.average)
        return
    with rasterio.open(stage, "r+") as stage_ds:
        stage_ds.build_overviews(levels, Resampling.average)


def _reread_values(path: Path, windows: list[Window]) -> Iterator[npt.NDArray[np.float32]]:
    """Yield the written NDVI window by window, NaN included, for the statistics' second pass."""
    with rasterio.open(path) as src:
        for window in windows:
            yield src.read(1, window=window)


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
