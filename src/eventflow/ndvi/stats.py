"""NDVI statistics: streaming whole-scene stats with exact quantiles in two passes, and exact small-array stats.

Mean and population std are merged per window with Chan's parallel formula in float64 (a plain
sum-of-squares loses digits on tens of millions of pixels). Quantiles (the median, p10/p25/p75/p90 and
any extra ones) are exact without holding the scene in memory: pass 1 histograms the high 16 bits of an
order-preserving integer key of each float32 value; pass 2 (over the written output) histograms the low
16 bits of the values in the few bins holding the wanted ranks. Memory is one 65,536-bin count array
plus one per wanted bin, whatever the scene size.

Quantiles follow numpy's default ("linear") definition: rank q * (n - 1), interpolated between the two
neighbouring order statistics, so they equal ``np.quantile`` on the written float32 values. The
histogram has ``HISTOGRAM_BINS`` equal bins over [-1, 1] (``np.histogram`` semantics: the last bin
includes 1.0) on the float32 values, so its edges are float32 too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

_BINS = 1 << 16
_SIGN = np.uint32(0x80000000)

#: Number of equal histogram bins over [-1, 1].
HISTOGRAM_BINS = 20
#: The reported quantiles besides the median, as (field name, fraction).
QUANTILES: tuple[tuple[str, float], ...] = (("p10", 0.10), ("p25", 0.25), ("p75", 0.75), ("p90", 0.90))
#: Default NDVI threshold of the vegetation fraction.
DEFAULT_VEGETATION_THRESHOLD = 0.3


def histogram_edges() -> list[float]:
    """Return the ``HISTOGRAM_BINS + 1`` bin edges over [-1, 1], as float32 (what np.histogram uses on float32)."""
    return [float(edge) for edge in np.linspace(-1.0, 1.0, HISTOGRAM_BINS + 1, dtype=np.float32)]


@dataclass(frozen=True, slots=True)
class SceneStats:
    """Whole-scene (or per-field) NDVI statistics; the float fields are None when no pixel is valid.

    ``nodata_count`` covers input nodata, NaN, masks and quality-band fill; ``masked_count`` the pixels a
    quality band rejects (cloud, shadow, snow...); ``zero_sum_count`` the pixels with red + NIR == 0.
    Each invalid pixel is counted once, in that order of precedence.
    """

    valid_count: int
    nodata_count: int
    zero_sum_count: int
    mean: float | None
    median: float | None
    std: float | None
    min: float | None
    max: float | None
    masked_count: int = 0
    p10: float | None = None
    p25: float | None = None
    p75: float | None = None
    p90: float | None = None
    #: Counts per bin over [-1, 1] (see histogram_edges()); all zeros when no pixel is valid.
    histogram: tuple[int, ...] = field(default=(0,) * HISTOGRAM_BINS)
    vegetation_threshold: float = DEFAULT_VEGETATION_THRESHOLD
    #: Share of valid pixels with NDVI >= vegetation_threshold; None when no pixel is valid.
    vegetation_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the statistics as a JSON-serialisable dict."""
        return {
            "valid_count": self.valid_count,
            "nodata_count": self.nodata_count,
            "zero_sum_count": self.zero_sum_count,
            "masked_count": self.masked_count,
            "mean": self.mean,
            "median": self.median,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "p10": self.p10,
            "p25": self.p25,
            "p75": self.p75,
            "p90": self.p90,
            "histogram": {"edges": histogram_edges(), "counts": list(self.histogram)},
            "vegetation_threshold": self.vegetation_threshold,
            "vegetation_fraction": self.vegetation_fraction,
        }


def sortable_keys(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint32]:
    """Map finite float32 values to uint32 keys whose unsigned order is the numeric order."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # Negative floats sort backwards by magnitude, so flip all their bits; positives just get the sign bit.
    # mask is all ones for negatives and just the sign bit for positives: (bits >> 31) * 0x7FFFFFFF | sign.
    mask = (bits >> np.uint32(31)) * np.uint32(0x7FFFFFFF)
    mask |= _SIGN
    mask ^= bits
    return mask


def keys_to_float(keys: npt.NDArray[np.uint32]) -> npt.NDArray[np.float32]:
    """Invert :func:`sortable_keys`."""
    keys = np.asarray(keys, dtype=np.uint32)
    bits = np.where((keys & _SIGN) != 0, keys & ~_SIGN, ~keys).astype(np.uint32)
    return bits.view(np.float32)


def _histogram(values: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    counts, _ = np.histogram(values, bins=HISTOGRAM_BINS, range=(-1.0, 1.0))
    return counts.astype(np.int64)


def _ranks(count: int, fraction: float) -> tuple[int, int, float]:
    """(lower rank, upper rank, weight of the upper) of numpy's linear quantile."""
    position = fraction * (count - 1)
    lower = math.floor(position)
    return lower, min(lower + 1, count - 1), position - lower


