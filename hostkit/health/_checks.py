"""The built-in checks over a host, read from its status snapshot and its service records."""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING, Any

from .._status import HostState, ServiceState
from .._summary import heartbeat_age
from .._util import pid_alive
from ._model import HealthCheckResult, HealthStatus

if TYPE_CHECKING:
    from .._host import Host


def host_live(host: Host) -> HealthCheckResult:
    state = host.state
    if state is HostState.STOPPED:
        return HealthCheckResult.unhealthy("the host has stopped", state=state.value)
    return HealthCheckResult.healthy(f"the host is {state.value}", state=state.value)


def host_ready(host: Host) -> HealthCheckResult:
    state = host.state
    if state is HostState.RUNNING and not host.lifetime.stopping.is_set():
        return HealthCheckResult.healthy("the host is running", state=state.value)
    why = "stopping" if host.lifetime.stopping.is_set() and state is not HostState.STOPPED else state.value
    return HealthCheckResult.unhealthy(f"the host is {why}", state=state.value)


_BAD = (ServiceState.FAULTED, ServiceState.TIMED_OUT)


def services_check(host: Host) -> HealthCheckResult:
    status = host.status()
    states = {s.name: s.state.value for s in status.services}
    data: dict[str, Any] = {"services": states}
    # Which worker runs a once-per-deployment service, and which stand by.
    locks = {s.name: s.lock.to_dict() for s in status.services if s.lock is not None}
    if locks:
        data["locks"] = locks
    # What each child runs at: its CPU priority and, if it was pinned, its CPUs.
    cpu = {
        s.name: {"priority": s.cpu_priority, "cpus": None if s.cpu_affinity is None else list(s.cpu_affinity)}
        for s in status.services
        if s.cpu_priority is not None
    }
    if cpu:
        data["cpu"] = cpu
    bad = [s for s in status.services if s.state in _BAD]
    if bad:
        why = ", ".join(f"{s.name} is {s.state.value}" + (f" ({s.error})" if s.error else "") for s in bad)
        short = ", ".join(
            f"{s.name} is {s.state.value}" + (f" ({_error_kind(s.error)})" if s.error else "") for s in bad
        )
        return HealthCheckResult(HealthStatus.UNHEALTHY, why, dict(data), short if short != why else None)
    restarting = [s.name for s in status.services if s.state is ServiceState.RESTARTING]
    if restarting:
        return HealthCheckResult.degraded(f"restarting: {', '.join(restarting)}", **data)
    return HealthCheckResult.healthy(f"{len(states)} service(s), none faulted", **data)


_KIND = re.compile(r"[A-Za-z_][\w.]*")


def _error_kind(error: str) -> str:
    """``"Type: message"`` (how the status snapshot words a failure) without the message.

    A summary that is not in that form is one of the host's own sentences (a
    start-up timeout), which holds no exception text and is kept whole.
    """
    kind, sep, _ = error.partition(": ")
    return kind if sep and _KIND.fullmatch(kind) else error


def children_check(host: Host) -> HealthCheckResult:
    me = os.getpid()
    # STARTING with a pid: the child exists and is starting up; it must be alive too.
    live = (ServiceState.STARTING, ServiceState.RUNNING, ServiceState.STOPPING)
    children = {
        s.name: s.pid
        for s in host.status().services
        if s.placement == "process" and s.state in live and s.pid is not None and s.pid != me
    }
    dead = [f"{name} (pid {pid})" for name, pid in children.items() if not pid_alive(pid)]
    if dead:
        return HealthCheckResult.unhealthy(f"child process gone: {', '.join(dead)}", children=children)
    return HealthCheckResult.healthy(f"{len(children)} child process(es) alive", children=children)


def heartbeats_check(host: Host) -> HealthCheckResult:
    # The timeouts live on the host's records (the snapshot has the beat, not the limit).
    timeouts = {r.name: r.heartbeat_timeout for r in host.service_records() if r.heartbeat_timeout}
    if not timeouts:
        return HealthCheckResult.healthy("no service has a heartbeat_timeout")
    now = time.time()
    ages: dict[str, float | None] = {}
    stale = []
    for s in host.status().services:
        limit = timeouts.get(s.name)
        if limit is None or s.state is not ServiceState.RUNNING:
            continue
        if getattr(s, "healthy", True) is False:  # the runner itself judged the heartbeat stale
            stale.append(f"{s.name}: {s.detail}" if s.detail else f"{s.name}: heartbeat is stale")
        age = heartbeat_age(s.last_heartbeat_at, s.started_at, now)
        ages[s.name] = None if age is None else round(age, 3)
        if age is not None and age > limit and not any(x.startswith(f"{s.name}: ") for x in stale):
            stale.append(f"{s.name} last beat {age:.1f} s ago (heartbeat_timeout {limit:g} s)")
    if stale:
        return HealthCheckResult.unhealthy("; ".join(stale), ages=ages)
    return HealthCheckResult.healthy(f"{len(ages)} heartbeat(s) fresh", ages=ages)
