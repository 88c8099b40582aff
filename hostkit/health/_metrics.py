"""The host's health and service states in the Prometheus text format (``/metrics``).

Every series, documented for operators in the "Scaling out" page of the docs:

* ``hostkit_health_check_status{check, status}``: 1 for the status each check has.
* ``hostkit_health_probe_ok{probe}``: 1 when ``/health/live`` (``probe="live"``) or
  ``/health/ready`` (``probe="ready"``) would answer 200 now.
* ``hostkit_service_state{service, state}``: 1 for the state each service is in.
* ``hostkit_service_restarts{service}`` (gauge) and ``hostkit_service_restarts_total``
  (counter, for ``increase()`` in alerting rules): restarts so far.
* ``hostkit_service_heartbeat_age_seconds{service}`` and
  ``hostkit_service_heartbeat_timeout_seconds{service}``: for running services with
  a ``heartbeat_timeout``, how long ago they beat and the limit.
* ``hostkit_queue_up{queue}``: 1 when the queue's broker answered the last sample.
* ``hostkit_queue_depth``, ``hostkit_queue_in_flight``, ``hostkit_queue_dead_letters``,
  ``hostkit_queue_oldest_waiting_age_seconds`` (``{queue}``): present only while
  ``hostkit_queue_up`` is 1, so an outage shows as missing figures, never as zeros.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .._status import ServiceState
from .._summary import heartbeat_age
from ._model import TAGS, HealthStatus

if TYPE_CHECKING:
    from ._registry import HealthChecks


def render_metrics(checks: HealthChecks) -> tuple[bytes, str]:
    """The host's state in the Prometheus text format (raises ImportError without prometheus_client)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    class _Collector:
        def collect(self) -> Iterable[Any]:
            report = checks.run(None)
            health = GaugeMetricFamily(
                "hostkit_health_check_status", "1 when the check has this status, else 0", labels=["check", "status"]
            )
            for entry in report.entries:
                for status in HealthStatus:
                    health.add_metric([entry.name, status.value], float(entry.result.status is status))
            yield health
            # What the probes answer, from the same run: /health/live and /health/ready
            # fail when a check with that tag is unhealthy (and systemd's watchdog pings
            # are withheld while liveness fails).
            probes = GaugeMetricFamily(
                "hostkit_health_probe_ok", "1 when this probe answers 200 now, else 0", labels=["probe"]
            )
            for tag in TAGS:
                failing = any(e.result.status is HealthStatus.UNHEALTHY and tag in e.tags for e in report.entries)
                probes.add_metric([tag], float(not failing))
            yield probes
            yield from _queue_families(checks, GaugeMetricFamily)
            host = checks.host
            if host is None:
                return
            states = GaugeMetricFamily(
                "hostkit_service_state", "1 when the service is in this state, else 0", labels=["service", "state"]
            )
            restarts = GaugeMetricFamily("hostkit_service_restarts", "restarts so far", labels=["service"])
            restarts_total = CounterMetricFamily(
                "hostkit_service_restarts", "restarts by the restart policy since the host started", labels=["service"]
            )
            beat_age = GaugeMetricFamily(
                "hostkit_service_heartbeat_age_seconds",
                "seconds since a running service with a heartbeat_timeout last beat",
                labels=["service"],
            )
            beat_limit = GaugeMetricFamily(
                "hostkit_service_heartbeat_timeout_seconds", "the service's heartbeat_timeout", labels=["service"]
            )
            timeouts = {r.name: r.heartbeat_timeout for r in host.service_records() if r.heartbeat_timeout}
            now = time.time()
            for s in host.status().services:
                for state in ServiceState:
                    states.add_metric([s.name, state.value], float(s.state is state))
                restarts.add_metric([s.name], float(s.restarts))
                restarts_total.add_metric([s.name], float(s.restarts))
                limit = timeouts.get(s.name)
                if limit is not None and s.state is ServiceState.RUNNING:
                    age = heartbeat_age(s.last_heartbeat_at, s.started_at, now)
                    if age is not None:
                        beat_age.add_metric([s.name], age)
                        beat_limit.add_metric([s.name], float(limit))
            yield states
            yield restarts
            yield restarts_total
            yield beat_age
            yield beat_limit

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry), CONTENT_TYPE_LATEST


def _queue_families(checks: HealthChecks, gauge: Any) -> Iterable[Any]:
    if not checks.queues.labels:
        return
    up = gauge("hostkit_queue_up", "1 when the queue's broker answered the last sample, else 0", labels=["queue"])
    depth = gauge("hostkit_queue_depth", "messages waiting: ready, or delayed for a retry", labels=["queue"])
    in_flight = gauge("hostkit_queue_in_flight", "messages leased by a consumer, not settled yet", labels=["queue"])
    dead = gauge("hostkit_queue_dead_letters", "dead letters kept for inspection", labels=["queue"])
    oldest = gauge(
        "hostkit_queue_oldest_waiting_age_seconds",
        "seconds the oldest message ready for a consumer has waited (0 when none waits)",
        labels=["queue"],
    )
    for sample in checks.queue_samples():
        labels = [sample.label]
        up.add_metric(labels, float(sample.stats is not None))
        if sample.stats is None:
            continue  # absent, never zero: an outage must not look like an empty queue
        depth.add_metric(labels, float(sample.stats.depth))
        in_flight.add_metric(labels, float(sample.stats.in_flight))
        dead.add_metric(labels, float(sample.stats.dead))
        oldest.add_metric(labels, float(sample.stats.oldest_age))
    yield from (up, depth, in_flight, dead, oldest)
