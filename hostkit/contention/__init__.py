"""Measure what each background service costs its neighbours (psutil, a lag probe, request latency).

Data flow::

    ContentionMonitor thread (every interval)
      psutil: per service, CPU time of its thread (native id) or its child process, RSS,
              context switches; for the process: CPU, threads
      LagProbe (sparse bursts of 1 ms sleeps): how late the interpreter wakes up -> GIL pressure
      LatencyRecorder <- LatencyMiddleware (WSGI): request latency
        -> ContentionSnapshot -> advise() (e.g. "move X to placement='process'")
        -> log line, /metrics, and a 0600 snapshot file in the private runtime dir -> `hostkit top`

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
