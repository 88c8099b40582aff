"""Request latency: a recorder and a WSGI middleware that feeds it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._stats import WindowedSamples

__all__ = ["LatencyMiddleware", "LatencyRecorder"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class LatencyRecorder:
    """Request durations over the last ``window`` seconds.

    .. versionadded:: 0.1
    """

    def __init__(self, *, window: float = 30.0) -> None:
        self.durations = WindowedSamples(window)

    def record(self, seconds: float) -> None:
        """Record one request's duration."""
        self.durations.add(seconds)

    def summary(self) -> dict[str, Any]:
        """Milliseconds over the window: ``count``, ``p50``, ``p90``, ``p99``, ``p999``, ``max``."""
        return self.durations.summary(scale=1000.0)

    def __repr__(self) -> str:
        s = self.summary()
        return f"<LatencyRecorder requests={s['count']} p99={s['p99']} ms>"


class _TimedBody:
    """The response body; the request ends when the server closes it (streaming included)."""

    def __init__(self, body: Iterable[bytes], done: Callable[[], None]) -> None:
        self._body = body
        self._done = done

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._done()


class LatencyMiddleware:
    """WSGI middleware: records each request's duration, from call to the body's ``close()``.

    Args:
        app: the WSGI app to wrap.
        recorder: where durations go (one is made if not given).

    .. versionadded:: 0.1
    """

    def __init__(self, app: WSGIApp, recorder: LatencyRecorder | None = None) -> None:
        self.app = app
        self.recorder = recorder if recorder is not None else LatencyRecorder()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        began = time.perf_counter()
        recorded = False

        def done() -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                self.recorder.record(time.perf_counter() - began)

        try:
            body = self.app(environ, start_response)
        except BaseException:
            done()
            raise
        return _TimedBody(body, done)
