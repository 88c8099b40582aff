"""Hosted-service registrations, validated at ``add_hosted_service`` time (the earliest moment)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from ._options import RestartPolicy, check_start_method, seconds_option
from ._process.options import CPU_PRIORITIES, ProcessOptions
from ._services import PLACEMENTS, BackgroundService, HostedService, Placement, Replica
from ._util import describe
from .exceptions import ConfigurationError, ConfigurationTypeError, InvalidServiceError

__all__ = ["HostedServiceRegistration", "ReplicaKey", "make_registration", "parse_bytes"]

_PROCESS_ONLY = ("start_method", "nice", "cpu_affinity", "memory_limit", "cpu_priority", "keep_cores")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


@dataclass
class HostedServiceRegistration:
    """What ``add_hosted_service`` recorded: the service and how to run it."""

    service: type[HostedService] | HostedService
    name: str
    #: Where a background service runs; ``None`` for a hosted service (see :attr:`is_background`).
    placement: Placement | None
    restart: RestartPolicy | None = None
    heartbeat_timeout: float | None = None
    process_options: ProcessOptions = field(default_factory=ProcessOptions)
    #: ``replicas=N``: N services run from this one registration; ``None`` when not given.
    replicas: int | None = None

    @property
    def display_name(self) -> str:
        return self.service_class.__qualname__

    def slots(self) -> list[tuple[str, Replica | None]]:
        """What the host runs from this registration: one ``(name, replica)`` per service.

        One slot named :attr:`name` without ``replicas=``; with ``replicas=N``, N slots
        named ``name[0]`` to ``name[N-1]``, each with its :class:`~hostkit.Replica`.
        """
        if self.replicas is None:
            return [(self.name, None)]
        return [(replica_name(self.name, i), Replica(i, self.replicas)) for i in range(self.replicas)]

    def container_key(self, replica: Replica | None) -> Any:
        """The key under which the host's container builds the service of one slot (a class registration).

        The registration itself, except for thread-placed replicas: each has its own
        singleton (:class:`ReplicaKey`), as each runs its own instance. A
        process-placed service is built in its child, by the child's own container,
        from the registration: every child builds its own.
        """
        if replica is None or self.placement == "process":
            return self
        return ReplicaKey(self, replica.index)

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    @property
    def service_class(self) -> type[HostedService]:
        return self.service if isinstance(self.service, type) else type(self.service)

    @property
    def is_background(self) -> bool:
        """A :class:`~hostkit.BackgroundService`: its work runs in a thread or a child (``placement``).

        Otherwise a plain hosted service, whose ``start``/``stop`` run on the host's thread.
        """
        return self.placement is not None

    @property
    def kind(self) -> Literal["hosted", "background"]:
        """``"background"`` or ``"hosted"``: what :attr:`is_background` says, as status shows it."""
        return "background" if self.is_background else "hosted"


@dataclass(frozen=True)
class ReplicaKey:
    """The container key of one thread-placed replica's own instance (a singleton per replica)."""

    registration: HostedServiceRegistration
    index: int

    @property
    def display_name(self) -> str:
        """How dependency errors name it: the class, and which replica."""
        return replica_name(self.registration.display_name, self.index)


def replica_name(name: str, index: int) -> str:
    """``Name[index]``: how a replica is named in status, logs and health."""
    return f"{name}[{index}]"


def parse_bytes(value: object, what: str) -> int:
    """``512_000_000``, ``"512MB"``, ``"1.5GiB"`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif (
        isinstance(value, str)
        and (m := re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value))
        and (m.group(2).lower() in _UNITS)
    ):
        number = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        msg = f"{what} must be a number of bytes or a string like '512MB' or '1GiB', not: {describe(value)}"
        raise ConfigurationError(msg)
    if number <= 0:
        msg = f"{what} must be > 0 bytes, not: {describe(value)}"
        raise ConfigurationError(msg)
    return number


def make_registration(
    service: object,
    *,
    existing: Iterable[HostedServiceRegistration],
    placement: str | None,
    restart: object,
    name: object,
    heartbeat_timeout: float | timedelta | None,
    process_options: dict[str, Any],
    replicas: object = None,
) -> HostedServiceRegistration:
    """Validate one ``add_hosted_service`` call and record it; each rule is one small check below."""
    existing = list(existing)
    cls = _service_class(service)
    is_background = issubclass(cls, BackgroundService)
    resolved_placement = _placement(cls, placement, is_background=is_background)
    _check_restart(cls, restart, is_background=is_background)
    beat = _heartbeat_timeout(cls, heartbeat_timeout, is_background=is_background)
    options = _process_options(cls, process_options, resolved_placement)
    count = _replicas(service, cls, replicas, resolved_placement)
    _check_not_registered(service, cls, existing)
    final_name = _unique_name(cls, name, existing, count)
    return HostedServiceRegistration(
        service,  # type: ignore[arg-type]
        final_name,
        resolved_placement,
        restart,  # type: ignore[arg-type]
        beat,
        options,
        replicas=count,
    )


def _service_class(service: object) -> type[HostedService]:
    """The service's class; a BackgroundService must implement ``execute``."""
    cls = service if isinstance(service, type) else type(service)
    if not (isinstance(cls, type) and issubclass(cls, HostedService)):
        if isinstance(service, type):
            hint = " Make the class subclass hostkit.HostedService (start/stop) or hostkit.BackgroundService (execute)."
        elif callable(service):
            hint = " To run a function, subclass hostkit.BackgroundService and call it from execute(stopping)."
        else:
            hint = ""
        msg = (
            f"add_hosted_service() needs a HostedService or BackgroundService subclass or instance, "
            f"not: {describe(service)}.{hint}"
        )
        raise InvalidServiceError(msg)
    if issubclass(cls, BackgroundService) and getattr(cls, "execute", None) is BackgroundService.execute:
        msg = (
            f"{cls.__qualname__} is a BackgroundService but does not implement execute(stopping); "
            f"add `def execute(self, stopping): ...` with the service's loop"
        )
        raise InvalidServiceError(msg)
    return cls


