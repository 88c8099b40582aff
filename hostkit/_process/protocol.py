"""What crosses between the host and one child, typed: settings, payload, messages, shared memory.

Every message is a frozen dataclass, pickled with dill and read by its type and
attributes, never by position. Three channels connect the two processes:

- the *result pipe* (child to host): :class:`LogRecord`, :class:`LockReport`,
  :class:`StopApplication`, :class:`Reloaded` while the service runs, then exactly one
  result, :data:`Result` (:class:`Finished`, :class:`Failed` or :class:`EndedBySigterm`), last;
- the *control pipe* (host to child): :data:`STOP` (raw bytes), a pickled
  :class:`Reload`, or EOF when the host died;
- :class:`SharedState`: a few doubles in shared memory, for what is written too
  often for a pipe (heartbeats) or read where no lock may be taken (a signal handler).

This module imports nothing beyond the standard library at run time: the child
imports it before anything else.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

if TYPE_CHECKING:
    from datetime import datetime

    from .._di import ServiceCollection
    from .._services import Replica
    from .._status import LockStatus

__all__ = [
    "LAUNCH_BLOCKED",
    "STOP",
    "ChildSettings",
    "EndedBySigterm",
    "Failed",
    "Finished",
    "FromContainer",
    "Instance",
    "LockReport",
    "LogRecord",
    "Message",
    "Payload",
    "Reload",
    "Reloaded",
    "Result",
    "SharedState",
    "StopApplication",
]

#: The host's stop request on the control pipe (raw bytes: nothing to unpickle in the watcher).
STOP = b"stop"
#: Blocked in the host's thread that starts a child, unblocked by the child once its handlers
#: are in place: the mask is inherited through fork and exec, the handlers are not.
LAUNCH_BLOCKED = frozenset({signal.SIGINT, signal.SIGTERM})


class _Value:
    """Equality, hash and repr by the dataclass's fields, for every type here: written once.

    ``@dataclass`` compiles those three methods for each class, which made this module
    the largest part of the child side's import (about 3.5 ms of 12 classes, paid by the
    host and by the fork server on every cold start); each class still compiles its own
    ``__init__`` and the frozen ``__setattr__``/``__delattr__``.
    """

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__dataclass_fields__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, _Value)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__dataclass_fields__)
        return f"{type(self).__qualname__}({fields})"


# -- host to child: arguments of child_main -------------------------------------------


@dataclass(frozen=True, repr=False, eq=False)
class ChildSettings(_Value):
    """How the child sets itself up: passed with the payload to ``child_main``."""

    #: The service's name (``service`` in every record, the watcher thread's name).
    name: str
    #: ``hostkit-<service>-<n>``: the child's process name and title.
    process_name: str
    start_method: str
    #: The host's pid: a different parent pid after ``PR_SET_PDEATHSIG`` means the host died.
    parent_pid: int
    #: The host's stdlib root level, applied to the child's root logger.
    stdlib_level: int
    nice: int | None = None
    cpu_affinity: tuple[int, ...] | None = None
    #: Which replica of its registration the service is (``BackgroundService.replica`` in the child).
    replica: Replica | None = None
    #: ``"batch"`` (SCHED_BATCH), ``"idle"`` (SCHED_IDLE), or ``None``: the policy stays as inherited.
    sched_policy: str | None = None


@dataclass(frozen=True, repr=False, eq=False)
class Instance(_Value):
    """Payload: the service object itself, pickled (a service registered as an instance)."""

    service: Any


@dataclass(frozen=True, repr=False, eq=False)
class FromContainer(_Value):
    """Payload: the registrations the child builds its own container from, and the service's key in it."""

    collection: ServiceCollection
    key: Any


Payload: TypeAlias = Instance | FromContainer


# -- host to child: the control pipe ---------------------------------------------------


@dataclass(frozen=True, repr=False, eq=False)
class Reload(_Value):
    """Call the service's ``reload(token)`` on a thread of its own; answer with :class:`Reloaded`."""

    #: Names the request; the answer carries it back.
    number: int
    #: Seconds until the call's token is set (what is left of the host's ``reload_timeout``).
    timeout: float


# -- child to host: the result pipe ---------------------------------------------------


