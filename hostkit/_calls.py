"""Calling a service's lifecycle methods (``start``, ``stop`` and the hooks) for the host.

A call into code hostkit did not write runs on a helper thread when it has a
deadline, so that a hung call can be left behind at the deadline and the host can
go on with the other services; hostkit's own implementations (which only start
or signal a runner) run on the caller's thread. Every call runs with the
service's name in the log context, and marks its thread as "inside one of this
host's calls", so that a ``Host.stop()`` made from there only requests the stop
instead of waiting for itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from loguru import logger

from ._services import is_overridden
from ._status import ServiceRecord
from ._token import CancellationToken

__all__ = ["HelperCall", "HungCall", "LifecycleCalls"]

_log = logger.bind(service="host")

#: The hooks a service may leave alone: not overridden, they are not called at all.
_HOOKS = ("starting", "started", "stopping", "stopped")


class HelperCall:
    """One lifecycle call on a helper thread, so a hung call can be left behind."""

    def __init__(self, fn: Callable[[CancellationToken], None], token: CancellationToken, name: str) -> None:
        self.error: BaseException | None = None
        self._fn = fn
        self._token = token
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._fn(self._token)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float) -> bool:
        self.thread.join(max(timeout, 0.0))
        return not self.thread.is_alive()


class HungCall(Exception):
    """A lifecycle call was still running at its deadline; ``call.thread`` is where it is stuck."""

    def __init__(self, call: HelperCall) -> None:
        super().__init__(call.thread.name)
        self.call = call


class LifecycleCalls:
    """Invokes lifecycle methods for one host, and knows which threads are inside one."""

    def __init__(self) -> None:
        self._local = threading.local()

    def inside(self) -> bool:
        """``True`` on a thread running one of these calls (or a helper thread it started)."""
        return bool(getattr(self._local, "in_call", False))

    def _bound(
        self, record: ServiceRecord, fn: Callable[[CancellationToken], None]
    ) -> Callable[[CancellationToken], None]:
        """``fn`` with the service's name in the log context, its thread marked as inside a call."""

        def bound(token: CancellationToken) -> None:
            previous = getattr(self._local, "in_call", False)
            self._local.in_call = True
            try:
                with logger.contextualize(service=record.name):
                    fn(token)
            finally:
                self._local.in_call = previous

        return bound

    def launch(
        self, record: ServiceRecord, method: str, fn: Callable[[CancellationToken], None], token: CancellationToken
    ) -> HelperCall:
        """Start ``fn(token)`` for ``record``'s ``method`` on a helper thread ``hostkit-<service>-<method>``;
        the caller joins it (so that many calls can share one deadline).

        Raises:
            RuntimeError: no thread can be started (interpreter shutdown).
        """
        return HelperCall(self._bound(record, fn), token, f"hostkit-{record.name}-{method}")

    def invoke(self, record: ServiceRecord, method: str, token: CancellationToken, deadline: float | None) -> None:
        """Call ``record.service.<method>(token)``, bounded by ``deadline`` when it is user code.

        Raises what the call raised, or :class:`HungCall` if it was still running at the deadline.
        """
        service = record.service
        if method in _HOOKS and not is_overridden(service, method):
            return
        bound = self._bound(record, getattr(service, method))

        if deadline is None or not is_overridden(service, method):
            bound(token)
            return
        try:
            call = HelperCall(bound, token, f"hostkit-{record.name}-{method}")
        except RuntimeError:
            # No new threads at interpreter shutdown (Python 3.12), where an embedded
            # host stops: run the call here, unbounded, rather than not at all.
            _log.bind(service=record.name).warning(
                "{}() of {!r} runs without its deadline: no thread can start at interpreter shutdown",
                method,
                record.name,
            )
            bound(token)
            return
        if not call.join(deadline - time.monotonic()):
            raise HungCall(call)
        if call.error is not None:
            raise call.error
