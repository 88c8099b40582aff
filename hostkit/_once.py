"""Once per deployment: a background service that runs in one worker process of a machine, or of a cluster.

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

Across machines the flock is the wrong tool: the lock backends of
:mod:`hostkit.cluster` (a Redis lease, a PostgreSQL advisory lock) take its place
through ``lock=``. The holder then renews its lease on a thread of its own and
cancels the service's token the moment a renewal fails, and the service finds its
lease (and fencing token) with :func:`hostkit.cluster.current_lease`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from loguru import logger

from ._ledger import using_ledger
from ._rundir import open_private, runtime_dir
from ._services import BackgroundService
from ._status import LockStatus
from ._token import CancellationToken, CancellationTokenSource
from ._util import describe, to_seconds
from .cluster._base import LockBackend, using_lease
from .cluster._file import FileLock
from .exceptions import ConfigurationError, InvalidServiceError, OperationCancelledError

if TYPE_CHECKING:
    from ._runners._base import RunnerLike
    from .cluster import Lease

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
    """Run ``service`` in one process at a time, of one machine or of a cluster; take over if that process dies.

    Register the wrapper instead of the service (give it a ``name=``)::

        builder.add_hosted_service(OncePerDeployment(Cleaner()), name="cleaner")
        # once per cluster: every machine competes for a lease on the Redis the queues use
        from hostkit.cluster import RedisLease
        once = OncePerDeployment(Cleaner(), lock=RedisLease("redis://redis:6379/0"))
        builder.add_hosted_service(once, name="cleaner")

    A service registered without it runs once per worker (once per host).

    Args:
        service: the background service (an instance, or a class made with no arguments).
        lock: where the lock lives (a :class:`hostkit.cluster.LockBackend`): the default
            :class:`~hostkit.cluster.FileLock` locks among the processes of one machine;
            :class:`~hostkit.cluster.RedisLease` and :class:`~hostkit.cluster.PostgresLock`
            among every machine that reaches the server.
        lock_path: the shortcut for ``lock=FileLock(lock_path)``: the lock file; default
            :func:`default_lock_path` of the service's class name, in hostkit's private
            runtime directory. A path given here must be in a directory other users cannot
            write (or a sticky one, as ``/tmp``); the file is created 0600 and must not be a
            link or another user's file.
        poll_interval: how often a waiting process tries the lock (takeover delay; a
            standby on a Redis lease also tries the moment the holder's lease ends).

    The holder gets a :class:`~hostkit.cluster.Lease` (:func:`hostkit.cluster.current_lease`
    in the thread that runs ``execute``) whose fencing token grows with every takeover.
    A holder of a lease that must be renewed (Redis, PostgreSQL) that fails to renew it
    cancels the token its service's ``execute`` got, stands by again once ``execute``
    returned, and competes for the lock like any standby.

    Works with ``placement="thread"`` and ``"process"`` (the child takes the lock).
    The service's status (:attr:`~hostkit.ServiceStatus.lock`) says whether this
    host holds the lock or stands by, with the lock's place, the holder's pid and
    the fencing token.

    Raises:
        UnsafePathError: the lock's directory or file could be tampered with by
            another user (the message names it and the fix).
        ConfigurationError: both ``lock`` and ``lock_path``, or a ``lock`` that is not a backend.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``lock=``: once per cluster on Redis or PostgreSQL; the fencing token.
    """

    def __init__(
        self,
        service: BackgroundService | type[BackgroundService],
        *,
        lock: LockBackend | None = None,
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
        if lock is not None and lock_path is not None:
            msg = (
                "OncePerDeployment() takes lock= or lock_path=, not both: lock_path=PATH is the shortcut "
                "for lock=FileLock(PATH)"
            )
            raise ConfigurationError(msg)
        if lock is None:
            # Checks a given path now; the default path is resolved again where the service
            # runs: a worker may run as another user than the process that registered it
            # (gunicorn's `user` setting).
            lock = FileLock(lock_path)
        elif not isinstance(lock, LockBackend):
            msg = (  # type: ignore[unreachable]
                "lock must be a lock backend from hostkit.cluster (FileLock, RedisLease or PostgresLock), "
                f"not: {describe(lock)}"
            )
            raise ConfigurationError(msg)
        lock.check()
        self.lock = lock
        self.poll_interval = interval
        #: Whether this process holds the lock now (for status pages).
        self.holding = False
        #: The lease this process holds while it runs the service (its ``token`` is the fencing
        #: token), else ``None``; :func:`hostkit.cluster.current_lease` gives the same in ``execute``.
        self.lease: Lease | None = None

    @property
    def lock_path(self) -> str | None:
        """The file of a :class:`~hostkit.cluster.FileLock` (as given, or :func:`default_lock_path`); else ``None``."""
        if isinstance(self.lock, FileLock):
            return self.lock.resolve(type(self.service).__name__)
        return None

    def execute(self, stopping: CancellationToken) -> None:
        name = type(self.service).__name__
        log = logger.bind(service=name, pid=os.getpid())
        lease = self.lock.lease(name)
        from ._runners._base import runner_for

        report = _LockReporter(runner_for(self))
        try:
            while not stopping.is_set():
                acquired_at = self._wait_for(lease, stopping, report, log)
                if acquired_at is None:
                    return
                if not self._hold(lease, acquired_at, stopping, report, log):
                    # The service returned on its own, or the host is stopping: done, as without a lock.
                    return
                # It lost the lock: stand by and compete again, as every other process does.
        finally:
            report(None)
            lease.release()

    def _wait_for(self, lease: Lease, stopping: CancellationToken, report: _LockReporter, log: Any) -> float | None:
        """Poll until ``lease`` is ours (the monotonic time the winning try was sent), or ``None`` on stop."""
        name = type(self.service).__name__
        waiting_logged = failing = False
        while not stopping.is_set():
            sent = time.monotonic()
            try:
                if lease.try_acquire():
                    if failing:
                        log.info("{!r}: the {} lock {} is reachable again", name, lease.backend, lease.where)
                    return sent
            except Exception as err:
                if not lease.is_outage(err):
                    raise
                # A server that is down is waited for, quietly: one WARNING per outage.
                if not failing:
                    log.warning(
                        "{!r}: cannot reach the {} lock {} ({}: {}); trying again every {:g} s",
                        name, lease.backend, lease.where, type(err).__name__, err, self.poll_interval,
                    )  # fmt: skip
                    failing = True
                else:
                    log.opt(exception=err).debug("{!r}: the {} lock is still unreachable", name, lease.backend)
                stopping.wait(self.poll_interval)
                continue
            if failing:
                log.info("{!r}: the {} lock {} is reachable again", name, lease.backend, lease.where)
                failing = False
            holder = lease.holder
            report(LockStatus("standby", lease.where, holder.pid, lease.backend, None, holder.host))
            if not waiting_logged:
                who = (
                    ""
                    if holder.pid is None
                    else f" (pid {holder.pid}" + (f" on {holder.host})" if holder.host else ")")
                )
                log.info(
                    "{!r} runs once per deployment and another process holds {}{}; waiting", name, lease.where, who
                )
                waiting_logged = True
            stopping.wait(lease.standby_wait(self.poll_interval))
        return None

    def _hold(
        self, lease: Lease, acquired_at: float, stopping: CancellationToken, report: _LockReporter, log: Any
    ) -> bool:
        """Run the service under ``lease`` until it returns; renew the lease meanwhile; cancel the service if lost.

        Returns whether it ended because the lease was lost (and the host is not stopping).
        """
        from ._runners._base import attach_runner, detach_runner, runner_for

        name = type(self.service).__name__
        runner = runner_for(self)
        host_name = None if lease.backend == "file" else socket.gethostname()
        self.holding = True
        self.lease = lease
        report(LockStatus("holder", lease.where, os.getpid(), lease.backend, lease.token, host_name))
        if runner is not None:
            # The inner service's heartbeat() reaches the runner of the wrapper.
            attach_runner(self.service, runner)
        what = "deployment lock" if lease.backend == "file" else f"{lease.backend} lock"
        log.info(
            "{!r} took the {} {} (pid {}, fencing token {}); running it here",
            name,
            what,
            lease.where,
            os.getpid(),
            lease.token,
        )
        lost: list[str] = []
        finished = threading.Event()
        source = CancellationTokenSource(stopping, name=f"{name} lease")
        renewer = None
        if self.lock.renew_interval is not None:
            renewer = threading.Thread(
                target=self._renew,
                args=(lease, acquired_at, source, finished, lost),
                name=f"hostkit-{name}-lease",
                daemon=True,
            )
            renewer.start()
        try:
            with using_lease(lease), using_ledger(lease):
                self.service.execute(source.token)
            if not lost and not stopping.is_set() and not self._still_holds(lease):
                lost.append("a write under it was refused, or could not be confirmed")
        except OperationCancelledError:
            # raise_if_cancelled() after the lease was lost is this wrapper's stop, not a failure.
            if not lost or stopping.is_set():
                raise
        finally:
            finished.set()
            if renewer is not None:
                renewer.join()
            source.close()
            if runner is not None:
                detach_runner(self.service, runner)
            self.holding = False
            self.lease = None
            token = lease.token
            lease.release()
            if lost:
                log.info("{!r} stopped after it lost the {} {}; standing by", name, what, lease.where)
            else:
                log.info("{!r} released the {} {} (fencing token {})", name, what, lease.where, token)
        return bool(lost) and not stopping.is_set()

    @staticmethod
    def _still_holds(lease: Lease) -> bool:
        """Whether the lease is still ours, asked after the service returned on its own.

        A schedule stops when the slot ledger refuses a write (the lease was taken over,
        or the server could not confirm it), and that can happen before the renewer
        notices. Such a service did not finish: its process stands by and competes again.
        """
        try:
            return lease.renew()
        except Exception as err:
            if lease.is_outage(err):
                return False
            raise

    def _renew(
        self,
        lease: Lease,
        acquired_at: float,
        source: CancellationTokenSource,
        finished: threading.Event,
        lost: list[str],
    ) -> None:
        """Renew every ``renew_interval``; on the first failure, or once the lease's time is up, cancel the service."""
        interval, ttl = self.lock.renew_interval, self.lock.ttl
        assert interval is not None
        valid_until = acquired_at + ttl if ttl is not None else None
        next_at = acquired_at + interval
        while not finished.wait(max(next_at - time.monotonic(), 0)):
            now = time.monotonic()
            if valid_until is not None and now >= valid_until:
                # Paused past the lease (a stopped process, a long GC pause): another instance
                # may hold it now. Do not even ask the server: stop at once.
                why = f"its lease ran out {now - valid_until:.1f} s ago without a renewal (was the process paused?)"
            else:
                try:
                    if lease.renew():
                        valid_until = now + ttl if ttl is not None else None
                        next_at = now + interval
                        continue
                    why = "the lease has another holder or expired"
                except Exception as err:
                    why = f"could not renew it: {type(err).__name__}: {err}"
            lost.append(why)
            logger.bind(service=type(self.service).__name__, pid=os.getpid()).warning(
                "{!r} lost the {} lock {} ({}); cancelling it",
                type(self.service).__name__,
                lease.backend,
                lease.where,
                why,
            )
            source.cancel()
            return

    def reload(self, token: CancellationToken) -> None:
        """Forward the reload to the wrapped service while this process runs it.

        A standby has nothing running to reload: it reads its configuration when it
        takes over. The host calls this only when the wrapped service overrides
        ``reload``.
        """
        if self.holding:
            self.service.reload(token)

    def __repr__(self) -> str:
        return f"<OncePerDeployment {type(self.service).__name__} lock={self.lock!r} holding={self.holding}>"
