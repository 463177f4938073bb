"""Robust summaries of timing samples: median, percentiles, distribution-free CI of the median."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binom


def median_ci(samples: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free CI of the median from order statistics.

    The number of samples below the true median is Binomial(n, 1/2), so the order
    statistics x_(k) and x_(n+1-k) bracket it with probability 1 - 2 * P(B <= k-1).
    We take the largest k whose coverage is still >= ``confidence`` (same interval
    as ``scipy.stats.quantile_test(...).confidence_interval``, but without the full
    sort and p-value that function computes: this runs inside the adaptive timing loop).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(samples, dtype=np.float64)
    n = x.size
    if n == 0:
        raise ValueError("median_ci needs at least one sample")
    # 1-based rank k = ppf(tail) is the smallest k with P(B <= k) >= tail, so P(B <= k-1) < tail.
    lo = int(binom.ppf((1.0 - confidence) / 2.0, n, 0.5)) - 1
    if lo < 0:
        # Too few samples for this confidence (e.g. n=5: even [min, max] covers only
        # 1 - 2/32 = 93.75% < 95%). [min, max] is the widest interval the data can give,
        # so return it rather than NaN (which is what scipy's quantile_test returns).
        return float(x.min()), float(x.max())
    hi = n - 1 - lo
    part = np.partition(x, (lo, hi))
    return float(part[lo]), float(part[hi])


def summarize(samples_ms: Sequence[float]) -> dict:
    """Median, 20th/80th percentiles and the 95% median CI of timing samples in milliseconds."""
    x = np.asarray(samples_ms, dtype=np.float64)
    p20, median, p80 = np.percentile(x, (20.0, 50.0, 80.0))
    ci_low, ci_high = median_ci(x)
    return {
        "time_median_ms": float(median),
        "time_p20_ms": float(p20),
        "time_p80_ms": float(p80),
        "time_ci_low_ms": ci_low,
        "time_ci_high_ms": ci_high,
        "samples": int(x.size),
    }
