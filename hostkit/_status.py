"""What every service is doing: its record (mutable, internal) and snapshots (frozen, public)."""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from ._process.options import ProcessOptions

if TYPE_CHECKING:
    from ._options import RestartPolicy
    from ._runners import Runner
    from ._services import HostedService, Placement, Replica

__all__ = ["HostState", "HostStatus", "LockStatus", "ServiceRecord", "ServiceState", "ServiceStatus"]


class ServiceState(str, enum.Enum):
    """The life of one service, as the status snapshot reports it.

    .. versionadded:: 0.1
    """

    #: Registered; ``start`` not called yet.
    CREATED = "created"
    #: ``start`` (or a start hook) is running.
    STARTING = "starting"
    #: Started; for a background service, ``execute`` is running.
    RUNNING = "running"
    #: ``execute`` failed and the restart policy is waiting to run it again.
    RESTARTING = "restarting"
    #: The host asked it to stop and is waiting for it.
    STOPPING = "stopping"
    #: It stopped when asked.
    STOPPED = "stopped"
    #: ``execute`` returned on its own, before any stop was asked.
    COMPLETED = "completed"
    #: ``start`` or ``execute`` failed for good; ``error`` says why.
    FAULTED = "faulted"
    #: It did not stop within the shutdown budget: its thread was abandoned or its process killed.
    TIMED_OUT = "timed_out"


class HostState(str, enum.Enum):
    """The life of a host.

    .. versionadded:: 0.1
    """

    #: Built, not started.
    CREATED = "created"
    #: ``start`` is running.
    STARTING = "starting"
    #: Every service started; ``lifetime.started`` is set.
    RUNNING = "running"
    #: A stop is in progress.
    STOPPING = "stopping"
    #: Stopped; ``lifetime.stopped`` is set.
    STOPPED = "stopped"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


@dataclass(frozen=True)
class LockStatus:
    """Where a service wrapped in :class:`~hostkit.OncePerDeployment` stands with its deployment lock.

    Attributes:
        role: ``"holder"`` (this host runs the service) or ``"standby"`` (another
            process holds the lock; this host takes over when it is released).
        path: where the lock lives: the lock file, or for a cluster lock the server
            (its URL or DSN, without a password) and the key.
        holder_pid: the pid of the process holding the lock (for a process-placed
            service, the child's), or ``None`` if a standby could not read it yet.
        backend: ``"file"``, ``"redis"`` or ``"postgres"``.
        token: the holder's fencing token (see :class:`hostkit.cluster.Lease`), or
            ``None`` for a standby.
        holder_host: the host name of the holder's machine, where the backend
            records it (Redis, PostgreSQL), else ``None``.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``backend``, ``token`` and ``holder_host``.
    """

    role: Literal["holder", "standby"]
    path: str
    holder_pid: int | None = None
    backend: str = "file"
    token: int | None = None
    holder_host: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``role``, ``path``, ``holder_pid``, ``backend``, ``token``, ``holder_host``."""
        return asdict(self)

    def describe(self) -> str:
        """One line for people: who holds the lock, where."""
        what = "deployment lock" if self.backend == "file" else f"{self.backend} lock"
        if self.role == "holder":
            token = "" if self.token is None else f", fencing token {self.token}"
            return f"holds the {what} {self.path} (pid {self.holder_pid}){token}"
        if self.holder_pid is None:
            holder = "another process"
        else:
            holder = f"pid {self.holder_pid}" + ("" if self.holder_host is None else f" on {self.holder_host}")
        return f"standby: {holder} holds the {what} {self.path}"


@dataclass(frozen=True)
class ServiceStatus:
    """A snapshot of one service.

    Attributes:
        name: the service's name (its class name unless given at registration).
        kind: ``"hosted"`` or ``"background"``.
        placement: ``"thread"`` or ``"process"`` for background services, else ``None``.
        state: a :class:`ServiceState`.
        started_at: when it last started (Unix time), or ``None``.
        stopped_at: when it ended (Unix time), or ``None``.
        error: ``"Type: message"`` of the failure that faulted it (or the last one), or ``None``.
        traceback: the traceback text of that failure, or ``None``.
        restarts: how many times the restart policy restarted it.
        last_failure_at: when it last failed (Unix time), or ``None``.
        pid: the child's pid for a process-placed service, else the host's pid.
        thread_id: the native id of the thread running it, if any.
        last_heartbeat_at: when it last called ``heartbeat()`` (Unix time), or ``None``.
        detail: a free-text note (why it stopped, what it is waiting for); for a
            service wrapped in :class:`~hostkit.OncePerDeployment` with nothing
            more pressing to say, :meth:`LockStatus.describe` of its ``lock``.
        healthy: ``False`` while a thread-placed service's heartbeat is stale (a
            thread cannot be killed, so it is reported instead).
        lock: for a service wrapped in :class:`~hostkit.OncePerDeployment`, whether
            this host holds its deployment lock or stands by (a :class:`LockStatus`),
            else ``None``.
        replica: for one replica of a registration made with ``replicas=N``, which
            one (a :class:`~hostkit.Replica`: ``index`` and ``count``; its ``name``
            is ``Name[index]``), else ``None``.
        last_reload_at: when its ``reload()`` last ended (Unix time), or ``None``
            (never called: no reload yet, or it has no ``reload()``).
        reload_error: why that last ``reload()`` failed (``"Type: message"``, or
            that it overran ``reload_timeout``), or ``None`` if it succeeded. A
            failed reload leaves ``state`` alone: the service runs on.
        cpu_priority: for a process-placed service, its child's CPU priority
            (``"nice 19"``, ``"SCHED_BATCH, nice 19"``, ``"SCHED_IDLE"``, ``"inherited"``),
            else ``None``.
        cpu_affinity: for a process-placed service pinned to some CPUs (``cpu_affinity=``,
            or what ``keep_cores=`` left it at start), those CPUs, else ``None``.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``replica``, ``last_reload_at``, ``reload_error``, ``cpu_priority`` and ``cpu_affinity``.
    """

    name: str
    kind: str
    placement: str | None
    state: ServiceState
    started_at: float | None = None
    stopped_at: float | None = None
    error: str | None = None
    traceback: str | None = None
    restarts: int = 0
    last_failure_at: float | None = None
    pid: int | None = None
    thread_id: int | None = None
    last_heartbeat_at: float | None = None
    detail: str | None = None
    healthy: bool = True
    lock: LockStatus | None = None
    replica: Replica | None = None
    last_reload_at: float | None = None
    reload_error: str | None = None
    cpu_priority: str | None = None
    cpu_affinity: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; times are ISO 8601 strings in UTC."""
        data = asdict(self)
        data["state"] = self.state.value
        for key in ("started_at", "stopped_at", "last_failure_at", "last_heartbeat_at", "last_reload_at"):
            data[key] = _iso(data[key])
        return data


