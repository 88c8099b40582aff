"""ApplicationLifetime: the host's three moments, as tokens."""

from __future__ import annotations

from collections.abc import Callable

from ._token import CancellationToken

__all__ = ["ApplicationLifetime"]


class ApplicationLifetime:
    """The host's lifetime events, and the one way to ask it to stop.

    The host makes its own and injects it into every service that takes an
    ``ApplicationLifetime`` parameter; registering one yourself is refused at
    ``build()``.

    Attributes:
        started: set once every service has started.
        stopping: set when a stop is requested or begins; services may watch it
            to wind down early. Its callbacks run on the thread that requested the
            stop, and the host lets them finish (within the shutdown budget) before
            it stops any service.
        stopped: set when the stop has finished, after every service's stop.

    .. versionadded:: 0.1
    """

    def __init__(self, on_stop_requested: Callable[[], None] | None = None) -> None:
        self.started = CancellationToken(name="started")
        self.stopping = CancellationToken(name="stopping")
        self.stopped = CancellationToken(name="stopped")
        self._on_stop_requested = on_stop_requested
        # However `stopping` gets set (stop_application(), or code that calls
        # lifetime.stopping.set() directly), the host hears of it: run() may be asleep in
        # select() on the signal pipe and would otherwise never notice.
        self.stopping.register(self._notify_host)

    def stop_application(self) -> None:
        """Ask the host to stop. Idempotent, and safe from any thread (also from a service)."""
        if self.stopping.is_set():
            return
        from loguru import logger  # here: a spawned child's lifetime must not load loguru

        logger.bind(service="host").debug("Stop requested through ApplicationLifetime.stop_application()")
        self.stopping.set()

    def set_stop_handler(self, handler: Callable[[], None] | None) -> None:
        """Call ``handler()`` whenever ``stopping`` is set (``None`` removes it).

        For whoever drives the stop (the host, or a child process that passes the
        request on to its host): it is told on the thread that set ``stopping``.
        """
        self._on_stop_requested = handler

    def _notify_host(self) -> None:
        callback = self._on_stop_requested
        if callback is not None:
            callback()

    def __repr__(self) -> str:
        flags = [n for n in ("started", "stopping", "stopped") if getattr(self, n).is_set()]
        return f"<ApplicationLifetime {'/'.join(flags) or 'created'}>"
