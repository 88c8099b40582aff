"""PeriodicTimer: a fixed-rate tick for loops, without drift, that wakes at once on cancel."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import cast

from ._token import CancellationToken
from ._validate import describe, to_seconds
from .exceptions import ConfigurationTypeError

__all__ = ["PeriodicTimer"]


class PeriodicTimer:
    """Ticks every ``interval`` seconds, measured from the first tick, not from the last.

    Ticks are scheduled at ``start + n * interval``, so the time the loop body
    takes does not accumulate as drift. A body that overruns one or more ticks
    skips them (no burst of catch-up ticks); :attr:`missed` counts them.
    Iterating stops, at once, when ``token`` is cancelled::

        def execute(self, stopping):
            for _ in PeriodicTimer(5.0, stopping):
                self.flush()

    Args:
        interval: seconds (or a timedelta) between ticks; must be > 0.
        token: the cancellation token that ends the iteration.
        immediate: tick once at once before the first interval (default ``True``).
        clock: a monotonic clock (injectable for tests).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        interval: float | timedelta,
        token: CancellationToken,
        *,
        immediate: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = to_seconds(interval, "PeriodicTimer interval", allow_zero=False)
        if not isinstance(cast("object", token), threading.Event):
            msg = f"PeriodicTimer needs a CancellationToken to end the iteration, not: {describe(token)}"
            raise ConfigurationTypeError(msg)
        self.token = token
        self.missed = 0
        self.ticks = 0
        self._clock = clock
        self._start = clock()
        self._next = self._start if immediate else self._start + self.interval

    def wait_for_next_tick(self) -> bool:
        """Sleep until the next tick; ``False`` if the token was cancelled instead."""
        now = self._clock()
        if now > self._next + self.interval:
            # The body overran: skip to the next tick still in the future.
            behind = int((now - self._next) // self.interval)
            self.missed += behind
            self._next += behind * self.interval
        delay = self._next - now
        if self.token.wait(delay if delay > 0 else 0) or self.token.is_set():
            return False
        self.ticks += 1
        self._next += self.interval
        return True

    def __iter__(self) -> Iterator[int]:
        while self.wait_for_next_tick():
            yield self.ticks

    def __repr__(self) -> str:
        return f"<PeriodicTimer interval={self.interval} ticks={self.ticks} missed={self.missed}>"