def _placement(cls: type, placement: str | None, *, is_background: bool) -> Placement | None:
    """Where a background service runs (default ``"thread"``); ``None`` for a hosted service."""
    if placement is not None and placement not in PLACEMENTS:
        msg = (
            f"add_hosted_service({cls.__qualname__}): placement must be one of "
            f"{', '.join(map(repr, PLACEMENTS))}, not: {describe(placement)}"
        )
        raise ConfigurationError(msg)
    if placement is not None and not is_background:
        msg = (
            f"placement={placement!r} applies to BackgroundService only; {cls.__qualname__} is a HostedService "
            f"whose start/stop run on the host's thread. Make it a BackgroundService to place its work"
        )
        raise ConfigurationError(msg)
    return (placement or "thread") if is_background else None


def _check_restart(cls: type, restart: object, *, is_background: bool) -> None:
    if restart is not None and not isinstance(restart, RestartPolicy):
        msg = (
            f"add_hosted_service({cls.__qualname__}): restart= must be a hostkit.RestartPolicy or None, "
            f"not: {describe(restart)}"
        )
        raise ConfigurationTypeError(msg)
    if restart is not None and not is_background:
        msg = f"restart= applies to BackgroundService only; {cls.__qualname__} is a HostedService"
        raise ConfigurationError(msg)


def _heartbeat_timeout(cls: type, value: float | timedelta | None, *, is_background: bool) -> float | None:
    if value is None:
        return None
    beat = seconds_option(value, f"add_hosted_service({cls.__qualname__}): heartbeat_timeout")
    if beat <= 0 or not is_background:
        msg = (
            f"add_hosted_service({cls.__qualname__}): heartbeat_timeout must be > 0 seconds and applies to "
            f"BackgroundService only, not: {describe(value)}"
        )
        raise ConfigurationError(msg)
    return beat


def _process_options(cls: type, given: dict[str, Any], placement: Placement | None) -> ProcessOptions:
    """The process options that were given, checked and normalised; only ``placement="process"`` takes them."""
    options = {k: v for k, v in given.items() if v is not None}
    if options and placement != "process":
        msg = (
            f"{', '.join(f'{k}=' for k in options)} applies to placement='process' only; "
            f"{cls.__qualname__} is registered with placement={placement!r}"
        )
        raise ConfigurationError(msg)
    return _check_process_options(options)


def _check_not_registered(service: object, cls: type, existing: list[HostedServiceRegistration]) -> None:
    """A service *instance* runs once per host (a class may be registered several times)."""
    if isinstance(service, type):
        return
    for reg in existing:
        if reg.service is service:
            msg = (
                f"this {cls.__qualname__} instance is already registered (as {reg.name!r}); a service instance "
                f"runs once per host. Register another instance, or the class, to run two"
            )
            raise ConfigurationError(msg)


def _replicas(service: object, cls: type, replicas: object, placement: Placement | None) -> int | None:
    """``replicas=`` checked: an int >= 1 for a background service that can run N times, or ``None``."""
    if replicas is None:
        return None
    what = f"add_hosted_service({cls.__qualname__}): replicas"
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        msg = f"{what} must be an int >= 1 (how many copies of the service run), not: {describe(replicas)}"
        raise ConfigurationError(msg)
    if placement is None:
        msg = (
            f"{what}= applies to BackgroundService only; {cls.__qualname__} is a HostedService whose start/stop "
            f"run once on the host's thread. Make it a BackgroundService to run several copies of its work"
        )
        raise ConfigurationError(msg)
    if replicas == 1:
        return replicas
    from ._once import OncePerDeployment

    if issubclass(cls, OncePerDeployment):
        msg = (
            f"{what}={replicas} with OncePerDeployment: it runs its service in one process of the machine at "
            f"a time, so {replicas - 1} of the {replicas} replicas would only ever wait for the lock. Drop "
            f"replicas= (one copy, held once per deployment), or drop OncePerDeployment to run {replicas} copies"
        )
        raise ConfigurationError(msg)
    if placement == "thread" and not isinstance(service, type):
        msg = (
            f"{what}={replicas} with placement='thread' needs the class, not an instance: each replica runs its "
            f"own instance, which the container builds (one singleton per replica). Register the class, "
            f"add_hosted_service({cls.__qualname__}, replicas={replicas}), or use placement='process', where "
            f"every child gets its own copy of the instance"
        )
        raise ConfigurationError(msg)
    return replicas


