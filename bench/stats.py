"""Percentiles for the benchmarks: nearest rank, so a reported p99 is a latency that happened."""

import math
from collections.abc import Iterable


def pct(values: Iterable[float], q: float) -> float:
    """The `q` quantile (0 < q <= 1) of `values` by nearest rank; sorting a sorted list is cheap."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def pct_ms(latencies_ns: Iterable[int], q: float) -> float:
    """`pct` of nanosecond latencies, in milliseconds."""
    return pct(latencies_ns, q) / 1e6
