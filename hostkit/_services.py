"""The two service shapes: :class:`HostedService` and :class:`BackgroundService`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast, overload

if TYPE_CHECKING:
    from ._runners import Runner
    from ._token import CancellationToken

__all__ = [
    "LIFECYCLE_HOOKS",
    "BackgroundService",
    "HostedService",
    "Placement",
    "Replica",
    "class_overrides",
    "is_overridden",
]

#: Where a background service's ``execute`` runs.
Placement = Literal["thread", "process"]
PLACEMENTS: tuple[Placement, ...] = ("thread", "process")

#: Runners of background services started by hand (``service.start(token)``, no host), by
#: ``id(service)``: kept until ``stop()`` sees the run over. The runner holds its service,
#: so the id names no other object while it is listed.
_started_by_hand: dict[int, Runner] = {}

#: The lifecycle hooks, in the order the host calls them at start and at stop.
LIFECYCLE_HOOKS = ("starting", "started", "stopping", "stopped")


@dataclass(frozen=True)
class Replica:
    """Which of a registration's replicas a service is (``add_hosted_service(..., replicas=N)``).

    Read it as :attr:`BackgroundService.replica` inside ``execute`` (or any code it
    calls): in a child process as in a thread, each replica sees its own.

    Attributes:
        index: this replica's number, ``0`` to ``count - 1``; its status entry is ``Name[index]``.
        count: how many replicas the registration runs (its ``replicas=``).

    .. versionadded:: 0.2
    """

    index: int
    count: int


class _ReplicaOf:
    """``service.replica``: read through the runner table, never stored on the service.

    A non-data descriptor (no ``__set__``): a subclass that assigns its own
    ``self.replica`` keeps working, its attribute simply hides this one.
    """

    @overload
    def __get__(self, service: None, owner: type | None = None) -> _ReplicaOf: ...
    @overload
    def __get__(self, service: BackgroundService, owner: type | None = None) -> Replica | None: ...
    def __get__(self, service: BackgroundService | None, owner: type | None = None) -> Replica | _ReplicaOf | None:
        if service is None:
            return self
        from ._runner_table import runner_for

        runner = runner_for(service)
        return None if runner is None else runner.replica


class HostedService:
    """Work tied to the host's life: something to do at start and at stop.

    Override :meth:`start` and :meth:`stop`; both receive a token that is set when
    the host no longer wants to wait (``startup_timeout`` at start, the shared
    ``shutdown_timeout`` at stop). ``start`` must return promptly: long-running
    work belongs in a :class:`BackgroundService`.

    The optional hooks run around them, in the order of .NET's
    ``IHostedLifecycleService``: every service's ``starting``, then every
    ``start``, then every ``started``; at stop every ``stopping``, every ``stop``
    and every ``stopped``, in reverse registration order.

    .. versionadded:: 0.1
    """

    def start(self, token: CancellationToken) -> None:
        """Start the service; return promptly."""

    def stop(self, token: CancellationToken) -> None:
        """Stop the service; ``token`` is set when the shutdown budget runs out."""

    def starting(self, token: CancellationToken) -> None:
        """Hook: before any service's ``start``."""

    def started(self, token: CancellationToken) -> None:
        """Hook: after every service's ``start`` returned."""

    def stopping(self, token: CancellationToken) -> None:
        """Hook: when the stop begins, before any service's ``stop``."""

    def stopped(self, token: CancellationToken) -> None:
        """Hook: after every service's ``stop`` returned."""

    def reload(self, token: CancellationToken) -> None:
        """Hook: re-read configuration, reopen log files... while the service keeps running.

        Called on SIGHUP to ``Host.run()`` (``systemctl reload``) and by
        :meth:`Host.reload() <hostkit.Host.reload>`, on a thread of its own
        (``hostkit-<service>-reload``), while ``execute`` goes on: guard what both
        touch (build the new settings aside, then swap one attribute). A
        process-placed service gets the call in its child process.

        ``token`` is set when ``HostOptions.reload_timeout`` has passed or the host
        begins to stop; return then. An exception, or a call still running at the
        deadline, is logged at ERROR with the service's name and shows in the
        status (``reload_error``); the service and the host run on. A service that
        does not override it is not called at all, and keeps running untouched.

        .. versionadded:: 0.2
        """