class StatsAccumulator:
    """Accumulates counts, moments, extremes and histograms window by window (pass 1)."""

    def __init__(
        self,
        vegetation_threshold: float = DEFAULT_VEGETATION_THRESHOLD,
        extra_quantiles: Sequence[float] = (),
    ) -> None:
        """Start with empty counts; ``extra_quantiles`` are computed too and left in ``self.quantiles``."""
        self.vegetation_threshold = float(vegetation_threshold)
        self.valid_count = 0
        self.nodata_count = 0
        self.zero_sum_count = 0
        self.masked_count = 0
        self.vegetation_count = 0
        self._fractions = sorted({0.5, *(q for _, q in QUANTILES), *extra_quantiles})
        #: fraction -> exact quantile, filled by finish().
        self.quantiles: dict[float, float] = {}
        self._mean = 0.0
        self._m2 = 0.0
        self._min = np.inf
        self._max = -np.inf
        self._high = np.zeros(_BINS, dtype=np.int64)
        self._histogram = np.zeros(HISTOGRAM_BINS, dtype=np.int64)

    def add(
        self, valid: npt.NDArray[np.float32], nodata_count: int, zero_sum_count: int, masked_count: int = 0
    ) -> None:
        """Add one window: its valid NDVI values (1-D, finite) and its invalid-pixel counts."""
        self.nodata_count += nodata_count
        self.zero_sum_count += zero_sum_count
        self.masked_count += masked_count
        n_b = int(valid.size)
        if n_b == 0:
            return
        mean_b = float(valid.mean(dtype=np.float64))
        centred = valid.astype(np.float64)
        centred -= mean_b
        m2_b = float(np.dot(centred, centred))
        n_a = self.valid_count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean += delta * n_b / n
        self._m2 += m2_b + delta * delta * n_a * n_b / n
        self.valid_count = n
        self._min = min(self._min, float(valid.min()))
        self._max = max(self._max, float(valid.max()))
        self.vegetation_count += int(np.count_nonzero(valid >= np.float32(self.vegetation_threshold)))
        self._histogram += _histogram(valid)
        self._high += np.bincount(sortable_keys(valid) >> np.uint32(16), minlength=_BINS)

    def _locate(self, rank: int, cumulative: npt.NDArray[np.int64]) -> tuple[int, int]:
        """(high bin, rank inside that bin) of the value with 0-based ``rank``."""
        bin_ = int(np.searchsorted(cumulative, rank, side="right"))
        before = int(cumulative[bin_ - 1]) if bin_ > 0 else 0
        return bin_, rank - before

    def finish(self, low_values: Iterable[npt.NDArray[np.float32]]) -> SceneStats:
        """Run pass 2 over ``low_values`` (valid NDVI values, window by window) and return the stats.

        ``low_values`` is only iterated when at least one pixel is valid.
        """
        if self.valid_count == 0:
            return SceneStats(
                0, self.nodata_count, self.zero_sum_count, None, None, None, None, None,
                masked_count=self.masked_count, vegetation_threshold=self.vegetation_threshold,
            )  # fmt: skip
        cumulative = np.cumsum(self._high)
        wanted_ranks = sorted({r for q in self._fractions for r in _ranks(self.valid_count, q)[:2]})
        located = {rank: self._locate(rank, cumulative) for rank in wanted_ranks}
        wanted = sorted({bin_ for bin_, _ in located.values()})
        # Lookup table high bin -> slot, so one bincount per window covers every wanted bin.
        slot_of = np.full(_BINS, -1, dtype=np.int64)
        slot_of[wanted] = np.arange(len(wanted))
        low = np.zeros(len(wanted) * _BINS, dtype=np.int64)
        for values in low_values:
            keys = sortable_keys(values)
            slots = slot_of[keys >> np.uint32(16)]
            picked = slots >= 0
            flat = slots[picked] * _BINS + (keys[picked] & np.uint32(0xFFFF))
            low += np.bincount(flat, minlength=low.size)
        low_cumulative = {bin_: np.cumsum(low[slot * _BINS : (slot + 1) * _BINS]) for slot, bin_ in enumerate(wanted)}
        value_at: dict[int, float] = {}
        for rank, (bin_, inner) in located.items():
            low_bin = int(np.searchsorted(low_cumulative[bin_], inner, side="right"))
            key = np.array([(bin_ << 16) | low_bin], dtype=np.uint32)
            value_at[rank] = float(keys_to_float(key)[0])
        for fraction in self._fractions:
            lower, upper, weight = _ranks(self.valid_count, fraction)
            self.quantiles[fraction] = _interpolate(value_at[lower], value_at[upper], weight)
        return SceneStats(
            valid_count=self.valid_count,
            nodata_count=self.nodata_count,
            zero_sum_count=self.zero_sum_count,
            mean=self._mean,
            median=self.quantiles[0.5],
            std=float(np.sqrt(self._m2 / self.valid_count)),
            min=float(self._min),
            max=float(self._max),
            masked_count=self.masked_count,
            **{name: self.quantiles[q] for name, q in QUANTILES},
            histogram=tuple(int(c) for c in self._histogram),
            vegetation_threshold=self.vegetation_threshold,
            vegetation_fraction=self.vegetation_count / self.valid_count,
        )


def _interpolate(lower: float, upper: float, weight: float) -> float:
    # numpy's linear method (its _lerp), and (a + b) / 2 for the median of an even count like np.median.
    if weight == 0.5:
        return (lower + upper) / 2.0
    diff = upper - lower
    return upper - diff * (1.0 - weight) if weight >= 0.5 else lower + diff * weight


def exact_stats(
    values: npt.NDArray[np.float32],
    nodata_count: int,
    zero_sum_count: int,
    masked_count: int,
    vegetation_threshold: float = DEFAULT_VEGETATION_THRESHOLD,
) -> SceneStats:
    """Statistics of a small in-memory set of valid NDVI values (a field), same definitions as the scene's."""
    accumulator = StatsAccumulator(vegetation_threshold)
    accumulator.add(values, nodata_count, zero_sum_count, masked_count)
    return accumulator.finish([values])
