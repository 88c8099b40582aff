"""The stop of a host's started services, within one budget.

::

    began                       cancel_at          wait_end        deadline
      |-- stopping callbacks --|                      |               |
      |-- every runner's token set (all first, so they wind down in parallel)
      |-- stopping / stop / stopped hooks, reverse order --|          |
      |   (shutdown token set at cancel_at)                |          |
      |-- background runs joined ------------------------->|-escalate-|

A hook hostkit did not write runs on a helper thread (see :mod:`hostkit._calls`),
so a hung one is named with its stack and left behind; a run still going at
``wait_end`` is escalated (a child is terminated, then killed; a thread is abandoned).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from loguru import logger

from ._calls import HungCall, LifecycleCalls
from ._runners import Runner
from ._status import ServiceRecord, ServiceState
from ._supervisor import format_failure
from ._token import CancellationToken, CancellationTokenSource
from ._util import thread_stack

__all__ = ["await_stopping_callbacks", "stop_services"]

_log = logger.bind(service="host")


def await_stopping_callbacks(stopping: CancellationToken, began: float, until: float) -> None:
    """Let the ``lifetime.stopping`` callbacks finish before any service is stopped (.NET's order).

    They run on the thread that set ``stopping``: when that was another thread
    (``stop_application()`` from a service or a request handler), this one was woken
    as the token was set, and would otherwise stop the services, fire ``stopped``
    and let ``run()`` return while a callback is still at work. The wait is part of
    the one budget: a callback still running when the shutdown token is due is
    named with its stack, and the stop goes on without it.
    """
    if stopping.callbacks_finished(max(until - time.monotonic(), 0.0)):
        return
    thread = stopping.running_callbacks()
    if thread is None:
        return  # it returned just as the wait ended
    _log.error(
        "A lifetime.stopping callback was still running {:.1f} s into the stop (on thread {}); the services "
        "are stopped without waiting for it any longer. It is at:\n{}",
        time.monotonic() - began,
        thread.name,
        thread_stack(thread).rstrip(),
    )


def stop_services(
    started: Sequence[ServiceRecord],
    calls: LifecycleCalls,
    *,
    concurrently: bool,
    budget: float,
    cancel_at: float,
    wait_end: float,
    deadline: float,
) -> None:
    """Stop ``started`` (already in reverse start order) within the slices of the budget drawn above."""
    # Signal every background service first, before the rest of the bookkeeping: they
    # wind down in parallel with each other and with this stop, and no service's stop
    # adds to another's.
    for record in started:
        if record.runner is not None:
            record.runner.request_stop()
    with CancellationTokenSource(cancel_after=max(cancel_at - time.monotonic(), 0.0), name="shutdown") as src:
        for phase in ("stopping", "stop", "stopped"):
            if concurrently:
                _phase_concurrently(calls, started, phase, src.token, wait_end)
            else:
                for record in started:
                    _stop_one(calls, record, phase, src.token, wait_end)
    for record in started:
        runner = record.runner
        # A background service's default stop() returns when the token fires; give its
        # thread or child the rest of the waiting slice before escalating.
        if runner is not None and not runner.join(max(wait_end - time.monotonic(), 0.0)):
            _escalate(record, runner, budget, deadline)
        elif record.kind == "hosted" and record.state in (ServiceState.RUNNING, ServiceState.STOPPING):
            record.mark(ServiceState.STOPPED)
            _log.bind(service=record.name).info("Hosted service {!r} stopped", record.name)


def _stop_one(
    calls: LifecycleCalls, record: ServiceRecord, phase: str, token: CancellationToken, deadline: float
) -> None:
    if phase == "stop" and record.kind == "hosted" and record.state is ServiceState.RUNNING:
        record.mark(ServiceState.STOPPING)
    try:
        calls.invoke(record, phase, token, deadline)
    except HungCall as hung:
        record.mark(ServiceState.TIMED_OUT, detail=f"{phase}() did not return within the shutdown budget")
        _log.bind(service=record.name).error(
            "Hosted service {!r}: {}() did not return within the shutdown budget; moving on. It is stuck at:\n{}",
            record.name,
            phase,
            thread_stack(hung.call.thread).rstrip(),
        )
    except Exception as exc:
        summary, text = format_failure(exc)
        record.mark(ServiceState.FAULTED, error=summary, traceback=text, exception=exc)
        _log.bind(service=record.name).warning(
            "Hosted service {!r}: {}() raised; the other services still stop: {}\n{}",
            record.name,
            phase,
            summary,
            text.rstrip(),
        )


def _phase_concurrently(
    calls: LifecycleCalls, records: Sequence[ServiceRecord], phase: str, token: CancellationToken, deadline: float
) -> None:
    threads = [
        threading.Thread(
            target=_stop_one, args=(calls, r, phase, token, deadline), name=f"hostkit-{r.name}-{phase}", daemon=True
        )
        for r in records
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.0))


def _escalate(record: ServiceRecord, runner: Runner, budget: float, deadline: float) -> None:
    where = runner.where()
    grace = max(deadline - time.monotonic(), 0.05)
    action = runner.escalate(grace)
    _log.bind(service=record.name).error(
        "Background service {!r} did not stop within the shutdown budget ({:.1f} s): {}; {}",
        record.name,
        budget,
        action,
        where.rstrip(),
    )
