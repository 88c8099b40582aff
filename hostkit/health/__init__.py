"""Health checks, and the probe listener that serves them on a loopback port.

A :class:`HealthChecks` registry holds named checks. A check is a callable with
no arguments that returns a :class:`HealthCheckResult` (or just a
:class:`HealthStatus`); one that raises counts as unhealthy, with the error as
its description. Each check is tagged ``"live"`` and/or ``"ready"``:

* *liveness* asks "is this process able to do its work, or should it be
  restarted?" (systemd's watchdog and Kubernetes' liveness probe use it);
* *readiness* asks "should it get work now?" (it is not while starting or
  stopping).

:meth:`HealthChecks.attach` adds the built-in checks over a host's status
snapshot: every service's state (a faulted service is unhealthy), process-placed
children alive, heartbeats fresh, and the host itself running.

:class:`ProbeListener` answers ``GET /health/live`` and ``GET /health/ready``
(JSON, 200 or 503), ``GET /health`` (every check), and ``/metrics`` in the
Prometheus text format when ``prometheus_client`` is installed. In ``"tcp"``
mode it is a plain port that is open while the host is live and closed while it
is not, for ``tcpSocket`` probes.

Why not ``http.server``: under a CPU-bound thread-placed service the GIL is the
probe's enemy. Every socket call (``select``, ``accept``, ``recv``, ``send``,
starting a handler thread) gives the GIL away, and getting it back can take a
whole switch interval (5 ms) while the busy thread holds it. The stdlib server
makes a dozen such calls per request; this listener makes four (accept, recv,
send, close) on one thread, and can lower the switch interval while it runs
(opt in with ``switch_interval``). ``benchmarks/probe.py`` measures both. That
thread never waits on one client: a connection whose request is not complete
waits in a selector, with a deadline for its whole request, so a slow or silent
client delays no one (see :class:`ProbeListener`). Exception messages in the
reports are shown on a loopback address only.

How a probe is answered (the package's modules in brackets)::

    kubelet / systemd / curl
        |  GET /health/ready
        v
    ProbeListener [_listener] ---- one thread: accept, recv, send, close; slow
        |  request bytes            clients wait in a selector (poll) until
        |                           their deadline; switch interval [_switch]
        v                           lowered while it runs, only if asked
    answer() [_http] -------------- route: /health/live, /health/ready, /health,
        |                  \\        /metrics; 400 / 404 / 405 otherwise
        |  tag              \\
        v                    v
    HealthChecks.run(tag)   render_metrics() [_metrics] (prometheus_client):
      [_registry]               |  HealthChecks.run() for a gauge per check
        |  each check           |  status; host.status() for each service's
        v                       |  state and restart count
    checks: yours, and the built-ins [_checks] over host.status() and
        |   host.service_records() (host.live, host.ready, services,
        |   children, heartbeats)
        v
    HealthCheckResult -> HealthEntry -> HealthReport [_model]
        |  worst status wins; 503 when unhealthy
        v
    JSON body (exception messages redacted off loopback), or the metrics text

:meth:`HealthChecks.add_queue` (a :class:`~hostkit.queues.QueueConsumer` calls it
for its queue) adds a queue's depth, in-flight count, dead letters and oldest
waiting age to ``/metrics`` and ``/health``, sampled on demand from a 1 s cache,
each sample on a helper thread waited for 1 s at most [_queues].

:func:`use_health` [_service] registers the :class:`HealthChecks` registry as a
singleton and a :class:`HealthService` that runs the listener from the host's
start until ``lifetime.stopped``; the host hands itself to that service when it is
built (:class:`hostkit.HostAware`), which is when the built-in checks are added.

.. versionadded:: 0.1
"""

from __future__ import annotations

# HealthCheck, HealthEntry, ProbeMode and Tag are importable from here too (as they
# were before this became a package), though not in __all__.
from ._listener import ProbeListener
from ._listener import ProbeMode as ProbeMode
from ._model import HealthCheck as HealthCheck
from ._model import HealthCheckResult, HealthReport, HealthStatus
from ._model import HealthEntry as HealthEntry
from ._model import Tag as Tag
from ._queues import QueueSample as QueueSample
from ._registry import HealthChecks
from ._service import HealthService, use_health

__all__ = [
    "HealthCheckResult",
    "HealthChecks",
    "HealthReport",
    "HealthService",
    "HealthStatus",
    "ProbeListener",
    "use_health",
]
