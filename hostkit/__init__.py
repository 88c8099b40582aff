"""hostkit: the .NET Generic Host for synchronous Python.

Hosted services, background services in a thread or a child process, one
cancellation model, graceful shutdown within a deadline, restart policies and a
status snapshot.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._fastadd import remembered_paths as _remembered_paths
from ._lateloguru import in_multiprocess_child as _in_multiprocess_child
from ._lateloguru import when_imported as _when_imported

if TYPE_CHECKING:
    from . import exceptions as exceptions
    from ._builder import HostBuilder as HostBuilder
    from ._cron import CronTimer as CronTimer
    from ._cron import ScheduledService as ScheduledService
    from ._di import Scope as Scope
    from ._di import ServiceCollection as ServiceCollection
    from ._di import ServiceProvider as ServiceProvider
    from ._host import ExitCode as ExitCode
    from ._host import Host as Host
    from ._hostaware import HostAware as HostAware
    from ._hosting import HostServiceCollection as HostServiceCollection
    from ._lifetime import ApplicationLifetime as ApplicationLifetime
    from ._logging import configure_logging as configure_logging
    from ._once import OncePerDeployment as OncePerDeployment
    from ._options import HostOptions as HostOptions
    from ._options import RestartPolicy as RestartPolicy
    from ._periodic import PeriodicTimer as PeriodicTimer
    from ._reloading import ReloadReport as ReloadReport
    from ._reloading import ServiceReload as ServiceReload
    from ._services import BackgroundService as BackgroundService
    from ._services import HostedService as HostedService
    from ._services import Placement as Placement
    from ._services import Replica as Replica
    from ._status import HostState as HostState
    from ._status import HostStatus as HostStatus
    from ._status import LockStatus as LockStatus
    from ._status import ServiceState as ServiceState
    from ._status import ServiceStatus as ServiceStatus
    from ._token import CancellationToken as CancellationToken
    from ._token import CancellationTokenRegistration as CancellationTokenRegistration
    from ._token import CancellationTokenSource as CancellationTokenSource

__version__ = "0.1.0"

__all__ = [
    "ApplicationLifetime",
    "BackgroundService",
    "CancellationToken",
    "CancellationTokenRegistration",
    "CancellationTokenSource",
    "CronTimer",
    "ExitCode",
    "Host",
    "HostAware",
    "HostBuilder",
    "HostOptions",
    "HostServiceCollection",
    "HostState",
    "HostStatus",
    "HostedService",
    "LockStatus",
    "OncePerDeployment",
    "PeriodicTimer",
    "Placement",
    "ReloadReport",
    "Replica",
    "RestartPolicy",
    "ScheduledService",
    "Scope",
    "ServiceCollection",
    "ServiceProvider",
    "ServiceReload",
    "ServiceState",
    "ServiceStatus",
    "configure_logging",
]

# Each public name is imported from its module on first use (PEP 562), so
# `from hostkit import BackgroundService` (what a service module, and so a spawned
# child, imports) does not import the host, loguru, psutil or tenacity.
_SOURCES: dict[str, str] = {
    "ApplicationLifetime": "._lifetime",
    "BackgroundService": "._services",
    "CancellationToken": "._token",
    "CancellationTokenRegistration": "._token",
    "CancellationTokenSource": "._token",
    "CronTimer": "._cron",
    "ExitCode": "._host",
    "Host": "._host",
    "HostAware": "._hostaware",
    "HostBuilder": "._builder",
    "HostOptions": "._options",
    "HostServiceCollection": "._hosting",
    "HostState": "._status",
    "HostStatus": "._status",
    "HostedService": "._services",
    "LockStatus": "._status",
    "OncePerDeployment": "._once",
    "PeriodicTimer": "._periodic",
    "Placement": "._services",
    "ReloadReport": "._reloading",
    "Replica": "._services",
    "RestartPolicy": "._options",
    "ScheduledService": "._cron",
    "Scope": "._di",
    "ServiceCollection": "._di",
    "ServiceProvider": "._di",
    "ServiceReload": "._reloading",
    "ServiceState": "._status",
    "ServiceStatus": "._status",
    "configure_logging": "._logging",
}

#: Old public spellings, kept for one release: each use warns and names the new one.
_DEPRECATED: dict[str, str] = {"Registration": "CancellationTokenRegistration"}


def _load(source: str) -> None:
    """Import ``source`` and publish every public name it defines, as ``hostkit.<name>``.

    The objects keep the ``__module__`` of the module that defines them (so
    ``inspect.getsource`` and pickling find them there); the docs document them
    under ``hostkit`` (``automodule:: hostkit`` with ``:imported-members:``).
    """
    module = importlib.import_module(source, __name__)
    for name, where in _SOURCES.items():
        if where == source:
            globals()[name] = getattr(module, name)


# Hidden from type checkers: they see the names imported above, and flag any other.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        new = _DEPRECATED.get(name)
        if new is not None:
            import warnings

            warnings.warn(
                f"hostkit.{name} is deprecated and will be removed in the next release: use hostkit.{new}",
                DeprecationWarning,
                stacklevel=2,
            )
            return __getattr__(new)
        source = _SOURCES.get(name)
        if source is not None:
            _load(source)
            return globals()[name]
        if name == "exceptions":
            # Always reachable as an attribute, as when the package imported it eagerly.
            return importlib.import_module(".exceptions", __name__)
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, "exceptions"})


# A library never writes logs anywhere on its own (loguru's recipe for libraries):
# configure_logging(), called by Host.run() and `hostkit run`, enables them; so does
# the application's own logger.enable("hostkit").
def _disable_own_logger() -> None:
    from loguru import logger

    logger.disable("hostkit")


if _in_multiprocess_child():
    # The fork server or a process-placed child: loguru is imported only if something
    # here uses it (a service that logs), and hostkit's logger is disabled as it is.
    _when_imported(_disable_own_logger)
else:
    # In a host, loguru is imported here, before any hostkit code can log. It adds its
    # default sink as it is imported, paying the per-sink set-up that hostkit._fastadd
    # remembers: paid once, it fills that memo too (when loguru was not imported before
    # hostkit).
    with _remembered_paths():
        import loguru as _loguru  # noqa: F401
    _disable_own_logger()
