"""Percentiles over a time window, shared by the lag probe and the latency recorder."""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Any

__all__ = ["WindowedSamples", "percentile"]


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0-100) of an ascending list; NaN if empty."""
    if not sorted_values:
        return math.nan
    rank = max(math.ceil(q / 100.0 * len(sorted_values)), 1)
    return sorted_values[min(rank, len(sorted_values)) - 1]


class WindowedSamples:
    """Values recorded over the last ``window`` seconds (thread-safe, bounded)."""

    def __init__(self, window: float, *, maxlen: int = 100_000) -> None:
        self.window = window
        self._values: collections.deque[tuple[float, float]] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.total = 0

    def add(self, value: float, now: float | None = None) -> None:
        # deque.append is atomic, but the count and the trim must agree: one lock.
        with self._lock:
            self._values.append((time.monotonic() if now is None else now, value))
            self.total += 1

    def values(self) -> list[float]:
        cutoff = time.monotonic() - self.window
        with self._lock:
            while self._values and self._values[0][0] < cutoff:
                self._values.popleft()
            return [v for _, v in self._values]

    def summary(self, scale: float = 1.0) -> dict[str, Any]:
        """``count``, ``p50``, ``p90``, ``p99``, ``p999``, ``max`` over the window (values times ``scale``)."""
        data = sorted(self.values())
        out: dict[str, Any] = {"count": len(data)}
        for key, q in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9)):
            v = percentile(data, q)
            out[key] = None if math.isnan(v) else round(v * scale, 3)
        out["max"] = round(data[-1] * scale, 3) if data else None
        return out
