"""Cancellation: a token that *is* a :class:`threading.Event`, and its source.

A :class:`CancellationToken` is what every loop waits on: ``token.wait(5)`` is an
interruptible sleep that returns ``True`` the moment the token is set. Callbacks
registered on a token run once, on the thread that sets it.

A :class:`CancellationTokenSource` owns a token and adds what a token alone cannot
do: cancel it after a delay, or link it to other tokens so it is set when any of
them is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from ._util import describe

if TYPE_CHECKING:
    from datetime import timedelta

__all__ = ["CancellationToken", "CancellationTokenRegistration", "CancellationTokenSource"]


class CancellationTokenRegistration:
    """The handle of a callback registered on a token; :meth:`unregister` removes it.

    Returned by :meth:`CancellationToken.register`; a context manager that
    unregisters the callback on exit.

    .. versionchanged:: 0.2
       Renamed from ``Registration``, which stays a deprecated alias for one release.
    """

    __slots__ = ("_callback", "_token")

    def __init__(self, token: CancellationToken | None, callback: Callable[[], object]) -> None:
        self._token = token
        self._callback = callback

    def unregister(self) -> bool:
        """Remove the callback. Returns ``True`` if it had not run yet."""
        token, self._token = self._token, None
        if token is None:
            return False
        return token._unregister(self)

    def __enter__(self) -> CancellationTokenRegistration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unregister()


#: The name sibling modules imported before the rename (not public: ``hostkit.Registration``
#: is the deprecated public spelling, and warns).
Registration = CancellationTokenRegistration


class _Cancelling:
    """The one run of a token's callbacks: the thread that runs them, set ``done`` after."""

    __slots__ = ("done", "thread")

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread
        self.done = threading.Event()


