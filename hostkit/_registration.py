"""Hosted-service registrations, validated at ``add_hosted_service`` time (the earliest moment)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from ._options import RestartPolicy, check_start_method, seconds_option
from ._process.options import ProcessOptions
from ._services import PLACEMENTS, BackgroundService, HostedService, Placement
from ._util import describe
from .exceptions import ConfigurationError, ConfigurationTypeError, InvalidServiceError

__all__ = ["HostedServiceRegistration", "make_registration", "parse_bytes"]

_PROCESS_ONLY = ("start_method", "nice", "cpu_affinity", "memory_limit")
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
    placement: Placement | None
    restart: RestartPolicy | None = None
    heartbeat_timeout: float | None = None
    process_options: ProcessOptions = field(default_factory=ProcessOptions)

    @property
    def display_name(self) -> str:
        return self.service_class.__qualname__

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    @property
    def service_class(self) -> type[HostedService]:
        return self.service if isinstance(self.service, type) else type(self.service)


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
) -> HostedServiceRegistration:
    existing = list(existing)
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
    is_background = issubclass(cls, BackgroundService)
    if is_background and getattr(cls, "execute", None) is BackgroundService.execute:
        msg = (
            f"{cls.__qualname__} is a BackgroundService but does not implement execute(stopping); "
            f"add `def execute(self, stopping): ...` with the service's loop"
        )
        raise InvalidServiceError(msg)
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
    resolved_placement: Placement | None = (placement or "thread") if is_background else None
    if restart is not None and not isinstance(restart, RestartPolicy):
        msg = (
            f"add_hosted_service({cls.__qualname__}): restart= must be a hostkit.RestartPolicy or None, "
            f"not: {describe(restart)}"
        )
        raise ConfigurationTypeError(msg)
    if restart is not None and not is_background:
        msg = f"restart= applies to BackgroundService only; {cls.__qualname__} is a HostedService"
        raise ConfigurationError(msg)
    beat: float | None = None
    if heartbeat_timeout is not None:
        beat = seconds_option(heartbeat_timeout, f"add_hosted_service({cls.__qualname__}): heartbeat_timeout")
        if beat <= 0 or not is_background:
            msg = (
                f"add_hosted_service({cls.__qualname__}): heartbeat_timeout must be > 0 seconds and applies to "
                f"BackgroundService only, not: {describe(heartbeat_timeout)}"
            )
            raise ConfigurationError(msg)
    options = {k: v for k, v in process_options.items() if v is not None}
    if options and resolved_placement != "process":
        msg = (
            f"{', '.join(f'{k}=' for k in options)} applies to placement='process' only; "
            f"{cls.__qualname__} is registered with placement={resolved_placement!r}"
        )
        raise ConfigurationError(msg)
    checked = _check_process_options(options)
    if not isinstance(service, type):
        for reg in existing:
            if reg.service is service:
                msg = (
                    f"this {cls.__qualname__} instance is already registered (as {reg.name!r}); a service instance "
                    f"runs once per host. Register another instance, or the class, to run two"
                )
                raise ConfigurationError(msg)
    taken = {reg.name for reg in existing}
    if name is None:
        base = cls.__name__
        final, n = base, 1
        while final in taken:
            n += 1
            final = f"{base}-{n}"
    else:
        if not isinstance(name, str) or not name.strip():
            msg = f"name= must be a non-empty string, not: {describe(name)}"
            raise ConfigurationError(msg)
        if name in taken:
            msg = f"a hosted service named {name!r} is already registered; give each registration its own name="
            raise ConfigurationError(msg)
        final = name
    return HostedServiceRegistration(service, final, resolved_placement, restart, beat, checked)  # type: ignore[arg-type]


def _check_process_options(options: dict[str, Any]) -> ProcessOptions:
    """The given (not ``None``) ``placement="process"`` keywords, validated, as :class:`ProcessOptions`."""
    start_method = options.get("start_method")
    if start_method is not None:
        check_start_method(start_method, "start_method")
    nice = options.get("nice")
    if nice is not None and (not isinstance(nice, int) or isinstance(nice, bool) or not -20 <= nice <= 19):
        msg = f"nice must be an int from -20 to 19, not: {describe(nice)}"
        raise ConfigurationError(msg)
    affinity: tuple[int, ...] | None = None
    if options.get("cpu_affinity") is not None:
        cpus = options["cpu_affinity"]
        if isinstance(cpus, (str, bytes)) or not isinstance(cpus, Iterable):
            msg = f"cpu_affinity must be a non-empty set of CPU numbers, like {{0, 1}}, not: {describe(cpus)}"
            raise ConfigurationError(msg)
        cpus = sorted(set(cpus))
        if not cpus or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cpus):
            msg = (
                f"cpu_affinity must be a non-empty set of CPU numbers (ints >= 0), like {{0, 1}}, "
                f"not: {describe(options['cpu_affinity'])}"
            )
            raise ConfigurationError(msg)
        affinity = tuple(cpus)
    memory_limit = options.get("memory_limit")
    if memory_limit is not None:
        memory_limit = parse_bytes(memory_limit, "memory_limit")
    return ProcessOptions(start_method=start_method, nice=nice, cpu_affinity=affinity, memory_limit=memory_limit)
