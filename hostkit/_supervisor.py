"""Restart policies over any runner, with tenacity.

One :class:`Supervisor` per run of a background service. It calls ``run_once``
(``execute`` in a thread, or one child process) and, under a
:class:`~hostkit.RestartPolicy`, runs it again after a failure. tenacity drives the
loop; two strategies are ours because tenacity has no equivalent: a stop after
more than N failures within a sliding window, and a back-off that resets after a
healthy run. The back-off sleeps on the service's ``stopping`` token, so a stop
request ends it at once (measured ~8 ms), and no attempt begins after a stop
was requested.

A failure of the service and a failure of this machinery are told apart: the
first is the policy's to handle, the second is a bug in hostkit, raised as
:class:`~hostkit.exceptions.SupervisorError` so that it is never reported as the
service's own failure, nor lost with the supervising thread.
"""

from __future__ import annotations

import random
import time
from collections import deque
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
        self._rng = rng
        self._attempts = 0
        self._consecutive = 0
        self._failures: deque[float] = deque()
        #: The service's last failure, as raised by ``run_once``: anything else that
        #: escapes the retry loop came from the loop itself.
        self._last_failure: BaseException | None = None

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

        retrying = tenacity.Retrying(
            stop=self._give_up,
            wait=self._wait,
            retry=tenacity.retry_if_exception(self._retryable),
            sleep=self._sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        try:
            retrying(self._attempt)
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
        now = self._clock()
        policy = self.record.restart
        if policy is not None and now - began >= policy.reset_after:
            self._consecutive = 0
        self._consecutive += 1
        if policy is not None and policy.max_restarts is not None:
            # Only a limited policy counts failures in its window; one without a limit
            # keeps no history, so restarting for months costs no memory.
            self._failures.append(now)
        self.record.update(last_failure_at=time.time())

    # -- tenacity strategies -----------------------------------------------------

    def _retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, Exception) and not self.stopping.is_set()

    def _give_up(self, retry_state: tenacity.RetryCallState) -> bool:
        policy = self.record.restart
        if policy is None or self.stopping.is_set():
            return True
        if policy.max_restarts is None:
            return False
        horizon = self._clock() - policy.window
        while self._failures and self._failures[0] < horizon:
            self._failures.popleft()
        return len(self._failures) > policy.max_restarts

    def _wait(self, retry_state: tenacity.RetryCallState) -> float:
        policy = self.record.restart
        assert policy is not None
        return policy.delay(self._consecutive, self._rng())

    def _sleep(self, seconds: float) -> None:
        self.stopping.wait(seconds)

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