def _taken_names(existing: list[HostedServiceRegistration]) -> set[str]:
    """Every name a status entry has, and every replicated registration's own name."""
    taken = set()
    for reg in existing:
        taken.add(reg.name)
        taken.update(slot for slot, _ in reg.slots())
    return taken


def _names(base: str, replicas: int | None) -> set[str]:
    return {base} | ({replica_name(base, i) for i in range(replicas)} if replicas is not None else set())


def _unique_name(cls: type, name: object, existing: list[HostedServiceRegistration], replicas: int | None) -> str:
    """The given name (which must be free), or the class name numbered past those taken.

    With ``replicas=N`` the name is the registration's, and ``name[0]`` to
    ``name[N-1]`` are its services': all of them must be free.
    """
    taken = _taken_names(existing)
    if name is None:
        final, n = cls.__name__, 1
        while _names(final, replicas) & taken:
            n += 1
            final = f"{cls.__name__}-{n}"
        return final
    if not isinstance(name, str) or not name.strip():
        msg = f"name= must be a non-empty string, not: {describe(name)}"
        raise ConfigurationError(msg)
    clash = sorted(_names(name, replicas) & taken)
    if clash:
        which = f"{name!r}" if clash == [name] else ", ".join(map(repr, clash))
        msg = f"a hosted service named {which} is already registered; give each registration its own name="
        raise ConfigurationError(msg)
    return name


def _check_process_options(options: dict[str, Any]) -> ProcessOptions:
    """The given (not ``None``) ``placement="process"`` keywords, validated, as :class:`ProcessOptions`."""
    start_method = options.get("start_method")
    if start_method is not None:
        check_start_method(start_method, "start_method")
    nice = options.get("nice")
    if nice is not None:
        _check_nice(nice)
    cpus = options.get("cpu_affinity")
    affinity = None if cpus is None else tuple(_cpu_set(cpus))
    memory_limit = options.get("memory_limit")
    if memory_limit is not None:
        memory_limit = parse_bytes(memory_limit, "memory_limit")
    priority = options.get("cpu_priority")
    if priority is not None:
        _check_cpu_priority(priority, nice)
    keep = options.get("keep_cores")
    if keep is not None:
        _check_keep_cores(keep, affinity)
    return ProcessOptions(
        start_method=start_method,
        nice=nice,
        cpu_affinity=affinity,
        memory_limit=memory_limit,
        cpu_priority=priority,
        keep_cores=keep,
    )


def _check_cpu_priority(priority: object, nice: int | None) -> None:
    if not isinstance(priority, str) or priority not in CPU_PRIORITIES:
        names = ", ".join(f"{name!r} ({what})" for name, what in CPU_PRIORITIES.items())
        msg = f"cpu_priority must be one of {names}; not: {describe(priority)}"
        raise ConfigurationError(msg)
    if nice is not None and priority != "batch":
        # Only SCHED_BATCH weighs a nice value of the user's choice: "low" is nice 19,
        # SCHED_IDLE ignores nice values, and "inherit" changes nothing.
        msg = (
            f"nice={nice} does not combine with cpu_priority={priority!r}; give nice= alone (a nice value under "
            f"the normal policy), or with cpu_priority='batch'"
        )
        raise ConfigurationError(msg)


def _check_keep_cores(keep: object, affinity: tuple[int, ...] | None) -> None:
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        msg = f"keep_cores must be an int >= 1 (how many of the host's CPUs to leave it), not: {describe(keep)}"
        raise ConfigurationError(msg)
    if affinity is not None:
        msg = (
            "keep_cores= and cpu_affinity= both choose the child's CPUs; give one: cpu_affinity= a fixed set, "
            "keep_cores= the host's CPUs at start less that many"
        )
        raise ConfigurationError(msg)


def _check_nice(nice: object) -> None:
    if not isinstance(nice, int) or isinstance(nice, bool) or not -20 <= nice <= 19:
        msg = f"nice must be an int from -20 to 19, not: {describe(nice)}"
        raise ConfigurationError(msg)


def _cpu_set(value: object) -> list[int]:
    """``cpu_affinity`` as a sorted list of distinct CPU numbers."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        msg = f"cpu_affinity must be a non-empty set of CPU numbers, like {{0, 1}}, not: {describe(value)}"
        raise ConfigurationError(msg)
    cpus = sorted(set(value))
    if not cpus or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cpus):
        msg = f"cpu_affinity must be a non-empty set of CPU numbers (ints >= 0), like {{0, 1}}, not: {describe(value)}"
        raise ConfigurationError(msg)
    return cpus
