"""Quality-band rules: which Sentinel-2 SCL classes, Landsat QA_PIXEL bits and Fmask codes reject a pixel.

Each rule splits a quality band into *fill* (counted as nodata) and *masked* (counted as masked, e.g.
cloud, shadow, snow). Everything else is kept.

- ``scl`` (Sentinel-2 L2A scene classification): fill 0 (NO_DATA); masked 1 saturated/defective,
  2 dark area/topographic shadow, 3 cloud shadow, 7 unclassified, 8/9 cloud medium/high probability,
  10 thin cirrus, 11 snow/ice; kept 4 vegetation, 5 bare soil, 6 water.
- ``qa_pixel`` (Landsat Collection 2 QA_PIXEL): fill bit 0; masked bits 1 dilated cloud, 2 cirrus,
  3 cloud, 4 cloud shadow, 5 snow.
- ``fmask`` (Fmask codes): fill 255; masked 2 shadow, 3 snow, 4 cloud; kept 0 clear, 1 water.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

QaKind = Literal["scl", "qa_pixel", "fmask"]

_SCL_FILL = (0,)
_SCL_MASKED = (1, 2, 3, 7, 8, 9, 10, 11)
_QA_PIXEL_FILL_BITS = 1 << 0
_QA_PIXEL_MASKED_BITS = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5)
_FMASK_FILL = (255,)
_FMASK_MASKED = (2, 3, 4)

#: Human-readable rule per kind, written into the output tags.
MASK_RULES: dict[str, str] = {
    "scl": "SCL: fill 0; masked 1,2,3,7,8,9,10,11; kept 4,5,6",
    "qa_pixel": "QA_PIXEL: fill bit 0; masked bits 1 dilated cloud,2 cirrus,3 cloud,4 shadow,5 snow",
    "fmask": "Fmask: fill 255; masked 2 shadow,3 snow,4 cloud; kept 0 clear,1 water",
}


def classify(qa: npt.NDArray[np.integer], kind: QaKind) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Return (fill, masked) boolean arrays for a window of quality-band values; they never overlap."""
    if kind == "qa_pixel":
        values = qa.astype(np.int64, copy=False)
        fill = (values & _QA_PIXEL_FILL_BITS) != 0
        masked = ((values & _QA_PIXEL_MASKED_BITS) != 0) & ~fill
        return fill, masked
    if kind == "scl":
        fill_codes, masked_codes = _SCL_FILL, _SCL_MASKED
    elif kind == "fmask":
        fill_codes, masked_codes = _FMASK_FILL, _FMASK_MASKED
    else:  # pragma: no cover - guarded by NdviParams validation
        raise ValueError(f"unknown quality band kind {kind!r}")
    return np.isin(qa, fill_codes), np.isin(qa, masked_codes)
