"""Sample imagery shipped with the package: a Sentinel-2 L1C crop (B04/B08) and reference polygons."""

from __future__ import annotations

from pathlib import Path


def sample_dir() -> Path:
    """Return the folder holding the Sentinel-2 L1C sample (see PROVENANCE.md there)."""
    return Path(__file__).parent / "s2l1c"
