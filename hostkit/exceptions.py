"""Every error hostkit raises.

Each class derives from :class:`HostkitError` *and* from the standard-library
exception it resembles, so code that already catches ``TypeError`` or
``LookupError`` keeps working::

    HostkitError
    ├── InvalidServiceError        (TypeError)     not a service / no execute / bad placement
    ├── ConfigurationError         (ValueError)    an option with a wrong value
    │   └── ConfigurationTypeError (TypeError)     an option of the wrong type
    ├── HostStateError             (RuntimeError)  a call in the wrong host state
    ├── NotBuiltError              (AttributeError, TypeError)  a Host call on a HostBuilder
    ├── HostStartupError           (RuntimeError)  a service's start failed; names it
    │   └── StartupTimeoutError    (TimeoutError)  start-up passed ``startup_timeout``
    ├── OperationCancelledError    (concurrent.futures.CancelledError)
    ├── ServicePicklingError       (TypeError)     a process-placed service cannot cross
    ├── RemoteServiceError         (RuntimeError)  a child raised an unpicklable error
    ├── ChildProcessDiedError      (RuntimeError)  a child ended by a signal or os._exit
    ├── ServiceHungError           (TimeoutError)  a service missed its heartbeat_timeout
    ├── MemoryLimitError           (MemoryError)   a child passed its memory_limit
    ├── SupervisorError            (RuntimeError)  the restart machinery failed (a hostkit bug)
    ├── ProbeListenerError         (OSError)       the health probe port cannot be bound
    ├── SystemdNotifyError         (OSError)       NOTIFY_SOCKET cannot be used
    ├── UnsafePathError            (PermissionError) another user could tamper with a file
    ├── ChannelFullError           (queue.Full)    a channel refused an item: full
    ├── ChannelClosedError         (RuntimeError)  a channel was closed
    ├── PayloadError               (TypeError)     a queue payload cannot be encoded or decoded
    └── dependency injection
        ├── ServiceNotFoundError   (LookupError)
        ├── CaptiveDependencyError (TypeError)
        ├── CircularDependencyError(TypeError)
        └── ScopeError             (RuntimeError)
"""

from __future__ import annotations

import concurrent.futures
import queue

__all__ = [
    "CaptiveDependencyError",
    "ChannelClosedError",
    "ChannelFullError",
    "ChildProcessDiedError",
    "CircularDependencyError",
    "ConfigurationError",
    "ConfigurationTypeError",
    "HostStartupError",
    "HostStateError",
    "HostkitError",
    "InvalidServiceError",
    "MemoryLimitError",
    "NotBuiltError",
    "OperationCancelledError",
    "PayloadError",
    "ProbeListenerError",
    "RemoteServiceError",
    "ScopeError",
    "ServiceHungError",
    "ServiceNotFoundError",
    "ServicePicklingError",
    "StartupTimeoutError",
    "SupervisorError",
    "SystemdNotifyError",
    "UnsafePathError",
]


class HostkitError(Exception):
    """Base class of every error raised by hostkit."""


class InvalidServiceError(HostkitError, TypeError):
    """Something registered as a service is not one, or is registered wrongly."""


class ConfigurationError(HostkitError, ValueError):
    """An option or argument has a value hostkit cannot use."""


class ConfigurationTypeError(ConfigurationError, TypeError):
    """An option or argument has the wrong type, like ``"30"`` where seconds were expected.

    Both a :class:`ConfigurationError` and a ``TypeError``.

    .. versionadded:: 0.1
    """


class HostStateError(HostkitError, RuntimeError):
    """A host method was called in a state that does not allow it."""


class NotBuiltError(HostkitError, AttributeError, TypeError):
    """A :class:`~hostkit.Host` method (``run``, ``start``, ``with``...) was called on a :class:`~hostkit.HostBuilder`.

    The builder only collects registrations; ``builder.build()`` makes the host.
    An ``AttributeError`` (``builder.run()``, ``hasattr(builder, "run")`` is
    ``False``) and a ``TypeError`` (``with builder:``), as Python's own errors for
    those mistakes are.

    .. versionadded:: 0.1
    """


