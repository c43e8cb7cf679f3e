"""PNG previews of an NDVI raster: red-yellow-green ramp, absolute (-1..1) and relative (p2-p98) stretches.

Previews are RGBA PNGs at most ``PREVIEW_MAX_PX`` on the long side, read from the COG's overviews
with average resampling; nodata is fully transparent.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning

#: Long side of a preview, in pixels (smaller rasters keep their size).
PREVIEW_MAX_PX = 1024

# ColorBrewer RdYlGn end and middle colours: red at the low end, pale yellow in the middle, green high.
_RAMP_POSITIONS = np.array([0.0, 0.5, 1.0])
_RAMP_COLOURS = np.array([[215, 48, 39], [255, 255, 191], [26, 152, 80]], dtype=np.float64)


def colourize(ndvi: npt.NDArray[np.float32], low: float, high: float) -> npt.NDArray[np.uint8]:
    """Map NDVI to RGBA (4, rows, cols): ``low`` -> red, ``high`` -> green, NaN -> transparent."""
    span = high - low if high > low else 1.0
    position = np.clip((ndvi.astype(np.float64) - low) / span, 0.0, 1.0)
    nan = np.isnan(ndvi)
    position[nan] = 0.0
    rgba = np.zeros((4, *ndvi.shape), dtype=np.uint8)
    for channel in range(3):
        rgba[channel] = np.rint(np.interp(position, _RAMP_POSITIONS, _RAMP_COLOURS[:, channel])).astype(np.uint8)
    rgba[3] = np.where(nan, 0, 255).astype(np.uint8)
    rgba[:3, nan] = 0
    return rgba


def _write_png(path: Path, rgba: npt.NDArray[np.uint8]) -> None:
    _, height, width = rgba.shape
    with warnings.catch_warnings():
        # A preview is a plain picture: no georeferencing is intended.
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        _write_png_file(path, rgba, width, height)


def _write_png_file(path: Path, rgba: npt.NDArray[np.uint8], width: int, height: int) -> None:
    with rasterio.open(path, "w", driver="PNG", dtype="uint8", count=4, width=width, height=height) as dst:
        dst.write(rgba)


def write_previews(ndvi_path: Path, stem: Path, p2: float | None, p98: float | None) -> dict[str, str]:
    """Write ``<stem>.abs.png`` and ``<stem>.rel.png``; return {"absolute": path, "relative": path}."""
    with rasterio.open(ndvi_path) as src:
        factor = max(1.0, max(src.width, src.height) / PREVIEW_MAX_PX)
        shape = (max(1, round(src.height / factor)), max(1, round(src.width / factor)))
        ndvi = src.read(1, out_shape=shape, resampling=Resampling.average)
    absolute = stem.with_name(stem.name + ".abs.png")
    relative = stem.with_name(stem.name + ".rel.png")
    _write_png(absolute, colourize(ndvi, -1.0, 1.0))
    low, high = (p2, p98) if p2 is not None and p98 is not None else (-1.0, 1.0)
    _write_png(relative, colourize(ndvi, low, high))
    for path in (absolute, relative):
        # GDAL's PNG CreateCopy may leave a PAM sidecar; previews are plain images.
        path.with_name(path.name + ".aux.xml").unlink(missing_ok=True)
    return {"absolute": str(absolute), "relative": str(relative)}