@dataclass(frozen=True, repr=False, eq=False)
class LogRecord(_Value):
    """One log record of the child, re-emitted by the host through loguru with these fields.

    Built only by :func:`hostkit._process.logbridge.capture`, whether the record
    came from loguru or from the stdlib ``logging`` module.
    """

    level: str
    levelno: int
    message: str
    #: loguru's own time (aware ``datetime``) or a stdlib record's timestamp.
    time: datetime | float
    #: The module the record names (``__name__`` of the caller): loguru filters on it.
    name: str
    function: str
    line: int
    module: str
    file_name: str
    file_path: str
    thread_id: int | None
    thread_name: str
    process_name: str
    extra: dict[str, object] = field(default_factory=dict)
    #: The formatted traceback, if the record carries an exception.
    exception: str | None = None


@dataclass(frozen=True, repr=False, eq=False)
class LockReport(_Value):
    """Where the service stands with its deployment lock (``None``: it holds none now)."""

    status: LockStatus | None


@dataclass(frozen=True, repr=False, eq=False)
class Executing(_Value):
    """The child is ready and ``execute`` begins: the service is RUNNING (STARTING until then)."""


@dataclass(frozen=True, repr=False, eq=False)
class StopApplication(_Value):
    """The service's code called ``ApplicationLifetime.stop_application()`` in the child: stop the host."""


@dataclass(frozen=True, repr=False, eq=False)
class Reloaded(_Value):
    """The answer to :class:`Reload` ``number``: ``reload()`` returned, raised (``error``), or was not called."""

    number: int
    #: How long the call took, in seconds.
    seconds: float
    error: Failed | None = None
    #: Why ``reload()`` was not called at all (its previous call is still running), else ``None``.
    refused: str | None = None


@dataclass(frozen=True, repr=False, eq=False)
class Finished(_Value):
    """Result: ``execute`` returned."""


@dataclass(frozen=True, repr=False, eq=False)
class Failed(_Value):
    """Result: ``execute`` raised. The exception itself if dill could pickle it, else its description."""

    blob: bytes | None
    #: ``module.QualName`` of the exception's type.
    type_name: str
    #: ``Type: message``.
    summary: str
    traceback: str


@dataclass(frozen=True, repr=False, eq=False)
class EndedBySigterm(_Value):
    """Result: the host's escalation SIGTERM interrupted ``execute`` (raised ``Terminated`` in the child)."""


Result: TypeAlias = Finished | Failed | EndedBySigterm
Message: TypeAlias = (
    LogRecord | Executing | LockReport | StopApplication | Reloaded | Finished | Failed | EndedBySigterm
)


# -- shared memory ----------------------------------------------------------------------


class SharedState:
    """What the host and one child share through memory, not through the pipe.

    Plain doubles in a ``RawArray`` (no lock): the child's SIGTERM handler reads it
    (a handler must not take locks its own thread may hold), and a service may beat
    on every turn of its loop, far too often for the pipe. Each slot has one writer.
    """

    SLOTS = 4
    _BEAT, _EXECUTING, _ESCALATING, _OUTSIDE_SIGTERM = range(SLOTS)

    def __init__(self, array: Any) -> None:
        self.array = array

    @property
    def beat(self) -> float:
        """When the service last called ``heartbeat()`` (0: never). Written by the child."""
        return float(self.array[self._BEAT])

    @beat.setter
    def beat(self, when: float) -> None:
        self.array[self._BEAT] = when

    @property
    def executing(self) -> float:
        """When ``execute`` began (0: not yet); a hang is counted from here. Written by the child."""
        return float(self.array[self._EXECUTING])

    @executing.setter
    def executing(self, when: float) -> None:
        self.array[self._EXECUTING] = when

    @property
    def escalating(self) -> bool:
        """The host is ending this child: its next SIGTERM raises ``Terminated``. Written by the host."""
        return bool(self.array[self._ESCALATING])

    @escalating.setter
    def escalating(self, value: bool) -> None:
        self.array[self._ESCALATING] = 1.0 if value else 0.0

    @property
    def outside_sigterm(self) -> float:
        """When a SIGTERM the host did not send asked the child to stop (0: none). Written by the child."""
        return float(self.array[self._OUTSIDE_SIGTERM])

    @outside_sigterm.setter
    def outside_sigterm(self, when: float) -> None:
        self.array[self._OUTSIDE_SIGTERM] = when
