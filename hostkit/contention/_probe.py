"""The scheduling-lag probe: how late does a 1 ms sleep wake up?

A thread asleep in ``time.sleep(0.001)`` needs the GIL back to run again. When a
CPU-bound thread holds it, the wake-up waits for the switch interval (5 ms by
default) or longer; lateness is therefore a direct reading of GIL pressure,
independent of request traffic.

Kept light on purpose: a 1 ms loop running forever changes what it measures
(each wake-up forces a GIL hand-off, which helps the request threads). The probe
takes sparse bursts: ``samples`` sleeps every ``interval`` seconds.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

from .._validate import positive_int, to_seconds
from ..exceptions import HostStateError
from ._stats import WindowedSamples

__all__ = ["LagProbe"]


class LagProbe:
    """Measures how late a 1 ms sleep wakes, in bursts, on its own thread.

    Args:
        interval: seconds between bursts.
        samples: sleeps per burst.
        window: seconds of history the summary covers.

    .. versionadded:: 0.1
    """

    SLEEP = 0.001

    def __init__(self, *, interval: float | timedelta = 1.0, samples: int = 10, window: float = 30.0) -> None:
        self.interval = to_seconds(interval, "interval", allow_zero=False)
        self.samples = positive_int(samples, "samples")
        self.lateness = WindowedSamples(window)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Native id of the probe's thread (to subtract its own CPU).
        self.native_id: int | None = None
        #: CPU seconds the probe's thread has used (``time.thread_time``: ns resolution).
        self.cpu_seconds = 0.0

    def start(self) -> None:
        """Start the probe thread."""
        if self._thread is not None:
            msg = "LagProbe.start() was called twice; a probe starts once"
            raise HostStateError(msg)
        self._thread = threading.Thread(target=self._run, name="hostkit-lag-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop and join the probe thread (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def burst(self) -> None:
        """Take one burst of samples now, on the calling thread."""
        for _ in range(self.samples):
            t0 = time.perf_counter()
            time.sleep(self.SLEEP)
            self.lateness.add(max(time.perf_counter() - t0 - self.SLEEP, 0.0))

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        while not self._stop.is_set():
            began = time.thread_time()
            self.burst()
            self.cpu_seconds += time.thread_time() - began
            self._stop.wait(self.interval)

    def summary(self) -> dict[str, Any]:
        """Lateness in milliseconds over the window: ``count``, ``p50``, ``p90``, ``p99``, ``p999``, ``max``."""
        return self.lateness.summary(scale=1000.0)

    def __enter__(self) -> LagProbe:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        s = self.summary()
        return f"<LagProbe samples={s['count']} p99={s['p99']} ms>"
