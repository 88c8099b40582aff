"""SIGINT/SIGTERM (stop) and SIGHUP (reload) for ``Host.run()``, only when it owns the main thread.

The Python-level handler does nothing but note the signal: the C-level handler
has already written the signal number to a wake-up pipe (``signal.set_wakeup_fd``),
and the main thread, blocked in ``select`` on that pipe, does the real work
outside signal context. Doing the stop inside the handler would re-enter locks
the main thread may hold (an Event's condition, loguru's sink lock). A stop asked
from another thread writes a zero byte to the same pipe. (Pattern: cotyledon's
SignalManager.)

A second SIGINT while the stop runs ends the process at once with 130: the
handler writes one line to stderr with ``os.write`` and calls ``os._exit``, both
safe in signal context. Process-placed children notice their parent's death and
stop themselves.

SIGHUP is noted the same way and asks for a reload, never a stop: with Python's
default action it would end the process, and ``systemctl reload`` sends it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

__all__ = ["FORCED_EXIT_CODE", "RELOAD_SIGNAL", "SignalWatch", "signals_read_meanwhile"]

FORCED_EXIT_CODE = 130
#: Asks ``run()`` for a reload (``systemctl reload``: ``ExecReload=/bin/kill -HUP $MAINPID``).
RELOAD_SIGNAL = signal.SIGHUP
_SIGNALS = (signal.SIGINT, signal.SIGTERM, RELOAD_SIGNAL)


class SignalWatch:
    """Context manager: installs the handlers on enter (main thread only), restores on exit."""

    def __init__(self) -> None:
        self.installed = False
        self.stopping = False
        self._rfd = -1
        self._wfd = -1
        self._old_handlers: dict[int, Any] = {}
        self._old_wakeup = -1

    def __enter__(self) -> SignalWatch:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._old_wakeup = signal.set_wakeup_fd(self._wfd, warn_on_full_buffer=False)
        for signum in _SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._handler)
        self.installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.installed:
            return
        for signum, old in self._old_handlers.items():
            signal.signal(signum, old)
        signal.set_wakeup_fd(self._old_wakeup)
        self.installed = False
        for fd in (self._rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping and signum == signal.SIGINT:
            with contextlib.suppress(OSError):
                os.write(2, b"hostkit: second SIGINT during the stop; exiting at once (exit code 130)\n")
            os._exit(FORCED_EXIT_CODE)

    def wake(self) -> None:
        """Wake :meth:`wait` from any thread."""
        if self.installed:
            with contextlib.suppress(OSError):
                os.write(self._wfd, b"\0")

    def wait(self) -> list[int]:
        """Block until a signal arrives or :meth:`wake` is called; return the signals seen."""
        while True:
            select.select([self._rfd], [], [])
            try:
                data = os.read(self._rfd, 512)
            except BlockingIOError:
                continue
            return [b for b in data if b]


@contextlib.contextmanager
def signals_read_meanwhile(watch: SignalWatch, handle: Callable[[list[int]], None]) -> Iterator[None]:
    """Read ``watch``'s pipe on a helper thread while the main thread is busy in the block.

    Without it, SIGTERM during a slow start (a database that is not up yet) would
    wait for every start() to finish: the main thread, which normally reads the
    pipe, is inside start(). ``handle`` gets each batch of signals read.
    """
    done = threading.Event()

    def read() -> None:
        # Handle what was read before looking at `done`, so that no signal read here is
        # lost; bytes not read yet stay in the pipe for the main thread's next wait.
        while True:
            handle(watch.wait())
            if done.is_set():
                return

    reader = threading.Thread(target=read, name="hostkit-host-signals", daemon=True)
    reader.start()
    try:
        yield
    finally:
        done.set()
        watch.wake()
        reader.join()
