"""The host's health and service states in the Prometheus text format (``/metrics``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .._status import ServiceState
from ._model import HealthStatus

if TYPE_CHECKING:
    from ._registry import HealthChecks


def render_metrics(checks: HealthChecks) -> tuple[bytes, str]:
    """The host's state in the Prometheus text format (raises ImportError without prometheus_client)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    class _Collector:
        def collect(self) -> Iterable[GaugeMetricFamily]:
            report = checks.run(None)
            health = GaugeMetricFamily(
                "hostkit_health_check_status", "1 when the check has this status, else 0", labels=["check", "status"]
            )
            for entry in report.entries:
                for status in HealthStatus:
                    health.add_metric([entry.name, status.value], float(entry.result.status is status))
            yield health
            host = checks.host
            if host is None:
                return
            states = GaugeMetricFamily(
                "hostkit_service_state", "1 when the service is in this state, else 0", labels=["service", "state"]
            )
            restarts = GaugeMetricFamily("hostkit_service_restarts", "restarts so far", labels=["service"])
            for s in host.status().services:
                for state in ServiceState:
                    states.add_metric([s.name, state.value], float(s.state is state))
                restarts.add_metric([s.name], float(s.restarts))
            yield states
            yield restarts

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