class CancellationToken(threading.Event):
    """A :class:`threading.Event` that means "stop".

    ``wait(timeout)`` is the interruptible sleep of every loop; ``set()`` (or the
    owning source's ``cancel()``) cancels. Callbacks registered with
    :meth:`register` run exactly once, on the thread that cancels; one that raises
    is logged and the others still run.

    .. versionadded:: 0.1
    """

    def __init__(self, *, name: str = "") -> None:
        super().__init__()
        self.name = name
        self._callbacks: list[CancellationTokenRegistration] | None = []
        self._callbacks_lock = threading.Lock()
        # Set by CancellationTokenSource.cancel_after. The deadline is enforced by
        # wait() and is_set() themselves; a timer thread (_arm) is started only when
        # a callback needs to run at the deadline. So a stop budget costs no thread in
        # the common case, and still works where no thread can be started (Python
        # 3.12 refuses new threads during interpreter shutdown, where embedded hosts stop).
        self._deadline: float | None = None
        self._arm: Callable[[], None] | None = None
        # Made by the first set(), which runs the callbacks: who runs them, and when they are done.
        self._cancelling: _Cancelling | None = None

    def is_set(self) -> bool:
        """``True`` once the token is set (or its ``cancel_after`` deadline has passed)."""
        deadline = self._deadline
        if deadline is not None and not super().is_set() and time.monotonic() >= deadline:
            self.set()
        return super().is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until the token is set or ``timeout`` seconds pass; ``True`` if it is set."""
        deadline = self._deadline
        if deadline is None:
            return super().wait(timeout)
        remaining = deadline - time.monotonic()
        if timeout is not None and timeout < remaining:
            return super().wait(timeout)
        if remaining > 0 and super().wait(remaining):
            return True
        return self.is_set() or super().wait(max(deadline - time.monotonic(), 0.0))

    def remaining(self) -> float | None:
        """Seconds until this token's ``cancel_after`` deadline (``None`` without one; ``0.0`` once passed).

        With :meth:`watch`, bounds a wait by the token without a timer thread:
        ``with token.watch(event.set): event.wait(token.remaining())``.
        """
        deadline = self._deadline
        return None if deadline is None else max(deadline - time.monotonic(), 0.0)

    @classmethod
    def none(cls) -> CancellationToken:
        """A token that nobody will ever cancel (for calls that need one)."""
        return cls(name="none")

    @property
    def cancelled(self) -> bool:
        """``True`` once the token is set."""
        return self.is_set()

    def set(self) -> None:
        """Cancel: wake every waiter, then run the registered callbacks once."""
        with self._callbacks_lock:
            callbacks, self._callbacks = self._callbacks, None
            if callbacks is not None:
                cancelling = self._cancelling = _Cancelling(threading.current_thread())
        super().set()
        if callbacks is None:
            return  # set before: the first set() runs the callbacks
        try:
            for registration in callbacks:
                try:
                    registration._callback()
                except Exception:
                    # Imported here: a service's module imports this one, and importing it
                    # must not load loguru (see "What a child imports" in the docs).
                    from loguru import logger

                    logger.opt(exception=True).warning(
                        "A cancellation callback of token {!r} raised; the others still run",
                        self.name,
                    )
        finally:
            cancelling.done.set()

    cancel = set

    def clear(self) -> None:
        """Tokens cannot be reset: a cancelled token stays cancelled.

        Raises:
            RuntimeError: always. Create a new token instead.
        """
        msg = "a CancellationToken cannot be cleared once set; create a new token instead"
        raise RuntimeError(msg)

    def raise_if_cancelled(self) -> None:
        """Raise :class:`~hostkit.exceptions.OperationCancelledError` if the token is set."""
        if self.is_set():
            # Imported when raised: hostkit.exceptions brings concurrent.futures and queue,
            # which a process-placed child's start has no other use for.
            from .exceptions import OperationCancelledError

            msg = f"the operation was cancelled (token {self.name!r})" if self.name else ("the operation was cancelled")
            raise OperationCancelledError(msg)

    def register(self, callback: Callable[[], object]) -> CancellationTokenRegistration:
        """Run ``callback()`` when the token is cancelled (at once if it already is).

        Returns:
            a :class:`CancellationTokenRegistration`; call ``unregister()`` when the callback is no
            longer wanted (a long-lived token otherwise keeps it alive).
        """
        # The annotation says callable, but users call this from untyped code: check anyway,
        # so the mistake surfaces here and not later on the cancelling thread.
        if not callable(cast("object", callback)):
            msg = f"register() needs a callable taking no arguments, not: {describe(callback)}"
            raise TypeError(msg)
        registration = self.watch(callback)
        arm = self._arm
        if arm is not None and registration._token is not None:
            arm()  # the callback must run at the deadline even if nobody waits
        return registration

    def watch(self, callback: Callable[[], object]) -> CancellationTokenRegistration:
        """Like :meth:`register`, but without starting a deadline timer.

        The callback runs when the token is set by a call to ``set()``/``cancel()``
        (or when a check finds the deadline passed), not by the deadline alone: for
        callers that bound their own wait with :meth:`remaining`.
        """
        registration = CancellationTokenRegistration(self, callback)
        if not self.is_set():
            with self._callbacks_lock:
                if self._callbacks is not None:
                    self._callbacks.append(registration)
                    return registration
        registration._token = None
        callback()
        return registration

    def callbacks_finished(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the callbacks run by setting the token to return.

        ``True`` once they have (or if the token is not set); ``True`` at once on the
        thread that runs them, which would otherwise wait for itself. A waiter woken by
        ``set()`` would otherwise go on while the callbacks still run on the setting thread.
        """
        cancelling = self._cancelling
        if cancelling is None or cancelling.thread is threading.current_thread():
            return True
        return cancelling.done.wait(timeout)

    def running_callbacks(self) -> threading.Thread | None:
        """The thread running this token's callbacks now, or ``None``."""
        cancelling = self._cancelling
        if cancelling is None or cancelling.done.is_set():
            return None
        return cancelling.thread

    def _unregister(self, registration: CancellationTokenRegistration) -> bool:
        with self._callbacks_lock:
            if self._callbacks is None:
                return False
            try:
                self._callbacks.remove(registration)
            except ValueError:
                return False
            return True

    def __repr__(self) -> str:
        state = "cancelled" if self.is_set() else "active"
        name = f" {self.name!r}" if self.name else ""
        return f"<CancellationToken{name} {state}>"


