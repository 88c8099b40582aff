"""Measure what each background service costs its neighbours (psutil, a lag probe, request latency).

.. versionadded:: 0.1
"""

from __future__ import annotations

from ._latency import LatencyMiddleware, LatencyRecorder
from ._monitor import ContentionMonitor, ContentionSnapshot, advise, snapshot_path
from ._probe import LagProbe

__all__ = [
    "ContentionMonitor",
    "ContentionSnapshot",
    "LagProbe",
    "LatencyMiddleware",
    "LatencyRecorder",
    "advise",
    "snapshot_path",
]
