"""Benchmark run_ndvi on a synthetic full Sentinel-2 tile (10980 x 10980, two uint16 DEFLATE bands).

Usage::

    python bench/ndvi_bench.py [--size 10980] [--codecs zstd:1,zstd:3,deflate:1,deflate:6] [--keep]
                               [--threads ALL_CPUS] [--no-gdal-calc]

The tile is synthesized into a temporary directory outside the repository (smooth fields plus noise, so
it compresses like imagery rather than like white noise). Each engine configuration runs in its own
child process so its peak RSS (``resource.getrusage``) is its own. The output of ``gdal_calc.py``
(Debian gdal-bin / python3-gdal) followed by ``gdal_translate -of COG`` with the same options is timed
for comparison when those tools are on PATH. Nothing here asserts timings; it prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SCRIPT = Path(__file__).resolve()


def synthesize(directory: Path, size: int) -> tuple[Path, Path]:
    """Write red.tif and nir.tif (uint16 DN, DEFLATE, tiled 512) of ``size`` x ``size`` into ``directory``."""
    import numpy as np
    import rasterio
    from affine import Affine

    profile = {
        "driver": "GTiff",
        "dtype": "uint16",
        "count": 1,
        "width": size,
        "height": size,
        "crs": "EPSG:32633",
        "transform": Affine(10.0, 0.0, 300000.0, 0.0, -10.0, 5900040.0),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "predictor": 2,
        "nodata": 0,
        "NUM_THREADS": "ALL_CPUS",
    }
    rng = np.random.default_rng(42)
    cols = np.arange(size, dtype=np.float32)
    paths = (directory / "red.tif", directory / "nir.tif")
    with rasterio.open(paths[0], "w", **profile) as red_dst, rasterio.open(paths[1], "w", **profile) as nir_dst:
        for row in range(0, size, 512):
            rows = min(512, size - row)
            y = np.arange(row, row + rows, dtype=np.float32)[:, None]
            # Fields of ~1 km with vegetation varying smoothly, plus sensor-like noise.
            vegetation = 0.5 + 0.45 * np.sin(cols / 97.0)[None, :] * np.cos(y / 131.0)
            red = 600 + 1400 * (1 - vegetation) + rng.normal(0, 40, (rows, size))
            nir = 1500 + 3500 * vegetation + rng.normal(0, 60, (rows, size))
            red_u16 = np.clip(red, 1, 65535).astype(np.uint16)
            nir_u16 = np.clip(nir, 1, 65535).astype(np.uint16)
            red_u16[:, :64] = 0  # a nodata strip, as at a tile edge
            nir_u16[:, :64] = 0
            red_dst.write(red_u16, 1, window=((row, row + rows), (0, size)))
            nir_dst.write(nir_u16, 1, window=((row, row + rows), (0, size)))
    return paths


def run_engine(directory: Path, codec: str, level: int, threads: str) -> dict[str, object]:
    """Run run_ndvi once in this process and return timings, throughput, peak RSS and output size."""
    from eventflow.ndvi import BandSource, NdviParams, run_ndvi

    red, nir = directory / "red.tif", directory / "nir.tif"
    output = directory / f"ndvi-{codec}{level}.tif"
    params = NdviParams(
        red=BandSource(str(red), 1),
        nir=BandSource(str(nir), 1),
        compress=codec,  # type: ignore[arg-type]
        compress_level=level,
        num_threads=threads,
        max_pixels=11_000 * 11_000,
    )
    started = time.perf_counter()
    cpu_before = os.times()
    outcome = run_ndvi(params, output)
    cpu_after = os.times()
    seconds = time.perf_counter() - started
    input_mb = (outcome.width * outcome.height * 2 * 2) / 1e6  # two uint16 bands, decoded
    output_mb = outcome.width * outcome.height * 4 / 1e6  # float32, decoded
    t = outcome.timings
    # read / compute / write are busy seconds of the three pass-1 threads (they overlap, so they add up to
    # more than pass1); stats is pass 2, which runs beside the COG compression (cog is wall-clock).
    result = {
        "codec": f"{codec}:{level}",
        "seconds": round(seconds, 2),
        "read_s": round(t.get("read", 0.0), 2),
        "compute_s": round(t.get("compute", 0.0) + t.get("stats", 0.0), 2),
        "write_s": round(t.get("write", 0.0) + t.get("overviews", 0.0) + t.get("cog", 0.0), 2),
        "input_MBps": round(input_mb / seconds),
        "output_MBps": round(output_mb / seconds),
        "cpu_user_s": round(cpu_after.user - cpu_before.user, 2),
        "cpu_system_s": round(cpu_after.system - cpu_before.system, 2),
        "timings": {key: round(value, 3) for key, value in t.items()},
        "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "output_MB": round(output.stat().st_size / 1e6, 1),
        "valid_count": outcome.stats.valid_count,
        "mean": outcome.stats.mean,
    }
    output.unlink()
    return result


def run_gdal_calc(directory: Path, codec: str, level: int, threads: str) -> dict[str, object] | None:
    """Time gdal_calc.py (NaN nodata, float32) + gdal_translate -of COG with the engine's output options."""
    calc, translate = shutil.which("gdal_calc.py"), shutil.which("gdal_translate")
    if calc is None or translate is None:
        return None
    staged, output = directory / "calc-stage.tif", directory / "calc.tif"
    expression = (
        "numpy.where((A==0)|(B==0)|(A.astype(numpy.float32)+B==0), numpy.nan,"
        " (B.astype(numpy.float32)-A)/(B.astype(numpy.float32)+A))"
    )
    env = {**os.environ, "GDAL_NUM_THREADS": threads}
    started = time.perf_counter()
    subprocess.run(
        [calc, "--quiet", "-A", str(directory / "red.tif"), "-B", str(directory / "nir.tif"),
         f"--outfile={staged}", f"--calc={expression}", "--type=Float32", "--NoDataValue=nan",
         "--hideNoData", "--co=TILED=YES", "--co=BLOCKXSIZE=512", "--co=BLOCKYSIZE=512", "--overwrite"],
        check=True, env=env,
    )  # fmt: skip
    calc_s = time.perf_counter() - started
    subprocess.run(
        [translate, "-q", "-of", "COG", "-a_nodata", "nan", "-co", f"COMPRESS={codec.upper()}",
         "-co", f"LEVEL={level}", "-co", "PREDICTOR=YES", "-co", "BLOCKSIZE=512",
         "-co", "OVERVIEW_RESAMPLING=AVERAGE", "-co", f"NUM_THREADS={threads}", str(staged), str(output)],
        check=True, env=env,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    result = {
        "tool": "gdal_calc.py + gdal_translate -of COG",
        "codec": f"{codec}:{level}",
        "seconds": round(seconds, 2),
        "calc_s": round(calc_s, 2),
        "cog_s": round(seconds - calc_s, 2),
        "output_MB": round(output.stat().st_size / 1e6, 1),
    }
    staged.unlink()
    output.unlink()
    return result


def main() -> None:
    """Synthesize the tile, run each engine configuration in a child process, then gdal_calc.py."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10980)
    parser.add_argument("--codecs", default="zstd:1,zstd:3,deflate:1,deflate:6")
    parser.add_argument("--threads", default="ALL_CPUS")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--no-gdal-calc", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("DIR", "CODEC", "LEVEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        directory, codec, level = args.child
        print(json.dumps(run_engine(Path(directory), codec, int(level), args.threads)))
        return
    directory = Path(tempfile.mkdtemp(prefix="ndvi-bench-"))
    try:
        started = time.perf_counter()
        red, nir = synthesize(directory, args.size)
        size_mb = (red.stat().st_size + nir.stat().st_size) / 1e6
        print(f"synthesized {args.size}x{args.size} x2 uint16 DEFLATE ({size_mb:.0f} MB) in "
              f"{time.perf_counter() - started:.1f} s into {directory}")  # fmt: skip
        for spec in args.codecs.split(","):
            codec, level = spec.split(":")
            child = subprocess.run(
                [sys.executable, str(_SCRIPT), "--threads", args.threads, "--child", str(directory), codec, level],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            print("run_ndvi", child.stdout.strip().splitlines()[-1])
        if not args.no_gdal_calc:
            codec, level = args.codecs.split(",")[0].split(":")
            print("gdal_calc", json.dumps(run_gdal_calc(directory, codec, int(level), args.threads)))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
