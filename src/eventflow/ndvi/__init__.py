"""Pure NDVI engine (no Redis, no HTTP): read red and NIR, compute block-wise, write GeoTIFF, report stats."""

from eventflow.ndvi.engine import BandSource, NdviOutcome, NdviParams, reference_ndvi, run_ndvi
from eventflow.ndvi.stats import SceneStats

__all__ = ["BandSource", "NdviOutcome", "NdviParams", "SceneStats", "reference_ndvi", "run_ndvi"]