class CancellationTokenSource:
    """Creates and cancels a :class:`CancellationToken`.

    Args:
        linked: tokens whose cancellation also cancels this source's token.
        cancel_after: cancel automatically after this many seconds (or a timedelta).
        name: a name shown in the token's ``repr`` and in log lines.

    Use it as a context manager (or call :meth:`close`) so a pending
    ``cancel_after`` timer and the links are released.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        *linked: CancellationToken,
        cancel_after: float | timedelta | None = None,
        name: str = "",
    ) -> None:
        self.token = CancellationToken(name=name)
        self._timer: threading.Timer | None = None
        self._timer_lock = threading.Lock()
        self._links: list[CancellationTokenRegistration] = []
        for parent in linked:
            # A plain threading.Event cannot tell anyone it was set, so a link to one could
            # only be checked once, here: refuse it rather than link it silently badly.
            if not isinstance(cast("object", parent), CancellationToken):
                msg = (
                    f"linked tokens must be CancellationToken objects (a plain threading.Event cannot "
                    f"notify the link), not: {describe(parent)}"
                )
                raise TypeError(msg)
            self._links.append(parent.register(self.cancel))
        if cancel_after is not None:
            self.cancel_after(cancel_after)

    @property
    def cancelled(self) -> bool:
        """``True`` once the token is cancelled."""
        return self.token.is_set()

    def cancel(self) -> None:
        """Cancel the token. Safe to call many times and from any thread."""
        self.token.set()
        self._cancel_timer()

    def cancel_after(self, delay: float | timedelta) -> None:
        """Cancel the token after ``delay`` seconds; a later call replaces the delay.

        Waits on the token end at the deadline by themselves; a timer thread is
        started only if callbacks are registered, to run them on time.
        """
        # Imported here: a process-placed child imports this module, and rarely this method's
        # validation (the options module defines the host's option classes).
        from ._options import seconds_option

        seconds = seconds_option(delay, "delay")
        if self.token.is_set():
            return
        if seconds <= 0:
            self.cancel()
            return
        self._cancel_timer()
        self.token._deadline = time.monotonic() + seconds
        self.token._arm = self._start_timer
        with self.token._callbacks_lock:
            has_callbacks = bool(self.token._callbacks)
        if has_callbacks:
            self._start_timer()

    def _start_timer(self) -> None:
        deadline = self.token._deadline
        if deadline is None:
            return
        with self._timer_lock:
            if self._timer is not None:
                return
            timer = threading.Timer(max(deadline - time.monotonic(), 0.0), self._fire, args=(deadline,))
            timer.name = f"hostkit-cancel-after-{self.token.name or id(self)}"
            timer.daemon = True
            try:
                timer.start()
            except RuntimeError:
                # No new threads at interpreter shutdown (Python 3.12): waits still end
                # at the deadline; callbacks run when something next checks the token.
                from loguru import logger

                logger.debug("Cannot start the deadline timer of token {!r} (interpreter shutdown)", self.token.name)
                return
            self._timer = timer

    def _fire(self, deadline: float) -> None:
        if self.token._deadline == deadline:  # not replaced by a later cancel_after
            self.token.set()

    def _cancel_timer(self) -> None:
        self.token._arm = None
        with self._timer_lock:
            timer, self._timer = self._timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
            timer.join()

    def close(self) -> None:
        """Stop the ``cancel_after`` timer and drop the links; the token keeps its state."""
        deadline = self.token._deadline
        if deadline is not None:
            if time.monotonic() >= deadline:
                self.token.set()  # the deadline passed: it stays cancelled
            else:
                self.token._deadline = None  # stopped before its deadline: it stays active
        self._cancel_timer()
        for link in self._links:
            link.unregister()
        self._links.clear()

    def __enter__(self) -> CancellationTokenSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CancellationTokenSource token={self.token!r} links={len(self._links)}>"
