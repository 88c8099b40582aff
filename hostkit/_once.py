"""Once per deployment: a background service that runs in one worker process of a machine.

Under a pre-fork server with N workers every worker builds the same host, so
every service runs N times: right for a per-worker cache refresher (the
default), wrong for a cleaner or a scheduler. Wrapping such a service in
:class:`OncePerDeployment` makes each worker compete for an exclusive
``fcntl.flock`` on a lock file: one worker holds it and runs the service, the
others poll the lock every ``poll_interval`` seconds. When the holder dies
(even by ``kill -9``), the kernel releases its lock, and another worker takes
over at its next poll.

Why ``flock`` and no library: the kernel releases a flock when its holder's file
description closes, which includes every way a process can die; a PID file or a
lease in a database needs staleness rules that guess. ``filelock`` and
``portalocker`` wrap the same call and add nothing we need here.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
from datetime import timedelta
from typing import IO

from loguru import logger

from ._services import BackgroundService
from ._token import CancellationToken
from ._util import describe, to_seconds
from .exceptions import ConfigurationError, InvalidServiceError

__all__ = ["DeploymentLock", "OncePerDeployment", "default_lock_path"]


def default_lock_path(key: str) -> str:
    """``$TMPDIR/hostkit-<key>-<hash of the working directory>.lock``.

    The working directory stands for "this deployment": two checkouts of the same
    app on one machine do not share a lock; the N workers of one do.
    """
    digest = hashlib.sha1(os.getcwd().encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return os.path.join(tempfile.gettempdir(), f"hostkit-{safe}-{digest}.lock")


class DeploymentLock:
    """An exclusive, non-blocking ``flock`` on a file; released when its holder dies.

    .. versionadded:: 0.1
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._file: IO[bytes] | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._file is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; never blocks. ``True`` if held now."""
        if self._file is not None:
            return True
        # A fresh open() per attempt: flock belongs to the open file description, so
        # two threads of one process that each open the file also exclude each other.
        f = open(self.path, "ab")  # noqa: SIM115 - kept open while the lock is held
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            f.close()
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        # Write the holder's pid, for people looking at the file (the lock is what counts).
        f.truncate(0)
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
        self._file = f
        return True

    def release(self) -> None:
        """Release the lock (idempotent)."""
        f, self._file = self._file, None
        if f is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            finally:
                f.close()

    def __repr__(self) -> str:
        return f"<DeploymentLock {self.path!r} {'held' if self.held else 'free'}>"


class OncePerDeployment(BackgroundService):
    """Run ``service`` in one process of the machine at a time; take over if that process dies.

    Register the wrapper instead of the service (give it a ``name=``)::

        builder.add_hosted_service(OncePerDeployment(Cleaner()), name="cleaner")

    A service registered without it runs once per worker (once per host).

    Args:
        service: the background service (an instance, or a class made with no arguments).
        lock_path: the lock file; default :func:`default_lock_path` of the service's class name.
        poll_interval: how often a waiting worker tries the lock (takeover delay).

    Works with ``placement="thread"`` and ``"process"`` (the child takes the lock).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        service: BackgroundService | type[BackgroundService],
        *,
        lock_path: str | os.PathLike[str] | None = None,
        poll_interval: float | timedelta = 1.0,
    ) -> None:
        if isinstance(service, type) and issubclass(service, BackgroundService):
            service = service()
        if not isinstance(service, BackgroundService):
            msg = f"OncePerDeployment() needs a BackgroundService instance or class, not: {describe(service)}"  # type: ignore[unreachable]
            raise InvalidServiceError(msg)
        if type(service).execute is BackgroundService.execute:
            msg = f"{type(service).__qualname__} does not implement execute(stopping)"
            raise InvalidServiceError(msg)
        interval = to_seconds(poll_interval, "poll_interval")
        if interval <= 0:
            msg = f"poll_interval must be > 0 seconds, not: {describe(poll_interval)}"
            raise ConfigurationError(msg)
        self.service = service
        self.lock_path = os.fspath(lock_path) if lock_path is not None else default_lock_path(type(service).__name__)
        self.poll_interval = interval
        #: Whether this process holds the lock now (for status pages).
        self.holding = False

    def execute(self, stopping: CancellationToken) -> None:
        name = type(self.service).__name__
        log = logger.bind(service=name, pid=os.getpid())
        lock = DeploymentLock(self.lock_path)
        waiting_logged = False
        while not stopping.is_set():
            if lock.try_acquire():
                break
            if not waiting_logged:
                log.info("{!r} runs once per deployment and another process holds {}; waiting", name, self.lock_path)
                waiting_logged = True
            stopping.wait(self.poll_interval)
        else:
            return
        self.holding = True
        # The inner service's heartbeat() reaches the runner of the wrapper.
        runner = self.__dict__.get("_hostkit_runner")
        if runner is not None:
            self.service.__dict__["_hostkit_runner"] = runner
        log.info("{!r} took the deployment lock {} (pid {}); running it here", name, self.lock_path, os.getpid())
        try:
            self.service.execute(stopping)
        finally:
            self.holding = False
            lock.release()
            log.info("{!r} released the deployment lock {}", name, self.lock_path)

    def __repr__(self) -> str:
        return f"<OncePerDeployment {type(self.service).__name__} lock={self.lock_path!r} holding={self.holding}>"
