"""Host options and restart policies, validated when they are made."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

from ._validate import describe, to_seconds
from .exceptions import ConfigurationError, ConfigurationTypeError

if TYPE_CHECKING:
    from collections.abc import Callable

    import tenacity

__all__ = ["BackgroundErrorBehavior", "HostOptions", "RestartPolicy"]

BackgroundErrorBehavior = Literal["stop_host", "ignore"]
_ERROR_BEHAVIORS = ("stop_host", "ignore")
_START_METHODS = ("forkserver", "spawn", "fork")


def _seconds(value: float | timedelta | None, what: str) -> float | None:
    return to_seconds(value, what, allow_none=True)


#: The name other modules import; durations are checked in :mod:`hostkit._validate`.
seconds_option = to_seconds


@dataclass
class HostOptions:
    """How a :class:`~hostkit.Host` starts and stops.

    Attributes:
        shutdown_timeout: the one budget, in seconds, that the whole stop shares
            (default 30). A slow service eats into it; it never adds to it.
        startup_timeout: how long start-up may take, in seconds; ``None`` (the
            default) waits as long as it takes. Past it, start-up fails naming the
            service that was starting.
        start_concurrently: call every service's ``start`` at once instead of in
            registration order.
        stop_concurrently: call every service's ``stop`` at once instead of in
            reverse registration order.
        on_background_error: ``"stop_host"`` (default) stops the host with a
            non-zero exit code when a background service fails for good;
            ``"ignore"`` marks it faulted and keeps the rest running.
        start_method: how process-placed services start their child
            (``"forkserver"`` by default, ``"spawn"``, or ``"fork"`` as an opt-in).
        configure_logging: let ``Host.run()`` call :func:`hostkit.configure_logging`
            when nothing configured hostkit's logging yet (default ``True``). Set
            ``False`` when your application manages loguru's sinks itself.
        embedded_logging: while a host started without ``run()`` (``with host:``,
            ``host.start()``, Flask, Django, gunicorn) is running, send hostkit's own
            records (start, stop, failures with their tracebacks) to the stdlib
            logger ``"hostkit"``, so the application's ``logging`` configuration
            applies; with no stdlib handler at all they go to stderr, INFO and up
            (default ``True``). Nothing is added when :func:`hostkit.configure_logging`
            was called or the application configured loguru. ``False``: hostkit's
            lines stay off.
        reload_timeout: how long a reload (SIGHUP to ``run()``, ``Host.reload()``)
            may take, in seconds (default 10). Every service's ``reload`` runs at
            once and shares it; one still running at the end is reported as timed
            out and left behind (see :meth:`HostedService.reload <hostkit.HostedService.reload>`).

    Raises:
        ConfigurationError: a value has the wrong type or range (also a ``ValueError``),
            when the options are made and when a field is assigned later. Durations
            must be finite, at most 365 days.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``reload_timeout``.
    """

    shutdown_timeout: float | timedelta = 30.0
    startup_timeout: float | timedelta | None = None
    start_concurrently: bool = False
    stop_concurrently: bool = False
    on_background_error: BackgroundErrorBehavior = "stop_host"
    start_method: str = "forkserver"
    configure_logging: bool = True
    embedded_logging: bool = True
    reload_timeout: float | timedelta = 10.0

    def __setattr__(self, name: str, value: object) -> None:
        # Checked on every assignment, not only when made: `hostkit run --shutdown-timeout`
        # and the Django command set the budget on a host that is already built, and a
        # value that slipped through would only fail in the middle of the stop.
        super().__setattr__(name, _check_host_option(name, value))

    @property
    def shutdown_seconds(self) -> float:
        """``shutdown_timeout`` as a float number of seconds."""
        return float(self.shutdown_timeout)  # type: ignore[arg-type]

    @property
    def reload_seconds(self) -> float:
        """``reload_timeout`` as a float number of seconds."""
        return float(self.reload_timeout)  # type: ignore[arg-type]

    @property
    def startup_seconds(self) -> float | None:
        """``startup_timeout`` as a float number of seconds, or ``None``."""
        return None if self.startup_timeout is None else float(self.startup_timeout)  # type: ignore[arg-type]


_FLAGS = ("start_concurrently", "stop_concurrently", "configure_logging", "embedded_logging")


def _check_host_option(name: str, value: object) -> object:
    """``value`` for ``HostOptions.<name>``, converted (durations to seconds), or a clear error."""
    what = f"HostOptions.{name}"
    if name == "shutdown_timeout":
        return _seconds(value, what) or 0.0  # type: ignore[arg-type]
    if name == "startup_timeout":
        return _seconds(value, what)  # type: ignore[arg-type]
    if name == "reload_timeout":
        # > 0: a zero deadline would report every reload as timed out before it could begin.
        return to_seconds(value, what, allow_zero=False)  # type: ignore[call-overload]
    if name == "on_background_error" and value not in _ERROR_BEHAVIORS:
        msg = f"{what} must be one of {', '.join(map(repr, _ERROR_BEHAVIORS))}, not: {describe(value)}"
        raise ConfigurationError(msg)
    if name == "start_method":
        check_start_method(value, what)
    if name in _FLAGS and not isinstance(value, bool):
        msg = f"{what} must be True or False, not: {describe(value)}"
        raise ConfigurationTypeError(msg)
    return value


def check_start_method(method: object, what: str) -> str:
    """Validate a multiprocess start method name."""
    if method not in _START_METHODS:
        msg = f"{what} must be one of {', '.join(map(repr, _START_METHODS))}, not: {describe(method)}"
        raise ConfigurationError(msg)
    return str(method)


@dataclass(frozen=True)
class RestartPolicy:
    """When and how fast a failed background service is restarted.

    A failure is an exception from ``execute`` (or, for a process-placed service,
    its child dying, passing its memory ceiling or missing its heartbeat). The
    service is restarted after a back-off, at most
    ``max_restarts`` times within any ``window`` seconds; one more failure than
    that and the policy gives up, and the host applies ``on_background_error``.
    A run that lasted ``reset_after`` seconds or more resets the back-off.
    The back-off wait ends at once when a stop is requested, and no restart
    begins after that.

    The back-off is a tenacity wait strategy, called with the number of
    consecutive failures as its attempt number. By default it is exponential with
    jitter, built from ``backoff``, ``multiplier``, ``backoff_max`` and ``jitter``::

        tenacity.wait_exponential(multiplier=backoff, exp_base=multiplier, max=backoff_max)
            + tenacity.wait_random(0, jitter)

    Pass ``wait=`` to use any other tenacity strategy instead, e.g.
    ``RestartPolicy(wait=tenacity.wait_fixed(1))`` or
    ``RestartPolicy(wait=tenacity.wait_exponential_jitter(initial=1, max=60))``.

    With ``max_restarts=None`` the service is restarted after every failure, with
    no end: the back-off grows to ``backoff_max`` and stays there, however many
    failures follow.

    Attributes:
        max_restarts: restarts allowed within ``window``; ``None`` for no limit.
        window: the sliding window, in seconds, for ``max_restarts``.
        backoff: the first back-off, in seconds; at most ``backoff_max``.
        backoff_max: the longest back-off, in seconds.
        multiplier: the back-off grows by this factor per consecutive failure (>= 1).
        jitter: up to this many seconds of random delay added to each back-off.
        reset_after: a run at least this long resets the back-off to its first step.
        wait: a tenacity wait strategy that replaces the one built from
            ``backoff``, ``backoff_max``, ``multiplier`` and ``jitter`` (which must
            then keep their defaults); ``None`` (default) builds that one.

    Raises:
        ConfigurationError: a value is of the wrong type, negative, not finite,
            longer than 365 days (the durations), ``backoff`` is longer than
            ``backoff_max``, or ``wait`` is not callable or comes with back-off numbers.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``wait=`` takes any tenacity wait strategy; the default is built from tenacity's.
    """

    max_restarts: int | None = 5
    window: float = 60.0
    backoff: float = 0.5
    backoff_max: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.25
    reset_after: float = 60.0
    wait: tenacity.wait.wait_base | Callable[[tenacity.RetryCallState], float] | None = None

    def __post_init__(self) -> None:
        if self.max_restarts is not None and (
            not isinstance(self.max_restarts, int) or isinstance(self.max_restarts, bool) or self.max_restarts < 0
        ):
            msg = f"RestartPolicy.max_restarts must be an int >= 0 or None, not: {describe(self.max_restarts)}"
            raise ConfigurationError(msg)
        for name in ("window", "backoff", "backoff_max", "jitter", "reset_after"):
            object.__setattr__(self, name, _seconds(getattr(self, name), f"RestartPolicy.{name}"))
        multiplier: object = self.multiplier
        if (
            not isinstance(multiplier, (int, float))
            or isinstance(multiplier, bool)
            or not math.isfinite(multiplier)
            or multiplier < 1
        ):
            msg = f"RestartPolicy.multiplier must be a finite number >= 1, not: {describe(multiplier)}"
            raise ConfigurationError(msg)
        object.__setattr__(self, "multiplier", float(multiplier))
        if self.backoff > self.backoff_max:
            msg = (
                f"RestartPolicy.backoff ({self.backoff:g} s) is longer than backoff_max ({self.backoff_max:g} s), "
                f"so it could never be used; raise backoff_max too, e.g. "
                f"RestartPolicy(backoff={self.backoff:g}, backoff_max={max(self.backoff, 30.0):g})"
            )
            raise ConfigurationError(msg)
        if self.wait is not None:
            self._check_wait()

    def _check_wait(self) -> None:
        if not callable(self.wait):
            msg = (
                f"RestartPolicy.wait must be a tenacity wait strategy (e.g. tenacity.wait_fixed(1)), "
                f"not: {describe(self.wait)}"
            )
            raise ConfigurationError(msg)
        defaults = RestartPolicy()
        numbers = ("backoff", "backoff_max", "multiplier", "jitter")
        given = [n for n in numbers if getattr(self, n) != getattr(defaults, n)]
        if given:
            # Both would be a silent choice of one: the wait strategy replaces these numbers.
            msg = f"RestartPolicy.wait replaces {', '.join(given)}: give either wait= or the back-off numbers, not both"
            raise ConfigurationError(msg)

    def strategy(
        self, rng: Callable[[], float] | None = None
    ) -> tenacity.wait.wait_base | Callable[[tenacity.RetryCallState], float]:
        """The back-off as a tenacity wait strategy: ``wait``, or the one built from the numbers.

        Args:
            rng: the random source of the jitter (``random.random`` by default).
        """
        if self.wait is not None:
            return self.wait
        # Imported here: a host without restart policies never loads tenacity.
        from ._backoff import exponential_backoff, wait_random_from

        grown = exponential_backoff(self.backoff, self.multiplier, self.backoff_max)
        if self.jitter == 0:
            return grown
        return grown + (wait_random_from(0, self.jitter) if rng is None else wait_random_from(0, self.jitter, rng))

    def delay(self, consecutive_failures: int, random_fraction: float) -> float:
        """The back-off before restart number ``consecutive_failures`` (1-based).

        What :meth:`strategy` answers when its random source returns
        ``random_fraction`` (a ``wait=`` strategy is asked as it is). By default
        ``backoff * multiplier ** (consecutive_failures - 1)``, capped at
        ``backoff_max``, plus ``jitter * random_fraction``. Never overflows,
        however many failures.
        """
        from ._backoff import wait_after

        return wait_after(self.strategy(lambda: random_fraction), max(consecutive_failures, 1))
