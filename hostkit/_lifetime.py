"""ApplicationLifetime: the host's three moments, as tokens."""

from __future__ import annotations

from collections.abc import Callable

from loguru import logger

from ._token import CancellationToken

__all__ = ["ApplicationLifetime"]


class ApplicationLifetime:
    """The host's lifetime events, and the one way to ask it to stop.

    Attributes:
        started: set once every service has started.
        stopping: set when a stop is requested or begins; services may watch it
            to wind down early.
        stopped: set when the stop has finished.

    .. versionadded:: 0.1
    """

    def __init__(self) -> None:
        self.started = CancellationToken(name="started")
        self.stopping = CancellationToken(name="stopping")
        self.stopped = CancellationToken(name="stopped")
        self._on_stop_requested: Callable[[], None] | None = None

    def stop_application(self) -> None:
        """Ask the host to stop. Idempotent, and safe from any thread (also from a service)."""
        if self.stopping.is_set():
            return
        logger.debug("Stop requested through ApplicationLifetime.stop_application()")
        self.stopping.set()
        callback = self._on_stop_requested
        if callback is not None:
            callback()

    def __repr__(self) -> str:
        flags = [n for n in ("started", "stopping", "stopped") if getattr(self, n).is_set()]
        return f"<ApplicationLifetime {'/'.join(flags) or 'created'}>"