class BackgroundService(HostedService):
    """A long-running loop: implement :meth:`execute`.

    The host runs ``execute(stopping)`` in the placement chosen at registration:
    a dedicated thread (``placement="thread"``) or a dedicated child process
    (``placement="process"``); the class does not change. ``execute`` must return
    soon after ``stopping`` is set: use ``stopping.wait(seconds)`` as its sleep.

    ``execute`` returning on its own marks the service *completed*; raising marks
    it *faulted* (after any restart policy), and the host applies
    ``HostOptions.on_background_error``.

    .. versionadded:: 0.1
    """

    def execute(self, stopping: CancellationToken) -> None:
        """The service's work. Return when ``stopping`` is set."""
        raise NotImplementedError

    #: Which replica this is, as a :class:`Replica` (``index`` and ``count``), for a service
    #: registered with ``replicas=N``; ``None`` without ``replicas=``, and outside a run
    #: (before the host attached its runner, after the run, or started by hand).
    #:
    #: .. versionadded:: 0.2
    replica = _ReplicaOf()

    def heartbeat(self) -> None:
        """Tell the host this service is making progress.

        Services registered with a ``heartbeat_timeout`` call this from their
        loop; a heartbeat older than the timeout counts as a hang.
        """
        from ._runners._base import runner_for

        runner = runner_for(self)
        if runner is not None:
            runner.heartbeat()

    def start(self, token: CancellationToken) -> None:
        """Launch ``execute`` in its placement and return at once.

        As in .NET, ``token`` is linked into ``execute``'s ``stopping`` token: if it
        is already cancelled, ``execute`` gets a cancelled token from its first line (a
        process-placed service starts no child at all); if it is cancelled later, also
        after ``start`` returned, ``stopping`` is set, and a child is asked to stop.

        Raises:
            TypeError: ``token`` is not a :class:`~hostkit.CancellationToken` (a plain
                ``threading.Event`` cannot tell anyone it was set, so it could not be linked).
        """
        from ._token import CancellationToken
        from ._util import describe

        if not isinstance(cast("object", token), CancellationToken):
            msg = f"start() needs a CancellationToken (a threading.Event cannot be linked), not: {describe(token)}"
            raise TypeError(msg)
        runner = self._runner()
        if token.is_set() and not runner.started:
            runner.request_stop()  # before the run begins, so execute never sees it unset
        runner.start()
        link = token.register(runner.request_stop)
        # Dropped when the run ends: a long-lived start token must not keep the runner alive.
        runner.ended.register(link.unregister)

    def stop(self, token: CancellationToken) -> None:
        """Set the service's ``stopping`` token and wait for ``execute`` to return.

        The wait ends early when ``token`` is set (the shutdown budget ran out).
        """
        from ._runners import Runner
        from ._runners._base import detach_runner, runner_for

        runner = runner_for(self)
        if not isinstance(runner, Runner):
            return
        runner.request_stop()
        if runner.wait(token) and _started_by_hand.get(id(self)) is runner:
            # The run is over: nothing asks for this runner any more; let it and the service go.
            detach_runner(self, runner)
            _started_by_hand.pop(id(self), None)

    def _runner(self) -> Runner:
        from ._runners import Runner, create_runner
        from ._runners._base import attach_runner, runner_for
        from ._status import ServiceRecord

        runner = runner_for(self)
        if not isinstance(runner, Runner):
            # Started by hand, without a host: this module owns the runner until stop()
            # sees the run over (a host owns its runners through its records).
            runner = create_runner(self, ServiceRecord.standalone(self))
            _started_by_hand[id(self)] = runner
            attach_runner(self, runner)
        return runner

    def __getstate__(self) -> dict[str, Any]:
        # Explicit (the default protocol's state, a copy of __dict__) so that subclasses can
        # narrow it with super().__getstate__(): the host pickles the service for its child.
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def is_overridden(service: HostedService, method: str) -> bool:
    """``True`` if ``service``'s class overrides ``method`` of hostkit's own classes."""
    return class_overrides(type(service), method)


def class_overrides(cls: type[HostedService], method: str) -> bool:
    """``True`` if ``cls`` overrides ``method`` of hostkit's own classes."""
    impl = getattr(cls, method, None)
    return impl is not getattr(HostedService, method) and impl is not getattr(BackgroundService, method, None)
