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

The lock file is this user's alone: by default it lives in hostkit's private
runtime directory (see :mod:`hostkit._rundir`), it is created 0600 and opened
without following links, so another local user can neither hold it (and keep
the service from ever running) nor turn it into a link that a host running as
root would truncate.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from datetime import timedelta
from typing import TYPE_CHECKING

from loguru import logger

from ._rundir import check_shared_location, open_private, runtime_dir
from ._services import BackgroundService
from ._status import LockStatus
from ._token import CancellationToken
from ._util import describe, to_seconds
from .exceptions import ConfigurationError, InvalidServiceError

if TYPE_CHECKING:
    from ._runners._base import RunnerLike

__all__ = ["DeploymentLock", "OncePerDeployment", "default_lock_path"]


def default_lock_path(key: str) -> str:
    """``<private runtime dir>/<key>-<hash of the working directory>.lock``.

    The directory is this user's own (``$XDG_RUNTIME_DIR/hostkit``, else
    ``<tempdir>/hostkit-<uid>``, mode 0700), created and checked here. The working
    directory stands for "this deployment": two checkouts of the same app on one
    machine do not share a lock; the N workers of one do.

    Raises:
        UnsafePathError: the private directory's place is taken by something that
            is not this user's own private directory.
    """
    digest = hashlib.sha1(os.getcwd().encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return os.path.join(runtime_dir(), f"{safe}-{digest}.lock")


def _read_pid(fd: int) -> int | None:
    """The pid the holder wrote at the start of the file, or ``None`` (not written yet, or not a pid)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


class DeploymentLock:
    """An exclusive, non-blocking ``flock`` on a file; released when its holder dies.

    The file is opened without following a symbolic link, created with mode 0600,
    and used only if it is a regular file this user owns (see
    :class:`~hostkit.exceptions.UnsafePathError`).

    .. versionadded:: 0.1
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd: int | None = None
        #: The pid the holder wrote into the file, as read at the last attempt that found
        #: the lock taken (``None`` if not read yet); this process's pid while it holds it.
        self.holder_pid: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; never blocks. ``True`` if held now.

        Raises:
            UnsafePathError: the path is a link, not a regular file, or another user's file.
        """
        if self._fd is not None:
            return True
        # A fresh open() per attempt: flock belongs to the open file description, so
        # two threads of one process that each open the file also exclude each other.
        fd = open_private(self.path, "deployment lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                self.holder_pid = _read_pid(fd)
                os.close(fd)
                return False
            os.close(fd)
            raise
        # Write the holder's pid, for standbys' status and people looking at the file
        # (the lock is what counts).
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.holder_pid = os.getpid()
        return True

    def release(self) -> None:
        """Release the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                # Empty the file first: it names the holder, and there is none now.
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
            self.holder_pid = None

    def __repr__(self) -> str:
        return f"<DeploymentLock {self.path!r} {'held' if self.held else 'free'}>"


class _LockReporter:
    """Tells the service's runner where it stands with its lock, once per change.

    The runner records it for ``status()``, the health JSON and ``hostkit top``: the
    host's own runner for a thread, a stand-in that writes to the parent in a child.
    """

    def __init__(self, runner: RunnerLike | None) -> None:
        self._runner = runner
        self._last: LockStatus | None = None

    def __call__(self, status: LockStatus | None) -> None:
        if self._runner is not None and status != self._last:
            self._last = status
            self._runner.report_lock(status)


class OncePerDeployment(BackgroundService):
    """Run ``service`` in one process of the machine at a time; take over if that process dies.

    Register the wrapper instead of the service (give it a ``name=``)::

        builder.add_hosted_service(OncePerDeployment(Cleaner()), name="cleaner")

    A service registered without it runs once per worker (once per host).

    Args:
        service: the background service (an instance, or a class made with no arguments).
        lock_path: the lock file; default :func:`default_lock_path` of the service's class name, in
            hostkit's private runtime directory. A path given here must be in a directory other
            users cannot write (or a sticky one, as ``/tmp``); the file is created 0600 and must
            not be a link or another user's file.
        poll_interval: how often a waiting worker tries the lock (takeover delay).

    Works with ``placement="thread"`` and ``"process"`` (the child takes the lock).
    The service's status (:attr:`~hostkit.ServiceStatus.lock`) says whether this
    host holds the lock or stands by, with the lock's path and the holder's pid.

    Raises:
        UnsafePathError: the lock's directory or file could be tampered with by
            another user (the message names it and the fix).

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
        self._given_path: str | None = None
        if lock_path is not None:
            self._given_path = os.fspath(lock_path)
            check_shared_location(self._given_path, "deployment lock")
        else:
            # Make and check the private directory now, so a problem shows at registration.
            # The path itself is resolved again where the service runs: a worker may run as
            # another user than the process that registered it (gunicorn's `user` setting).
            default_lock_path(type(service).__name__)
        self.poll_interval = interval
        #: Whether this process holds the lock now (for status pages).
        self.holding = False

    @property
    def lock_path(self) -> str:
        """The lock file: ``lock_path`` as given, or :func:`default_lock_path` for this process's user."""
        if self._given_path is not None:
            return self._given_path
        return default_lock_path(type(self.service).__name__)

    def execute(self, stopping: CancellationToken) -> None:
        name = type(self.service).__name__
        log = logger.bind(service=name, pid=os.getpid())
        path = self.lock_path
        if self._given_path is not None:
            check_shared_location(path, "deployment lock")
        lock = DeploymentLock(path)
        from ._runners._base import attach_runner, detach_runner, runner_for

        runner = runner_for(self)
        report = _LockReporter(runner)
        try:
            waiting_logged = False
            while not stopping.is_set():
                if lock.try_acquire():
                    break
                report(LockStatus("standby", path, lock.holder_pid))
                if not waiting_logged:
                    holder = "" if lock.holder_pid is None else f" (pid {lock.holder_pid})"
                    log.info(
                        "{!r} runs once per deployment and another process holds {}{}; waiting", name, path, holder
                    )
                    waiting_logged = True
                stopping.wait(self.poll_interval)
            else:
                return
            self.holding = True
            report(LockStatus("holder", path, os.getpid()))
            # The inner service's heartbeat() reaches the runner of the wrapper.
            if runner is not None:
                attach_runner(self.service, runner)
            log.info("{!r} took the deployment lock {} (pid {}); running it here", name, path, os.getpid())
            try:
                self.service.execute(stopping)
            finally:
                if runner is not None:
                    detach_runner(self.service, runner)
                self.holding = False
                lock.release()
                log.info("{!r} released the deployment lock {}", name, path)
        finally:
            report(None)

    def __repr__(self) -> str:
        where = self._given_path if self._given_path is not None else "default"
        return f"<OncePerDeployment {type(self.service).__name__} lock={where!r} holding={self.holding}>"