@dataclass(frozen=True)
class HostStatus:
    """A snapshot of a host and every service in it.

    .. versionadded:: 0.1
    """

    state: HostState
    exit_code: int
    services: tuple[ServiceStatus, ...] = field(default_factory=tuple)

    def __getitem__(self, name: str) -> ServiceStatus:
        for service in self.services:
            if service.name == name:
                return service
        msg = f"no service named {name!r}; the host has: {', '.join(s.name for s in self.services) or 'none'}"
        raise KeyError(msg)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "state": self.state.value,
            "exit_code": self.exit_code,
            "services": [s.to_dict() for s in self.services],
        }


class ServiceRecord:
    """The host's mutable record of one registered service (thread-safe)."""

    def __init__(
        self,
        service: HostedService,
        *,
        name: str,
        placement: Placement | None,
        restart: RestartPolicy | None = None,
        process_options: ProcessOptions | None = None,
        heartbeat_timeout: float | None = None,
        replica: Replica | None = None,
    ) -> None:
        self.service = service
        self.name = name
        #: Which replica of its registration this record is (``None`` without ``replicas=``).
        self.replica = replica
        self.placement = placement
        self.restart = restart
        self.process_options: ProcessOptions = process_options or ProcessOptions()
        self.heartbeat_timeout = heartbeat_timeout
        self._lock = threading.Lock()
        self.state = ServiceState.CREATED
        self.started_at: float | None = None
        self.stopped_at: float | None = None
        self.error: str | None = None
        self.traceback: str | None = None
        self.restarts = 0
        self.last_failure_at: float | None = None
        self.pid: int | None = None
        self.thread_id: int | None = None
        self.last_heartbeat_at: float | None = None
        self.detail: str | None = None
        self.healthy = True
        self.lock: LockStatus | None = None
        self.last_reload_at: float | None = None
        self.reload_error: str | None = None
        #: The child's CPUs, once the runner has worked them out at start (``keep_cores=``).
        self.cpu_affinity: tuple[int, ...] | None = self.process_options.cpu_affinity
        self.exception: BaseException | None = None
        #: What runs a background service in its placement (``None`` for a hosted service).
        self.runner: Runner | None = None

    @classmethod
    def standalone(cls, service: HostedService) -> ServiceRecord:
        """A record for a background service started by hand, outside any host."""
        return cls(service, name=type(service).__name__, placement="thread")

    @property
    def kind(self) -> str:
        return "hosted" if self.placement is None else "background"

    def update(self, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                if not hasattr(self, key):  # pragma: no cover - programming error
                    raise AttributeError(key)
                setattr(self, key, value)

    def mark(self, state: ServiceState, **changes: Any) -> None:
        now = time.time()
        with self._lock:
            self.state = state
            if state in (ServiceState.RUNNING,) and "started_at" not in changes:
                self.started_at = now
            if state in (ServiceState.STOPPED, ServiceState.COMPLETED, ServiceState.FAULTED, ServiceState.TIMED_OUT):
                self.stopped_at = now
            for key, value in changes.items():
                setattr(self, key, value)

    def snapshot(self) -> ServiceStatus:
        with self._lock:
            return ServiceStatus(
                name=self.name,
                kind=self.kind,
                placement=self.placement,
                state=self.state,
                started_at=self.started_at,
                stopped_at=self.stopped_at,
                error=self.error,
                traceback=self.traceback,
                restarts=self.restarts,
                last_failure_at=self.last_failure_at,
                pid=self.pid,
                thread_id=self.thread_id,
                last_heartbeat_at=self.last_heartbeat_at,
                # A note of the runner (restarting, a stale heartbeat) says more than the lock's.
                detail=self.detail if self.detail is not None or self.lock is None else self.lock.describe(),
                healthy=self.healthy,
                lock=self.lock,
                replica=self.replica,
                last_reload_at=self.last_reload_at,
                reload_error=self.reload_error,
                cpu_priority=self.process_options.describe_priority() if self.placement == "process" else None,
                cpu_affinity=self.cpu_affinity if self.placement == "process" else None,
            )

    def __repr__(self) -> str:
        return f"<ServiceRecord {self.name!r} {self.kind} {self.state.value}>"
