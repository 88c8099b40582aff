"""A worker service with health checks, systemd notify and a probe port.

Run it as a worker service (from this directory)::

    hostkit run probe_worker:create_builder --probe-port 8081
    hostkit probe http://127.0.0.1:8081/health/ready

or as a script (probe port from ``PROBE_PORT``, default: any free port)::

    python examples/probe_worker.py

The ``Ticker`` service ticks and heartbeats. To see health change, create the
file named by ``PROBE_WORKER_FAULT_FILE``: the ticker raises, the host keeps
running (``on_background_error="ignore"``), ``/health/ready`` and
``/health/live`` turn 503, and under systemd the watchdog pings stop.
"""

from __future__ import annotations

import os

from loguru import logger

from hostkit import BackgroundService, CancellationToken, HostBuilder, HostOptions
from hostkit.health import HealthCheckResult, use_health
from hostkit.systemd import use_systemd


class Ticker(BackgroundService):
    """Ticks every ``interval`` seconds; raises once the fault file exists."""

    def __init__(self, interval: float = 0.2, fault_file: str | None = None) -> None:
        self.interval = interval
        self.fault_file = fault_file
        self.ticks = 0

    def execute(self, stopping: CancellationToken) -> None:
        while not stopping.is_set():
            if self.fault_file and os.path.exists(self.fault_file):
                raise RuntimeError(f"injected fault: {self.fault_file} exists")
            self.ticks += 1
            self.heartbeat()
            if self.ticks <= 3:
                logger.info("Ticker: tick {}", self.ticks)
            stopping.wait(self.interval)


def create_builder(*, probe_port: int | None = None) -> HostBuilder:
    """The host: a ticker, health checks (plus a probe listener if ``probe_port``), systemd."""
    builder = HostBuilder(options=HostOptions(shutdown_timeout=10, on_background_error="ignore"))
    ticker = Ticker(fault_file=os.environ.get("PROBE_WORKER_FAULT_FILE"))
    builder.services.add_hosted_service(ticker, heartbeat_timeout=5)
    checks = use_health(builder, port=probe_port)

    def ticking() -> HealthCheckResult:
        if ticker.ticks == 0:
            return HealthCheckResult.unhealthy("no tick yet", ticks=0)
        return HealthCheckResult.healthy("ticking", ticks=ticker.ticks)

    checks.add("ticks", ticking, tags=("ready",))
    use_systemd(builder)
    return builder


if __name__ == "__main__":
    host = create_builder(probe_port=int(os.environ.get("PROBE_PORT", "0"))).build()
    raise SystemExit(host.run())
