"""Health checks, the built-in checks over a host, and the probe listener (HTTP and TCP)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading

import pytest

from hostkit import BackgroundService, HostBuilder, HostOptions, RestartPolicy
from hostkit.exceptions import ConfigurationError, HostStartupError, ProbeListenerError
from hostkit.health import (
    HealthCheckResult,
    HealthChecks,
    HealthStatus,
    ProbeListener,
    use_health,
)
from tests.conftest import wait_until


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read().decode()
        kind = response.getheader("Content-Type", "")
    finally:
        conn.close()
    return response.status, (json.loads(body) if kind == "application/json" and body else body)


class Idle(BackgroundService):
    def execute(self, stopping):
        stopping.wait()


class TestRegistry:
    def test_worst_status_wins(self) -> None:
        """A report is as bad as its worst check; degraded alone still answers 200."""
        checks = HealthChecks()
        checks.add("a", lambda: HealthCheckResult.healthy("fine"))
        checks.add("b", lambda: HealthCheckResult.degraded("slow", latency_ms=900))
        report = checks.run()
        assert report.status is HealthStatus.DEGRADED
        assert report.http_status == 200
        assert report["b"].result.data == {"latency_ms": 900}
        checks.add("c", lambda: HealthStatus.UNHEALTHY)
        assert checks.run().status is HealthStatus.UNHEALTHY
        assert checks.run().http_status == 503

    def test_tags_select_checks(self) -> None:
        """run('live') runs only checks tagged live; run('ready') only those tagged ready."""
        checks = HealthChecks()
        checks.add("db", lambda: HealthCheckResult.unhealthy("down"), tags=("ready",))
        checks.add("loop", lambda: HealthCheckResult.healthy(), tags=("live",))
        assert [e.name for e in checks.run("live").entries] == ["loop"]
        assert checks.run("live").status is HealthStatus.HEALTHY
        assert checks.run("ready").status is HealthStatus.UNHEALTHY

    def test_a_check_that_raises_is_unhealthy(self) -> None:
        """An exception inside a check makes it unhealthy, with the error as description."""
        checks = HealthChecks()

        def broken() -> HealthCheckResult:
            raise ConnectionError("db refused")

        checks.add("db", broken)
        checks.add("odd", lambda: 42)  # type: ignore[arg-type,return-value]
        report = checks.run()
        assert report["db"].result.description == "check raised ConnectionError: db refused"
        assert report["odd"].result.status is HealthStatus.UNHEALTHY
        assert "check returned 42 (int)" in report["odd"].result.description

    def test_bad_registrations_are_refused(self) -> None:
        """Empty or duplicate names, unknown tags and non-callables are errors naming the problem."""
        checks = HealthChecks()
        checks.add("a", lambda: HealthStatus.HEALTHY)
        with pytest.raises(ConfigurationError, match="'a' is already registered"):
            checks.add("a", lambda: HealthStatus.HEALTHY)
        with pytest.raises(ConfigurationError, match=r"tags must be one or both of 'live', 'ready', not: .*'alive'"):
            checks.add("b", lambda: HealthStatus.HEALTHY, tags=("alive",))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="must be a callable"):
            checks.add("c", "yes")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="non-empty name"):
            checks.add("", lambda: HealthStatus.HEALTHY)


class TestBuiltinChecks:
    def test_faulted_service_is_unhealthy(self) -> None:
        """A background service that failed (host kept running) turns live and ready unhealthy."""
        fail = threading.Event()

        class Fragile(BackgroundService):
            def execute(self, stopping):
                while not stopping.wait(0.01):
                    if fail.is_set():
                        raise ValueError("bad row")

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5, on_background_error="ignore"))
        builder.services.add_hosted_service(Fragile)
        checks = use_health(builder)
        with builder.build():
            assert checks.run("live").status is HealthStatus.HEALTHY
            assert checks.run("ready").status is HealthStatus.HEALTHY
            fail.set()
            assert wait_until(lambda: checks.run("live").status is HealthStatus.UNHEALTHY, timeout=15)
            entry = checks.run("ready")["services"]
            assert entry.result.description == "Fragile is faulted (ValueError: bad row)"
            assert entry.result.data["services"]["Fragile"] == "faulted"

    def test_restarting_service_is_degraded(self) -> None:
        """A service waiting for its restart back-off is degraded, not unhealthy."""
        failed = threading.Event()

        class Flaky(BackgroundService):
            def execute(self, stopping):
                failed.set()
                raise RuntimeError("flap")

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(Flaky, restart=RestartPolicy(max_restarts=None, backoff=30, jitter=0))
        checks = use_health(builder)
        with builder.build():
            assert wait_until(lambda: checks.run("live").status is HealthStatus.DEGRADED, timeout=15)
            assert checks.run("live")["services"].result.description == "restarting: Flaky"

    def test_ready_only_while_running(self) -> None:
        """Readiness is unhealthy before start and after stop; liveness fails once stopped."""
        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(Idle)
        checks = use_health(builder)
        host = builder.build()
        assert checks.run("ready")["host.ready"].result.description == "the host is created"
        with host:
            assert checks.run("ready").status is HealthStatus.HEALTHY
        assert checks.run("ready").status is HealthStatus.UNHEALTHY
        assert checks.run("live")["host.live"].result.description == "the host has stopped"

    @pytest.mark.timeout(90)
    def test_killed_child_is_unhealthy(self) -> None:
        """A process-placed service whose child is killed turns liveness unhealthy, naming it."""
        pytest.importorskip("hostkit._runners.process")
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10, on_background_error="ignore"))
        builder.services.add_hosted_service(Idle, placement="process")
        checks = use_health(builder)
        host = builder.build()
        with host:
            assert wait_until(lambda: host.status()["Idle"].pid not in (None, os.getpid()), timeout=30)
            pid = host.status()["Idle"].pid
            live = checks.run("live")
            assert live.status is HealthStatus.HEALTHY, live.to_dict()
            assert live["children"].result.data["children"] == {"Idle": pid}
            os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda: checks.run("live").status is HealthStatus.UNHEALTHY, timeout=30)
            report = checks.run("live")
            assert "Idle" in report.unhealthy_summary()

    def test_stale_heartbeat_is_unhealthy(self) -> None:
        """A service with heartbeat_timeout that stops beating turns liveness unhealthy."""
        beat = threading.Event()
        beat.set()

        class Beater(BackgroundService):
            def execute(self, stopping):
                while not stopping.wait(0.01):
                    if beat.is_set():
                        self.heartbeat()

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(Beater, heartbeat_timeout=0.3)
        checks = use_health(builder)
        with builder.build():
            assert wait_until(lambda: checks.run("live")["heartbeats"].result.data.get("ages", {}).get("Beater"))
            assert checks.run("live").status is HealthStatus.HEALTHY
            beat.clear()
            assert wait_until(lambda: checks.run("live").status is HealthStatus.UNHEALTHY, timeout=15)
            description = checks.run("live")["heartbeats"].result.description
            # Either this check found the beat too old, or the runner already flagged it.
            assert description.startswith("Beater")
            assert "heartbeat_timeout 0.3 s" in description


class TestHttpListener:
    def test_live_and_ready_answer_json(self) -> None:
        """GET /health/live and /health/ready answer 200 with a JSON report; 503 when unhealthy."""
        ready = threading.Event()
        checks = HealthChecks()
        checks.add(
            "cache",
            lambda: HealthCheckResult.healthy("warm") if ready.is_set() else HealthCheckResult.unhealthy("cold"),
            tags=("ready",),
        )
        with ProbeListener(checks, port=0) as listener:
            assert listener.host == "127.0.0.1"
            status, body = get(listener.port, "/health/live")
            assert status == 200 and body["status"] == "healthy"
            status, body = get(listener.port, "/health/ready")
            assert status == 503
            assert body["checks"]["cache"] == {
                "status": "unhealthy",
                "description": "cold",
                "data": {},
                "duration_ms": body["checks"]["cache"]["duration_ms"],
                "tags": ["ready"],
            }
            ready.set()
            assert get(listener.port, "/health/ready")[0] == 200
            status, body = get(listener.port, "/health/ready", method="HEAD")
            assert status == 200 and body == ""

    def test_unknown_path_and_method(self) -> None:
        """Other paths are 404 naming the known ones; other methods are 405."""
        with ProbeListener(HealthChecks(), port=0) as listener:
            status, body = get(listener.port, "/nope")
            assert status == 404 and "/health/live" in body["paths"]
            assert get(listener.port, "/health/live", method="POST")[0] == 405

    def test_metrics_in_prometheus_format(self) -> None:
        """/metrics answers in the Prometheus text format when prometheus_client is installed."""
        pytest.importorskip("prometheus_client")
        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(Idle)
        use_health(builder, port=0)
        host = builder.build()
        with host:
            service = next(r.service for r in host._records if r.name == "health")
            status, body = get(service.listener.port, "/metrics")
        assert status == 200
        assert 'hostkit_service_state{service="Idle",state="running"} 1.0' in body
        assert 'hostkit_health_check_status{check="services",status="healthy"} 1.0' in body

    def test_port_in_use_is_a_clear_error(self) -> None:
        """Binding a port another socket listens on fails at bind(), naming the port and the fix."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            listener = ProbeListener(HealthChecks(), port=port)
            with pytest.raises(ProbeListenerError) as info:
                listener.bind()
            listener.close()
        assert str(info.value) == (
            f"probe port 127.0.0.1:{port} is already in use (another process listens there); "
            f"choose another port, or 0 for any free port"
        )
        assert isinstance(info.value, OSError)

    def test_port_in_use_fails_host_startup(self) -> None:
        """use_health(port=taken) makes start-up fail naming the health service."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
            use_health(builder, port=taken.getsockname()[1])
            with pytest.raises(HostStartupError, match="'health' failed to start: ProbeListenerError: probe port"):
                builder.build().start()

    def test_bad_options_are_refused(self) -> None:
        """A port out of range or an unknown mode is refused when the listener is made."""
        with pytest.raises(ConfigurationError, match="from 0 to 65535"):
            ProbeListener(HealthChecks(), port=70000)
        with pytest.raises(ConfigurationError, match="'http' or 'tcp', not: 'udp'"):
            ProbeListener(HealthChecks(), mode="udp")  # type: ignore[arg-type]

    def test_answers_through_the_whole_stop(self) -> None:
        """During a slow stop the listener still answers, and readiness says the host is stopping."""
        release = threading.Event()
        stopping_seen = threading.Event()

        class SlowStop(BackgroundService):
            def execute(self, stopping):
                stopping.wait()
                stopping_seen.set()
                release.wait(10)

        builder = HostBuilder(options=HostOptions(shutdown_timeout=8))
        builder.services.add_hosted_service(SlowStop)
        use_health(builder, port=0)
        host = builder.build()
        host.start()
        port = next(r.service for r in host._records if r.name == "health").listener.port
        stopper = threading.Thread(target=host.stop)
        stopper.start()
        try:
            assert stopping_seen.wait(10)
            status, body = get(port, "/health/ready")
            assert status == 503
            assert body["checks"]["host.ready"]["description"] == "the host is stopping"
            assert get(port, "/health/live")[0] == 200
        finally:
            release.set()
            stopper.join(15)
        with pytest.raises(OSError):
            get(port, "/health/live")


class TestTcpListener:
    def test_port_open_while_live_closed_while_not(self) -> None:
        """In tcp mode the port accepts while liveness passes and refuses while it fails."""
        live = threading.Event()
        live.set()
        checks = HealthChecks()
        checks.add("loop", lambda: HealthStatus.HEALTHY if live.is_set() else HealthStatus.UNHEALTHY, tags=("live",))
        with ProbeListener(checks, port=0, mode="tcp", tcp_interval=0.05) as listener:
            port = listener.port

            def answer() -> str | None:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                        return conn.recv(64).decode()
                except OSError:
                    return None

            assert answer() == "healthy\n"
            live.clear()
            assert wait_until(lambda: answer() is None, timeout=15)
            live.set()
            assert wait_until(lambda: answer() == "healthy\n", timeout=15)


class TestSpeed:
    def test_listener_answers_many_probes(self) -> None:
        """100 sequential probes all answer 200 (a smoke test; latency lives in benchmarks/probe.py)."""
        with ProbeListener(HealthChecks(), port=0) as listener:
            codes = [get(listener.port, "/health/live")[0] for _ in range(100)]
        assert codes == [200] * 100
        assert listener.requests == 100
