"""Runners: one contract (start a service, stop it within a deadline, report how it
ended) and one implementation per placement.

Data flow::

    Host -> create_runner(service, record) -> ThreadRunner | ProcessRunner (hostkit._process)
    runner.start(): supervising thread hostkit-<service>
      Supervisor (tenacity.Retrying, RestartPolicy.strategy(), stops on the token)
        _run_once(): execute(stopping) on a thread | in a child process
      the end of every run -> record.mark(COMPLETED | STOPPED | FAULTED | TIMED_OUT) -> on_end(host)
    Host stop: request_stop() (the token), join(budget left), escalate() at the deadline
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._base import Runner

if TYPE_CHECKING:
    from .._services import BackgroundService
    from .._status import ServiceRecord

__all__ = ["Runner", "create_runner"]


def create_runner(service: BackgroundService, record: ServiceRecord) -> Runner:
    """The runner for ``record.placement``."""
    if record.placement == "process":
        from .._process.runner import ProcessRunner

        return ProcessRunner(service, record)
    from .thread import ThreadRunner

    return ThreadRunner(service, record)