class HostStartupError(HostkitError, RuntimeError):
    """A hosted service failed to start; the host rolled back what had started.

    Attributes:
        service: the name of the service whose start failed.
    """

    def __init__(self, message: str, *, service: str) -> None:
        super().__init__(message)
        self.service = service


class StartupTimeoutError(HostStartupError, TimeoutError):
    """Start-up did not finish within ``HostOptions.startup_timeout``."""


class OperationCancelledError(HostkitError, concurrent.futures.CancelledError):
    """Raised by :meth:`CancellationToken.raise_if_cancelled` once the token is set."""


class ServicePicklingError(HostkitError, TypeError):
    """A process-placed service (or one of its attributes) cannot be sent to a child."""


class RemoteServiceError(HostkitError, RuntimeError):
    """An exception raised in a child that could not itself be sent back."""


class ChildProcessDiedError(HostkitError, RuntimeError):
    """A service's child process ended without reporting: a signal or ``os._exit``.

    Attributes:
        exitcode: the child's exit code; negative for a signal (as in ``multiprocessing``).
    """

    def __init__(self, message: str, *, exitcode: int | None) -> None:
        super().__init__(message)
        self.exitcode = exitcode


class ServiceHungError(HostkitError, TimeoutError):
    """A service sent no ``heartbeat()`` within its ``heartbeat_timeout``: it counts as hung.

    .. versionadded:: 0.1
    """


class MemoryLimitError(HostkitError, MemoryError):
    """A process-placed service's child passed its ``memory_limit`` (RSS) and was stopped.

    .. versionadded:: 0.1
    """


class SupervisorError(HostkitError, RuntimeError):
    """The machinery that runs and restarts a background service failed, not the service.

    A bug in hostkit: the service is no longer supervised, so it is marked faulted
    and the host applies ``on_background_error``. Its ``__cause__`` is the original
    error; the log line at CRITICAL carries its traceback. Please report it.

    .. versionadded:: 0.1
    """


class ChannelFullError(HostkitError, queue.Full):
    """A :class:`~hostkit.channels.Channel` was full: ``full_mode="raise"``, or ``"wait"`` timed out.

    .. versionadded:: 0.1
    """


class ChannelClosedError(HostkitError, RuntimeError):
    """A :class:`~hostkit.channels.Channel` was closed: no more items go in; ``get`` on an empty one ends.

    .. versionadded:: 0.1
    """


class PayloadError(HostkitError, TypeError):
    """A durable-queue payload cannot be encoded (at enqueue, before anything is written) or decoded.

    .. versionadded:: 0.1
    """


class ProbeListenerError(HostkitError, OSError):
    """The health probe listener cannot listen where it was told (port in use, bad address).

    .. versionadded:: 0.1
    """


class SystemdNotifyError(HostkitError, OSError):
    """The socket named in ``NOTIFY_SOCKET`` cannot be reached or written to.

    .. versionadded:: 0.1
    """


class UnsafePathError(HostkitError, PermissionError):
    """A file hostkit keeps for itself (a lock, a snapshot) is where another local user could tamper with it.

    A symbolic link or another user's file in its place, or a directory others may
    write: hostkit refuses it instead of following or trusting it. The message names
    the path and the fix.

    .. versionadded:: 0.1
    """


class ServiceNotFoundError(HostkitError, LookupError):
    """A type was resolved that nothing registered."""


class CaptiveDependencyError(HostkitError, TypeError):
    """A singleton depends, directly or through a chain, on a scoped service."""


class CircularDependencyError(HostkitError, TypeError):
    """Services depend on each other in a cycle."""


class ScopeError(HostkitError, RuntimeError):
    """A scoped service was resolved outside a scope, or a scope was used after it closed."""
