"""The child's side of a reload: a :class:`~hostkit._process.protocol.Reload` from the host.

The stop watcher reads the control pipe; a message that is not ``STOP`` is handed
to :meth:`ChildReloads.handle` there, which starts one thread,
``hostkit-<service>-reload``, and returns at once: the watcher must go on
watching for the stop and the host's death. That thread calls the service's
``reload(token)`` while ``execute`` goes on, and sends the answer,
:class:`~hostkit._process.protocol.Reloaded`, on the result pipe. The token is set
at the host's deadline (``timeout`` in the message) or when the child is asked to
stop. The host decides whether the call overran: it stops waiting at its deadline
and reports it; an answer that comes later is only logged there.

Reloads never overlap in one child: while a call from an earlier request is still
running (it overran its deadline), a new request is answered at once with an error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import dill

from .._token import CancellationToken, CancellationTokenSource
from .protocol import Failed, Message, Reload, Reloaded

__all__ = ["ChildReloads"]


class ChildReloads:
    """Runs the host's reload requests against the child's service, one at a time."""

    def __init__(
        self,
        name: str,
        send: Callable[[Message], None],
        stopping: CancellationToken,
        describe: Callable[[BaseException], Failed],
        warn: Callable[[str, BaseException], None],
    ) -> None:
        self._name = name
        self._send = send
        self._stopping = stopping
        self._describe = describe
        self._warn = warn
        self._lock = threading.Lock()
        self._service: Any = None
        self._thread: threading.Thread | None = None

    def attach(self, service: Any) -> None:
        """The service is built: requests from now on call its ``reload``."""
        with self._lock:
            self._service = service

    def handle(self, blob: bytes) -> None:
        """One message from the control pipe other than ``STOP`` (on the watcher thread).

        Never raises: the watcher thread, which calls it, must go on watching.
        """
        try:
            self._handle(blob)
        except Exception as exc:
            self._warn("A control message from the host could not be handled", exc)

    def _handle(self, blob: bytes) -> None:
        message = dill.loads(blob)
        if not isinstance(message, Reload):
            msg = f"the host sent a control message this child does not know: {message!r}"
            raise TypeError(msg)
        with self._lock:
            service = self._service
            busy = self._thread is not None and self._thread.is_alive()
            if service is not None and not busy:
                self._thread = threading.Thread(
                    target=self._call, args=(service, message), name=f"hostkit-{self._name}-reload", daemon=True
                )
                self._thread.start()
                return
        if service is None:
            why = "the service is not built yet (its child is still starting)"
        else:
            why = "its previous reload() has not returned yet (it overran its deadline)"
        self._send(Reloaded(message.number, 0.0, refused=why))

    def _call(self, service: Any, message: Reload) -> None:
        began = time.monotonic()
        error: Failed | None = None
        with CancellationTokenSource(self._stopping, cancel_after=message.timeout, name="reload") as source:
            try:
                service.reload(source.token)
            except BaseException as exc:
                error = self._describe(exc)
        self._send(Reloaded(message.number, time.monotonic() - began, error))
