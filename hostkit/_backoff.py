"""Back-off on tenacity: the strategies a restart policy and a queue consumer are built from.

Every wait in hostkit is a tenacity wait strategy, so a user who knows tenacity can
pass one wherever a back-off is accepted (``RestartPolicy(wait=...)``,
``QueueConsumer(backoff=..., reconnect_backoff=...)``), and hostkit's defaults are
tenacity's own strategies combined::

    RestartPolicy(backoff=0.5, multiplier=2, backoff_max=30, jitter=0.25)
        == wait_exponential(multiplier=0.5, exp_base=2, max=30) + wait_random(0, 0.25)

Waits run inside a ``tenacity.Retrying`` loop (the supervisor, the broker link),
which sleeps on the stopping token (``sleep=token.wait``) and stops on it
(``stop_when_event_set(token)``: a token is a ``threading.Event``), so a stop ends a
back-off at once. A queue message's retry is the exception: its attempts are
counted by the queue, across deliveries and processes, so no loop is alive to ask;
:func:`wait_after` evaluates the strategy for that attempt number.

tenacity is imported by this module: import it only where a back-off is needed, so
a host without restart policies never loads tenacity.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable

import tenacity

from ._validate import describe, to_seconds
from .exceptions import ConfigurationError

#: What a back-off option holds: a tenacity wait strategy, or any function of the call state.
Wait = tenacity.wait.wait_base | Callable[[tenacity.RetryCallState], float]

__all__ = [
    "Wait",
    "exponential_backoff",
    "stop_after_failures_in_window",
    "wait_after",
    "wait_or_seconds",
    "wait_random_from",
]


class wait_random_from(tenacity.wait_random):
    """``tenacity.wait_random(min, max)`` drawing from ``rng`` (a ``random.random``-like function).

    The restart supervisor takes its random source as a parameter, so its jitter
    can be checked exactly; with the default source this is ``wait_random``.
    """

    def __init__(self, min: float = 0, max: float = 1, rng: Callable[[], float] = random.random) -> None:
        super().__init__(min, max)
        self.rng = rng

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return float(self.wait_random_min + self.rng() * (self.wait_random_max - self.wait_random_min))


def exponential_backoff(first: float, multiplier: float, cap: float) -> tenacity.wait.wait_base:
    """``first * multiplier ** (attempt - 1)``, at most ``cap``, as a tenacity strategy.

    ``wait_exponential`` when it grows; a fixed wait when it cannot (a first step of
    0, or a multiplier of 1). A zero first step is kept at zero however many
    attempts: tenacity's exponential answers its ``max`` once the power overflows a
    float, which would turn "no back-off" into ``cap`` after about a thousand failures.
    """
    if first == 0:
        return tenacity.wait_none()
    if multiplier == 1:
        return tenacity.wait_fixed(min(first, cap))
    return tenacity.wait_exponential(multiplier=first, exp_base=multiplier, max=cap)


def wait_or_seconds(value: object, what: str, *, default: Wait) -> Wait:
    """A back-off option's value as a tenacity wait: a strategy as it is, seconds fixed, ``None`` the default.

    Raises:
        ConfigurationError: neither, naming ``what``.
    """
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return tenacity.wait_fixed(to_seconds(value, what))
    if not callable(value):
        msg = f"{what} must be a tenacity wait strategy or seconds, not: {describe(value)}"
        raise ConfigurationError(msg)
    return value  # type: ignore[return-value,unused-ignore]


def wait_after(wait: tenacity.wait.wait_base | Callable[[tenacity.RetryCallState], float], attempt: int) -> float:
    """Seconds ``wait`` asks for after failed attempt number ``attempt`` (1-based), at least 0.

    For an attempt count kept outside a live retry loop (a queue message's
    deliveries). The call state given to the strategy belongs to a real
    ``tenacity.Retrying`` using that strategy, at that attempt.
    """
    retrying = tenacity.Retrying(wait=wait)
    state = tenacity.RetryCallState(retrying, fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return max(float(wait(state)), 0.0)


class stop_after_failures_in_window(tenacity.stop.stop_base):
    """Stop after more than ``limit`` failures within the last ``window`` seconds.

    tenacity's stops look at one retry loop (its attempts, its delay since the
    first); a restart policy limits failures over a sliding window instead. The
    strategy is asked once per failure the loop would retry, so it counts them as
    it is asked, and keeps only those still inside the window.
    """

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self.failures: deque[float] = deque()

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        now = self.clock()
        self.failures.append(now)
        while self.failures and self.failures[0] < now - self.window:
            self.failures.popleft()
        return len(self.failures) > self.limit
