"""hostkit: the .NET Generic Host for synchronous Python.

Hosted services, background services in a thread or a child process, one
cancellation model, graceful shutdown within a deadline, restart policies and a
status snapshot.
"""

from __future__ import annotations

from loguru import logger

from ._builder import HostBuilder
from ._di import Scope, ServiceCollection, ServiceProvider
from ._host import ExitCode, Host
from ._lifetime import ApplicationLifetime
from ._logging import configure_logging
from ._once import OncePerDeployment
from ._options import HostOptions, RestartPolicy
from ._periodic import PeriodicTimer
from ._services import BackgroundService, HostedService, Placement
from ._status import HostState, HostStatus, ServiceState, ServiceStatus
from ._token import CancellationToken, CancellationTokenSource, Registration

__version__ = "0.1.0"

__all__ = [
    "ApplicationLifetime",
    "BackgroundService",
    "CancellationToken",
    "CancellationTokenSource",
    "ExitCode",
    "Host",
    "HostBuilder",
    "HostOptions",
    "HostState",
    "HostStatus",
    "HostedService",
    "OncePerDeployment",
    "PeriodicTimer",
    "Placement",
    "Registration",
    "RestartPolicy",
    "Scope",
    "ServiceCollection",
    "ServiceProvider",
    "ServiceState",
    "ServiceStatus",
    "configure_logging",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or callable(_obj):
        try:
            _obj.__module__ = "hostkit"
        except (AttributeError, TypeError):
            pass
del _name, _obj

# A library never writes logs anywhere on its own: configure_logging() (called by
# Host.run() and `hostkit run`) enables them.
logger.disable("hostkit")
