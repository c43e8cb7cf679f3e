"""NDVI statistics: streaming whole-scene stats with exact quantiles in two passes, and exact small-array stats.

Mean and population std are merged per window with Chan's parallel formula in float64 (one
sum-of-squares over the scene would lose digits on tens of millions of pixels; within a window of a
few million values in [-1, 1] it is exact to ~1e-14). Everything order-based is exact without
holding the scene in memory: pass 1 histograms the high 16 bits of an order-preserving integer key of
each float32 value; pass 2 (over the written output) histograms the low 16 bits of the values in the
few high bins that matter. Those are the bins holding the wanted ranks (the median, p10/p25/p75/p90,
any extra quantiles, and ranks 0 and n - 1, i.e. min and max) and the bins holding a histogram edge or
the vegetation threshold, where the count of values at or above the boundary needs the low bits.
Memory is one 65,536-bin count array plus one per wanted bin, whatever the scene size; pass 1 costs one
key computation and one bincount per value (np.histogram and separate min/max/threshold passes cost
about as much again, which is why they are derived from the keys instead).

Quantiles follow numpy's default ("linear") definition: rank q * (n - 1), interpolated between the two
neighbouring order statistics, so they equal ``np.quantile`` on the written float32 values. The
histogram has ``HISTOGRAM_BINS`` equal bins over [-1, 1] with ``np.histogram`` semantics on the float32
values (edges are float32, each bin is [edge, next edge), the last one includes 1.0, values outside
[-1, 1] are not counted), and the vegetation fraction counts values ``>= np.float32(threshold)``.
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
_LITTLE_ENDIAN = np.little_endian
# bincount and take first convert their index array to intp (8 bytes per value). On a whole window that
# is a 45 MB temporary, which glibc maps and unmaps on every call (a page fault per 4 kB); 1 M-value
# chunks reuse heap memory instead (measured: ~0.5 s less system time per Sentinel-2 tile).
_CHUNK = 1 << 20

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


def high_keys(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """The high 16 bits of :func:`sortable_keys` (flattened), computed on the high halves of the floats only.

    Half the memory traffic of the full keys, and bincount / take convert a uint16 index array to their
    index type about twice as fast as a uint32 one.
    """
    halves = np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint16)
    high = halves[1::2] if _LITTLE_ENDIAN else halves[0::2]
    mask = (high >> np.uint16(15)) * np.uint16(0x7FFF)
    mask |= np.uint16(0x8000)
    mask ^= high
    return mask


def keys_to_float(keys: npt.NDArray[np.uint32]) -> npt.NDArray[np.float32]:
    """Invert :func:`sortable_keys`."""
    keys = np.asarray(keys, dtype=np.uint32)
    bits = np.where((keys & _SIGN) != 0, keys & ~_SIGN, ~keys).astype(np.uint32)
    return bits.view(np.float32)


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
        self._fractions = sorted({0.5, *(q for _, q in QUANTILES), *extra_quantiles})
        #: fraction -> exact quantile, filled by finish().
        self.quantiles: dict[float, float] = {}
        self._mean = 0.0
        self._m2 = 0.0
        self._high = np.zeros(_BINS, dtype=np.int64)

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
        total_b = float(valid.sum(dtype=np.float64))
        mean_b = total_b / n_b
        # Within one window the sum of squares in float64 is exact to ~1e-14 relative for values in
        # [-1, 1], and einsum casts in small buffers instead of allocating a float64 copy of the window.
        squares_b = float(np.einsum("i,i->", valid, valid, dtype=np.float64))
        m2_b = max(squares_b - total_b * mean_b, 0.0)
        n_a = self.valid_count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean += delta * n_b / n
        self._m2 += m2_b + delta * delta * n_a * n_b / n
        self.valid_count = n
        high = high_keys(valid)
        for start in range(0, high.size, _CHUNK):
            self._high += np.bincount(high[start : start + _CHUNK], minlength=_BINS)

    def _locate(self, rank: int, cumulative: npt.NDArray[np.int64]) -> tuple[int, int]:
        """(high bin, rank inside that bin) of the value with 0-based ``rank``."""
        bin_ = int(np.searchsorted(cumulative, rank, side="right"))
        before = int(cumulative[bin_ - 1]) if bin_ > 0 else 0
        return bin_, rank - before

    def _boundaries(self) -> list[int]:
        """Keys K whose ``count(key >= K)`` the histogram and the vegetation fraction are made of."""
        edges = [_key_of(edge) for edge in histogram_edges()]
        # Bins are [edge, next edge); the last one ends at 1.0 inclusive, i.e. before the key after 1.0.
        edges[-1] += 1
        return [*edges, _key_of(self.vegetation_threshold)]

    def finish(self, low_values: Iterable[npt.NDArray[np.float32]]) -> SceneStats:
        """Run pass 2 over ``low_values`` (valid NDVI values, window by window) and return the stats.

        ``low_values`` is only iterated when at least one pixel is valid.
        """
        if self.valid_count == 0:
            return SceneStats(
                0, self.nodata_count, self.zero_sum_count, None, None, None, None, None,
                masked_count=self.masked_count, vegetation_threshold=self.vegetation_threshold,
            )  # fmt: skip
        n = self.valid_count
        cumulative = np.cumsum(self._high)
        wanted_ranks = sorted({0, n - 1, *(r for q in self._fractions for r in _ranks(n, q)[:2])})
        located = {rank: self._locate(rank, cumulative) for rank in wanted_ranks}
        boundaries = self._boundaries()
        wanted = sorted(
            {bin_ for bin_, _ in located.values()}
            | {key >> 16 for key in boundaries if key >> 16 < _BINS and self._high[key >> 16]}
        )
        low = _low_histograms(low_values, wanted)
        low_cumulative = {bin_: np.cumsum(low[slot]) for slot, bin_ in enumerate(wanted)}
        value_at: dict[int, float] = {}
        for rank, (bin_, inner) in located.items():
            low_bin = int(np.searchsorted(low_cumulative[bin_], inner, side="right"))
            key = np.array([(bin_ << 16) | low_bin], dtype=np.uint32)
            value_at[rank] = float(keys_to_float(key)[0])

        def at_or_above(key: int) -> int:
            high_bin, low_bin = key >> 16, key & 0xFFFF
            if high_bin >= _BINS:
                return 0
            above = n - int(cumulative[high_bin])
            if high_bin not in low_cumulative:  # an empty high bin
                return above
            inside = low_cumulative[high_bin]
            return above + int(inside[-1]) - (int(inside[low_bin - 1]) if low_bin else 0)

        counts = [at_or_above(key) for key in boundaries]
        *edge_counts, vegetation_count = counts
        histogram = tuple(edge_counts[i] - edge_counts[i + 1] for i in range(HISTOGRAM_BINS))
        for fraction in self._fractions:
            lower, upper, weight = _ranks(n, fraction)
            self.quantiles[fraction] = _interpolate(value_at[lower], value_at[upper], weight)
        return SceneStats(
            valid_count=n,
            nodata_count=self.nodata_count,
            zero_sum_count=self.zero_sum_count,
            mean=self._mean,
            median=self.quantiles[0.5],
            std=float(np.sqrt(self._m2 / n)),
            min=value_at[0],
            max=value_at[n - 1],
            masked_count=self.masked_count,
            **{name: self.quantiles[q] for name, q in QUANTILES},
            histogram=histogram,
            vegetation_threshold=self.vegetation_threshold,
            vegetation_fraction=vegetation_count / n,
        )


def _key_of(value: float) -> int:
    """The smallest key of a float32 value ``>= value`` as float32 compares it (-0.0 and 0.0 are equal)."""
    as_float32 = np.float32(value)
    # -0.0 has the smaller key, and np.float32 comparisons treat it as equal to 0.0.
    if as_float32 == 0:
        as_float32 = np.float32(-0.0)
    return int(sortable_keys(np.array([as_float32], dtype=np.float32))[0])


def _low_histograms(low_values: Iterable[npt.NDArray[np.float32]], wanted: list[int]) -> npt.NDArray[np.int64]:
    """Pass 2: per wanted high bin (in order), the counts of the low 16 bits of the values falling in it.

    NaN may be left in ``low_values``: its keys fall outside [key(-1), key(1)], in no wanted bin.
    """
    # int16 lookup table high bin -> slot (-1 for the others): 128 kB, cache-resident, one np.take per window.
    slot_of = np.full(_BINS, -1, dtype=np.int16)
    slot_of[wanted] = np.arange(len(wanted), dtype=np.int16)
    low = np.zeros(len(wanted) * _BINS, dtype=np.int64)
    for values in low_values:
        high = high_keys(values)
        slots = np.empty(high.size, dtype=np.int16)
        for start in range(0, high.size, _CHUNK):
            np.take(slot_of, high[start : start + _CHUNK], out=slots[start : start + _CHUNK])
        picked = np.flatnonzero(slots >= 0)
        if picked.size == 0:
            continue
        flat = slots[picked].astype(np.int64)
        flat *= _BINS
        flat += sortable_keys(values.ravel()[picked]) & np.uint32(0xFFFF)
        low += np.bincount(flat, minlength=low.size)
    return low.reshape(len(wanted), _BINS)


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
