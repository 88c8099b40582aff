"""Restart policies over any runner, with tenacity.

One :class:`Supervisor` per run of a background service. It calls ``run_once``
(``execute`` in a thread, or one child process) and, under a
:class:`~hostkit.RestartPolicy`, runs it again after a failure::

    run_once raises ──► retry?  an Exception, and no stop requested ──no──► re-raise
                          │ yes
                          ▼
                        stop?   stop_when_event_set(stopping)
                          │     | more than max_restarts failures within window ──yes──► re-raise
                          │ no
                          ▼
                        wait    the policy's tenacity strategy, attempt = consecutive failures
                          │     (before_sleep: status RESTARTING, one log line with the traceback)
                          ▼
                        sleep   stopping.wait(seconds): a stop request ends it at once
                          │
                          └──► run_once again, unless a stop was requested meanwhile

tenacity drives the loop; its attempt number is the number of consecutive
failures. A failed run that lasted ``reset_after`` or more begins a new streak: a
new ``tenacity.Retrying`` whose first attempt is that same failure, replayed, so
the back-off starts again at its first step. One strategy is ours, because
tenacity has no equivalent: the stop after more than N failures within a sliding
window. The back-off sleeps on the service's ``stopping`` token (measured ~8 ms
from a stop request to the loop's end).

A failure of the service and a failure of this machinery are told apart: the
first is the policy's to handle, the second is a bug in hostkit, raised as
:class:`~hostkit.exceptions.SupervisorError` so that it is never reported as the
service's own failure, nor lost with the supervising thread.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from loguru import logger

from ._status import ServiceRecord, ServiceState
from ._summary import format_failure
from ._token import CancellationToken
from .exceptions import OperationCancelledError, SupervisorError

if TYPE_CHECKING:
    import tenacity

__all__ = ["Supervisor", "format_failure"]


class Supervisor:
    """Runs ``run_once`` under the record's restart policy until it ends for good.

    :meth:`run` returns when the service completed or stopped on request, and
    raises the last failure when it failed for good (no policy, or the policy
    gave up).

    Attributes:
        wait: the tenacity wait strategy between runs: the policy's, ``None`` without one.
    """

    def __init__(
        self,
        record: ServiceRecord,
        stopping: CancellationToken,
        run_once: Callable[[], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.record = record
        self.stopping = stopping
        self._run_once = run_once
        self._clock = clock
        self._attempts = 0
        policy = record.restart
        self.wait: tenacity.wait.wait_base | Callable[[tenacity.RetryCallState], float] | None = (
            None if policy is None else policy.strategy(rng)
        )
        #: The service's last failure, as raised by ``run_once``: anything else that
        #: escapes the retry loop came from the loop itself.
        self._last_failure: BaseException | None = None
        #: The last failure ended a run of at least ``reset_after``: begin a new streak.
        self._reset = False

    def run(self) -> None:
        """Run until the service ends for good.

        Raises:
            BaseException: the service's last failure, when it failed for good.
            SupervisorError: the restart machinery itself failed (a bug in hostkit);
                its ``__cause__`` is the original error.
        """
        policy = self.record.restart
        if policy is None:
            self._attempt()
            return
        # Imported here: a host without restart policies never loads tenacity (its import
        # and its share of interpreter teardown cost milliseconds a plain host does not need).
        import tenacity

        from ._backoff import stop_after_failures_in_window

        wait = self.wait
        assert wait is not None  # set from the policy when made

        stop: tenacity.stop.stop_base = tenacity.stop_when_event_set(self.stopping)
        if policy.max_restarts is not None:
            # Only a limited policy counts failures in its window; one without a limit
            # keeps no history, so restarting for months costs no memory.
            stop = stop | stop_after_failures_in_window(policy.max_restarts, policy.window, self._clock)
        replay: BaseException | None = None
        try:
            while True:
                retrying = tenacity.Retrying(
                    stop=stop,
                    wait=wait,
                    retry=tenacity.retry_if_exception(self._retryable),
                    sleep=tenacity.sleep_using_event(self.stopping),
                    before_sleep=self._before_sleep,
                    reraise=True,
                )
                try:
                    retrying(self._streak_attempt, [replay] if replay is not None else [])
                    return
                except Exception as exc:
                    if not (self._reset and exc is self._last_failure):
                        raise
                    # The failure that ended the healthy run opens the next streak as its
                    # first attempt: the back-off follows it from the first step.
                    self._reset = False
                    replay = exc
        except BaseException as exc:
            if exc is self._last_failure:
                raise
            summary, _ = format_failure(exc)
            msg = (
                f"the restart supervisor of background service {self.record.name!r} failed after "
                f"{self._attempts} run(s) and {self.record.restarts} restart(s): {summary}"
            )
            raise SupervisorError(msg) from exc

    # -- one attempt -------------------------------------------------------------

    def _streak_attempt(self, replay: list[BaseException]) -> None:
        if replay:
            raise replay.pop()
        self._attempt()

    def _attempt(self) -> None:
        if self._attempts and self.stopping.is_set():
            # A stop arrived during the back-off: never begin a restart after it.
            return
        self._attempts += 1
        if self._attempts > 1:
            self.record.mark(ServiceState.RUNNING, detail=None)
        began = self._clock()
        try:
            self._run_once()
        except OperationCancelledError as exc:
            if self.stopping.is_set():
                return
            self._failed(began, exc)
            raise
        except BaseException as exc:
            self._failed(began, exc)
            raise

    def _failed(self, began: float, exc: BaseException) -> None:
        self._last_failure = exc
        policy = self.record.restart
        self._reset = policy is not None and self._clock() - began >= policy.reset_after
        self.record.update(last_failure_at=time.time())

    # -- tenacity strategies -----------------------------------------------------

    def _retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, Exception) and not self.stopping.is_set() and not self._reset

    def _before_sleep(self, retry_state: tenacity.RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        delay = retry_state.upcoming_sleep
        restarts = self.record.restarts + 1
        summary, text = format_failure(exc) if exc is not None else ("unknown failure", "")
        self.record.mark(
            ServiceState.RESTARTING,
            restarts=restarts,
            error=summary,
            traceback=text,
            exception=exc,
            detail=f"restart {restarts} in {delay:.2f} s after: {summary}",
        )
        logger.bind(service=self.record.name).error(
            "Background service {!r} failed; restarting it in {:.2f} s (restart {}): {}\n{}",
            self.record.name,
            delay,
            restarts,
            summary,
            text.rstrip(),
        )
