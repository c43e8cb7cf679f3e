"""Streaming whole-scene statistics over NDVI windows, with an exact median in two passes.

Mean and population std are merged per window with Chan's parallel formula in float64 (a plain
sum-of-squares loses digits on tens of millions of pixels). The median is exact without holding the
scene in memory: pass 1 histograms the high 16 bits of an order-preserving integer key of each float32
value; pass 2 (over the written output) histograms the low 16 bits of the values in the one or two
bins holding the middle ranks. Memory is two 65,536-bin count arrays, whatever the scene size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_BINS = 1 << 16
_SIGN = np.uint32(0x80000000)


@dataclass(frozen=True, slots=True)
class SceneStats:
    """Whole-scene NDVI statistics; the float fields are None when no pixel is valid."""

    valid_count: int
    nodata_count: int
    zero_sum_count: int
    mean: float | None
    median: float | None
    std: float | None
    min: float | None
    max: float | None

    def to_dict(self) -> dict[str, int | float | None]:
        """Return the statistics as a JSON-serialisable dict."""
        return {
            "valid_count": self.valid_count,
            "nodata_count": self.nodata_count,
            "zero_sum_count": self.zero_sum_count,
            "mean": self.mean,
            "median": self.median,
            "std": self.std,
            "min": self.min,
            "max": self.max,
        }


def sortable_keys(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint32]:
    """Map finite float32 values to uint32 keys whose unsigned order is the numeric order."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    negative = (bits & _SIGN) != 0
    # Negative floats sort backwards by magnitude, so flip all their bits; positives just get the sign bit.
    return np.where(negative, ~bits, bits | _SIGN).astype(np.uint32)


def keys_to_float(keys: npt.NDArray[np.uint32]) -> npt.NDArray[np.float32]:
    """Invert :func:`sortable_keys`."""
    keys = np.asarray(keys, dtype=np.uint32)
    bits = np.where((keys & _SIGN) != 0, keys & ~_SIGN, ~keys).astype(np.uint32)
    return bits.view(np.float32)


class StatsAccumulator:
    """Accumulates counts, moments, extremes and the high-bits histogram window by window (pass 1)."""

    def __init__(self) -> None:
        """Start with empty counts."""
        self.valid_count = 0
        self.nodata_count = 0
        self.zero_sum_count = 0
        self._mean = 0.0
        self._m2 = 0.0
        self._min = np.inf
        self._max = -np.inf
        self._high = np.zeros(_BINS, dtype=np.int64)

    def add(self, valid: npt.NDArray[np.float32], nodata_count: int, zero_sum_count: int) -> None:
        """Add one window: its valid NDVI values (1-D, finite) and its invalid-pixel counts."""
        self.nodata_count += nodata_count
        self.zero_sum_count += zero_sum_count
        n_b = int(valid.size)
        if n_b == 0:
            return
        as64 = valid.astype(np.float64)
        mean_b = float(as64.mean())
        m2_b = float(((as64 - mean_b) ** 2).sum())
        n_a = self.valid_count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean += delta * n_b / n
        self._m2 += m2_b + delta * delta * n_a * n_b / n
        self.valid_count = n
        self._min = min(self._min, float(valid.min()))
        self._max = max(self._max, float(valid.max()))
        self._high += np.bincount(sortable_keys(valid) >> 16, minlength=_BINS)

    def _locate_middle(self) -> list[tuple[int, int]]:
        """(bin, rank inside that bin) of the lower and upper middle values."""
        if self.valid_count == 0:
            return []
        cumulative = np.cumsum(self._high)
        located: list[tuple[int, int]] = []
        for rank in ((self.valid_count - 1) // 2, self.valid_count // 2):
            bin_ = int(np.searchsorted(cumulative, rank, side="right"))
            before = int(cumulative[bin_ - 1]) if bin_ > 0 else 0
            located.append((bin_, rank - before))
        return located

    def finish(self, low_values: Iterable[npt.NDArray[np.float32]]) -> SceneStats:
        """Run pass 2 over ``low_values`` (valid NDVI values, window by window) and return the stats.

        ``low_values`` is only iterated when at least one pixel is valid.
        """
        if self.valid_count == 0:
            return SceneStats(0, self.nodata_count, self.zero_sum_count, None, None, None, None, None)
        located = self._locate_middle()
        wanted = sorted({bin_ for bin_, _ in located})
        low = {bin_: np.zeros(_BINS, dtype=np.int64) for bin_ in wanted}
        for values in low_values:
            keys = sortable_keys(values)
            high = keys >> 16
            for bin_ in wanted:
                picked = keys[high == bin_] & np.uint32(0xFFFF)
                low[bin_] += np.bincount(picked, minlength=_BINS)
        middle: list[float] = []
        for bin_, rank in located:
            low_bin = int(np.searchsorted(np.cumsum(low[bin_]), rank, side="right"))
            key = np.array([(bin_ << 16) | low_bin], dtype=np.uint32)
            middle.append(float(keys_to_float(key)[0]))
        return SceneStats(
            valid_count=self.valid_count,
            nodata_count=self.nodata_count,
            zero_sum_count=self.zero_sum_count,
            mean=self._mean,
            median=(middle[0] + middle[1]) / 2.0,
            std=float(np.sqrt(self._m2 / self.valid_count)),
            min=float(self._min),
            max=float(self._max),
        )
