"""The consumer's link to its queue's broker: up, or down with why and when the next try is.

One link per :class:`~hostkit.queues.QueueConsumer`, shared by its threads::

    connecting ──first lease ok──► up ──a lease, an ack, a renewal fails──► down
        │                           ▲                                         │ one thread probes: lease again
        └──a lease fails──► down ───┴────────────── a lease ok ◄──────────────┘ after 0.1 s, 0.2 s, ... 5 s

While the link is up every thread leases on its own. When a lease fails (or an
ack or a renewal meets an outage, see :meth:`Link.notice`), one thread becomes the
prober: it leases again after a capped, jittered back-off
(tenacity, sleeping on the consumer's stopping token, so a stop ends the wait at
once) and logs one WARNING per step; the other threads wait for the link instead
of each hammering the server and logging its own traceback. The first lease that
succeeds brings the link up, logs one INFO line, and the waiting threads resume.

A consumer starts ``connecting``, and its first lease goes through the prober: a
broker that is down at start-up and one that goes down mid-run take the same path.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import tenacity

from .._backoff import Wait
from .._summary import summarize_exception
from .._token import CancellationToken
from ..health import HealthCheckResult
from ._base import Message, Queue

__all__ = ["DETAIL_PREFIXES", "Jittered", "Link", "LinkSnapshot", "LinkState", "default_reconnect", "describe_failure"]

LinkState = Literal["connecting", "up", "down"]

#: Every status detail the link writes starts with one of these, so it clears only its own.
DETAIL_PREFIXES = ("broker unavailable: ", "leasing failed: ")


class Jittered(tenacity.wait.wait_base):
    """Another wait strategy, each step shortened at random by up to ``spread`` of it.

    Consumers of a fleet cut off by the same outage would otherwise retry in the
    same instants, all together, for as long as it lasts.
    """

    def __init__(self, inner: tenacity.wait.wait_base, spread: float = 0.2) -> None:
        self.inner = inner
        self.spread = spread

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return float(self.inner(retry_state)) * (1.0 - random.uniform(0.0, self.spread))


def default_reconnect() -> tenacity.wait.wait_base:
    """0.1 s doubling to 5 s, jittered."""
    return Jittered(tenacity.wait_exponential(multiplier=0.1, max=5.0))


@dataclass(frozen=True)
class LinkSnapshot:
    """The link now, for a health check or a status line."""

    state: LinkState
    error: BaseException | None
    tries: int
    down_for: float
    next_try_in: float | None
    outage: bool


class Link:
    """Whether the consumer reaches its broker; the back-off while it does not.

    Args:
        queue: the consumer's queue (it says which errors mean an outage).
        wait: the tenacity wait strategy between tries while the broker is down.
        name: the consumer's name, for log lines.
        on_change: called with a status detail while down (``None`` once up again).
    """

    def __init__(
        self,
        queue: Queue,
        wait: Wait,
        name: str,
        on_change: Callable[[str | None], None] | None = None,
    ) -> None:
        self.queue = queue
        self.wait = wait
        self.name = name
        self.on_change = on_change
        self.outages = 0
        self._cond = threading.Condition()
        self._state: LinkState = "connecting"
        self._probing = False
        self._error: BaseException | None = None
        self._tries = 0
        self._down_since: float | None = None
        self._next_try_at: float | None = None
        self._ever_up = False
        # Counts the times the link came up: tells a failure from before the last recovery.
        self._epoch = 0

    @property
    def state(self) -> LinkState:
        return self._state

    def snapshot(self) -> LinkSnapshot:
        with self._cond:
            now = time.monotonic()
            error = self._error if self._state != "up" else None
            return LinkSnapshot(
                state=self._state,
                error=error,
                tries=self._tries,
                down_for=0.0 if self._down_since is None else now - self._down_since,
                next_try_in=None if self._next_try_at is None else max(self._next_try_at - now, 0.0),
                outage=error is not None and self.queue.is_outage(error),
            )

    def notice(self, error: BaseException) -> bool:
        """Another call than a lease met an outage (an ack, a renewal); ``True`` if it is news.

        The link goes down, so the next lease goes through the prober, and the
        outage is logged once, not once per thread and call.
        """
        with self._cond:
            if self._state == "down":
                return False
            self._state = "down"
            if self._down_since is None:
                self._down_since = time.monotonic()
            self._error = error
            return True

    def readiness(self) -> HealthCheckResult:
        """Healthy while up; else unhealthy, with why and when the next try is."""
        snap = self.snapshot()
        data: dict[str, Any] = {"queue": self.queue.name, "state": snap.state}
        if snap.state == "up":
            return HealthCheckResult.healthy(f"consuming from queue {self.queue.name!r}", **data)
        if snap.error is None:
            return HealthCheckResult.unhealthy(f"connecting to the broker of queue {self.queue.name!r}", **data)
        data.update(
            error=summarize_exception(snap.error),
            tries=snap.tries,
            failing_for_s=round(snap.down_for, 3),
            next_try_in_s=None if snap.next_try_in is None else round(snap.next_try_in, 3),
        )
        return HealthCheckResult.unhealthy(describe_failure(snap.error, snap.outage, snap.next_try_in), **data)

    def wake(self) -> None:
        """Wake the threads waiting for the link (the consumer is stopping)."""
        with self._cond:
            self._cond.notify_all()

    # -- leasing through the link -----------------------------------------------------

    def lease(
        self, attempt: Callable[[float], list[Message]], wait: float, stopping: CancellationToken, log: Any
    ) -> list[Message]:
        """``attempt(wait)`` while the link is up; otherwise wait for the prober, or be it.

        Returns ``[]`` when ``stopping`` is set before a lease succeeded.
        """
        failed: Exception | None = None
        epoch = -1
        while not stopping.is_set():
            if self._state == "up" and failed is None:
                # The common case takes no lock: the state and the epoch are single
                # attributes, read atomically.
                epoch = self._epoch
                try:
                    return attempt(wait)
                except Exception as exc:
                    failed = exc
                    continue
            with self._cond:
                if failed is not None and epoch != self._epoch:
                    # The link came back while this lease was failing: an old failure.
                    log.opt(exception=failed).debug(
                        "Queue consumer {!r}: a lease failed just before the link came back", self.name
                    )
                    failed = None
                if failed is not None:
                    self._fall(failed)
                if self._state == "up" and failed is None:
                    continue
                if self._probing:
                    if failed is not None:
                        # The prober reports the outage; a second thread's failure would
                        # be the same line again.
                        log.opt(exception=failed).debug(
                            "Queue consumer {!r}: a lease failed while the link is being probed", self.name
                        )
                    failed = None
                    # Woken when the link is up, when the prober gives up its role, or at a stop.
                    self._cond.wait_for(lambda: self._state == "up" or not self._probing or stopping.is_set())
                    continue
                self._probing = True
            try:
                return self._probe(attempt, failed, stopping, log)
            finally:
                failed = None
                with self._cond:
                    self._probing = False
                    self._cond.notify_all()
        return []

    def _fall(self, error: Exception) -> None:
        """Record a failed lease (lock held)."""
        if self._state == "up":
            self._state = "down"
        if self._down_since is None:
            self._down_since = time.monotonic()
        self._error = error

    def _probe(
        self, attempt: Callable[[float], list[Message]], failed: Exception | None, stopping: CancellationToken, log: Any
    ) -> list[Message]:
        pending = [failed] if failed is not None else []
        stopped: list[Message] = []

        def once() -> list[Message]:
            if pending:
                # The lease that just failed counts as the first try: the back-off follows it.
                raise pending.pop()
            if stopping.is_set():
                return stopped
            # No blocking wait: a probe should answer now, and bring the link up at once.
            return attempt(0.0)

        retrying = tenacity.Retrying(
            wait=self.wait,
            stop=tenacity.stop_when_event_set(stopping),
            sleep=tenacity.sleep_using_event(stopping),  # a stop ends the back-off at once
            retry=tenacity.retry_if_exception_type(Exception),
            before_sleep=lambda state: self._report(state, log),
            reraise=True,
        )
        try:
            batch = retrying(once)
        except Exception:
            if stopping.is_set():
                return []
            raise  # tenacity retries every Exception until the stop: not reached
        if batch is stopped:
            return []
        self._rise(log)
        return batch

    def _report(self, retry_state: tenacity.RetryCallState, log: Any) -> None:
        """One back-off step: remember why and when, and log one line about it."""
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if exc is None:  # pragma: no cover - tenacity sleeps only after a failure
            return
        delay = retry_state.upcoming_sleep
        with self._cond:
            self._state = "down"
            if self._down_since is None:
                self._down_since = time.monotonic()
            self._error = exc
            self._tries = retry_state.attempt_number
            self._next_try_at = time.monotonic() + delay
            down_for = time.monotonic() - self._down_since
        outage = self.queue.is_outage(exc)
        detail = describe_failure(exc, outage, delay)
        if self.on_change is not None:
            self.on_change(detail)
        text = summarize_exception(exc)
        if outage or retry_state.attempt_number > 1:
            log.warning(
                "Queue consumer {!r}: {}leasing from {!r} failed with {}; next try in {:.1f} s "
                "(try {}, failing for {:.1f} s)",
                self.name,
                "broker unavailable: " if outage else "",
                self.queue,
                text,
                delay,
                retry_state.attempt_number,
                down_for,
            )
            log.opt(exception=exc).debug(
                "Queue consumer {!r}: the failure of try {}", self.name, retry_state.attempt_number
            )
        else:
            # Not an outage the backend knows (a bug, a misconfigured server): its
            # traceback once, then one line per step like an outage.
            log.opt(exception=exc).error(
                "Queue consumer {!r}: leasing from {!r} failed with {}; next try in {:.1f} s",
                self.name,
                self.queue,
                text,
                delay,
            )

    def _rise(self, log: Any) -> None:
        """A lease succeeded: the link is up."""
        with self._cond:
            was_up, tries, since = self._ever_up, self._tries, self._down_since
            self._state = "up"
            self._ever_up = True
            self._epoch += 1
            self._error = None
            self._tries = 0
            self._down_since = None
            self._next_try_at = None
            self._cond.notify_all()
        if tries:
            self.outages += 1
            if self.on_change is not None:
                self.on_change(None)
            down_for = 0.0 if since is None else time.monotonic() - since
            log.info(
                "Queue consumer {!r}: {} {!r} after {:.1f} s and {} tries; consuming",
                self.name,
                "reconnected to" if was_up else "connected to",
                self.queue,
                down_for,
                tries + 1,
            )


def describe_failure(error: BaseException, outage: bool, next_try_in: float | None) -> str:
    """``"broker unavailable: ConnectionError, next try in 0.8 s"`` (the status detail)."""
    head = DETAIL_PREFIXES[0] if outage else DETAIL_PREFIXES[1]
    when = "retrying now" if next_try_in is None or next_try_in <= 0 else f"next try in {next_try_in:.1f} s"
    return f"{head}{type(error).__name__}, {when}"
