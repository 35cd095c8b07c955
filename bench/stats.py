"""Percentiles of raw samples and of the services' loop-lag histograms."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50": round(percentile(values, 50), digits),
        "p90": round(percentile(values, 90), digits),
        "p99": round(percentile(values, 99), digits),
        "max": round(max(values), digits) if values else math.nan,
        "mean": round(sum(values) / len(values), digits) if values else math.nan,
    }


def read_lag(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def lag_window(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """Loop lag over the window between two snapshots of one process's histogram (ms, bucket upper edges)."""
    if after is None:
        return {"samples": 0, "p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    counts = list(after["counts"])
    if before is not None and before.get("pid") == after.get("pid"):
        counts = [a - b for a, b in zip(counts, before["counts"], strict=True)]
    edges = [*list(after["edges_ms"]), math.inf]
    total = sum(counts)

    def quantile(q: float) -> float:
        if total == 0:
            return math.nan
        rank = q * total
        seen = 0
        for edge, count in zip(edges, counts, strict=True):
            seen += count
            if seen >= rank:
                return float(edge)
        return math.inf

    largest = max((edge for edge, count in zip(edges, counts, strict=True) if count), default=math.nan)
    return {
        "samples": total,
        "p50_ms": quantile(0.50),
        "p99_ms": quantile(0.99),
        # The bucket edge of the slowest sample in the window (the exact max is only kept since start).
        "max_bucket_ms": largest,
        "max_since_start_ms": after.get("max_ms"),
    }


def finite_positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
