"""Health checks, the built-in checks over a host, and the probe listener (HTTP and TCP)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

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

    def test_exception_is_described_with_and_without_its_message(self) -> None:
        """exception= puts "(Type: message)" after the description, and "(Type)" in its redacted form."""
        err = OSError("host db.internal refused")
        result = HealthCheckResult.unhealthy("database unreachable", exception=err, attempts=3)
        assert result.description == "database unreachable (OSError: host db.internal refused)"
        assert result.redacted_description == "database unreachable (OSError)"
        assert result.data == {"attempts": 3}
        bare = HealthCheckResult.degraded(exception=TimeoutError())
        assert (bare.description, bare.redacted_description) == ("TimeoutError", "TimeoutError")
        assert HealthCheckResult.healthy("fine").redacted_description is None
        with pytest.raises(TypeError, match="exception= takes the exception a check caught, not: 'boom' \\(str\\)"):
            HealthCheckResult.unhealthy("x", exception="boom")  # type: ignore[arg-type]

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
        pytest.importorskip("hostkit._process.runner")
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
            service = next(r.service for r in host.service_records() if r.name == "health")
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
        port = next(r.service for r in host.service_records() if r.name == "health").listener.port
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


# The start of a request that never ends: a slow client trickles it one byte at a time.
ENDLESS = b"GET /health/live HTTP/1.1\r\nHost: probe\r\nX-Slow: "


def endless_byte(sent: int) -> bytes:
    return ENDLESS[sent : sent + 1] if sent < len(ENDLESS) else b"a"


class SlowClients:
    """``trickling`` clients that each send one byte of an endless request every ``every``
    seconds, and ``silent`` ones that send nothing; all reconnect when the listener drops
    them, as broken or hostile clients do. A context manager running one thread."""

    def __init__(self, port: int, *, trickling: int, silent: int = 0, every: float = 0.05) -> None:
        self.port, self.trickling, self.silent, self.every = port, trickling, silent, every
        self.stop = threading.Event()
        self.connected = threading.Event()
        self.dropped = 0  # times the listener closed one of them
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="slow-clients")

    def __enter__(self) -> SlowClients:
        self._thread.start()
        assert self.connected.wait(15), self.error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(15)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.setblocking(False)
        return sock

    def _run(self) -> None:
        clients: list[list] = []  # [socket, bytes sent, trickles?]
        try:
            clients = [[self._connect(), 0, i < self.trickling] for i in range(self.trickling + self.silent)]
            self.connected.set()
            while not self.stop.wait(self.every):
                for client in clients:
                    sock, sent, trickles = client
                    try:
                        if trickles:
                            sock.send(endless_byte(sent))
                            client[1] = sent + 1
                        sock.recv(4096)  # anything at all (a 408, or the end): it was dropped
                        closed = True
                    except BlockingIOError:
                        closed = False
                    except OSError:
                        closed = True
                    if closed:
                        sock.close()
                        self.dropped += 1
                        client[0], client[1] = self._connect(), 0
        except BaseException as exc:  # surfaced by the test through .error
            self.error = exc
        finally:
            for client in clients:
                client[0].close()


def timed_get(port: int, path: str, timeout: float) -> tuple[int | None, float]:
    """(status, seconds) of one GET on a new connection, as a kubelet sends it; None on timeout."""
    began = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        status: int | None = response.status
    except OSError:
        status = None
    finally:
        conn.close()
    return status, time.perf_counter() - began


def until_closed(client: socket.socket, *, trickle: bool, limit: float) -> tuple[bytes, float]:
    """Trickle (or keep silent) until the listener closes ``client``; (what it answered, seconds)."""
    began = time.monotonic()
    client.settimeout(0.05)  # the pace of the trickle, and how often we look for the close
    answer, sent = b"", 0
    while time.monotonic() - began < limit:
        try:
            if trickle:
                client.send(endless_byte(sent))
                sent += 1
            chunk = client.recv(4096)
        except (TimeoutError, socket.timeout):  # noqa: UP041 - socket.timeout differs on 3.10
            continue
        except OSError:  # reset: the listener closed while our last bytes were unread
            break
        if not chunk:
            break
        answer += chunk
    return answer, time.monotonic() - began


class TestSlowClients:
    @pytest.mark.timeout(120)
    def test_trickling_clients_do_not_delay_probes(self) -> None:
        """With 50 clients trickling endless requests and 3 silent ones, all reconnecting when
        dropped, /health/live answers 200 within 100 ms (median of 20), and `hostkit probe` exits 0."""
        with ProbeListener(HealthChecks(), port=0) as listener:
            port = listener.port
            pace = threading.Event()  # never set: spaces the probes, as a kubelet does
            with SlowClients(port, trickling=50, silent=3) as slow:
                results = []
                for _ in range(20):
                    results.append(timed_get(port, "/health/live", timeout=1.0))
                    pace.wait(0.1)
                probe = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "hostkit",
                        "probe",
                        f"http://127.0.0.1:{port}/health/live",
                        "--timeout",
                        "1",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                # Each of them is cut off by the whole-request deadline, not served forever.
                assert wait_until(lambda: slow.dropped >= 53, timeout=15), slow.dropped
                assert slow.error is None
        latencies = sorted(seconds * 1000 for _, seconds in results)
        print(
            f"\nprobe latency with 53 slow clients: median {statistics.median(latencies):.1f} ms, "
            f"max {latencies[-1]:.1f} ms; {slow.dropped} slow clients dropped"
        )
        assert [status for status, _ in results] == [200] * 20, latencies
        assert statistics.median(latencies) < 100, latencies
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.startswith("healthy: 200 healthy")

    def test_slow_clients_are_cut_off_at_the_request_deadline(self) -> None:
        """A client that stalls mid-request gets a 408 after request_timeout (2 s by default);
        one that trickles a byte every 50 ms is cut off then too, not served byte by byte forever."""
        with ProbeListener(HealthChecks(), port=0) as listener:
            # Timed from before the connect: the listener's deadline starts when it accepts,
            # which can come before this thread has sent anything.
            began = time.monotonic()
            with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as stalled:
                stalled.sendall(b"GET /health/live HTTP/1.1\r\n")  # and never the blank line
                answer, _ = until_closed(stalled, trickle=False, limit=10)
            stalled_for = time.monotonic() - began
            began = time.monotonic()
            with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as trickler:
                until_closed(trickler, trickle=True, limit=10)
            trickled_for = time.monotonic() - began
            assert get(listener.port, "/health/live")[0] == 200
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert b"request not complete within request_timeout=2 s" in answer
        # From the client's connect, so never less than the deadline; generous above (a busy machine).
        assert 2.0 <= stalled_for < 5.0
        assert 2.0 <= trickled_for < 5.0
        assert (listener.request_timeout, listener.dropped) == (2.0, 2)

    def test_at_max_connections_the_oldest_unfinished_makes_room(self) -> None:
        """At max_connections a new connection closes the oldest one still unfinished, so
        silent clients can never fill the listener; the probe behind them is answered."""
        # A long request_timeout: only the cap may drop a connection here, not the deadline
        # (a loaded machine can take seconds between the connects and the checks).
        with ProbeListener(HealthChecks(), port=0, max_connections=4, request_timeout=120) as listener:
            silent = [socket.create_connection(("127.0.0.1", listener.port), timeout=5) for _ in range(7)]
            try:
                status, _ = timed_get(listener.port, "/health/live", timeout=5)
                assert status == 200

                def closed(sock: socket.socket) -> bool:
                    sock.settimeout(0.01)
                    try:
                        return sock.recv(1) == b""
                    except (TimeoutError, socket.timeout):  # noqa: UP041
                        return False
                    except OSError:
                        return True

                # The three oldest went to make room for the four newest. The probe's own connection
                # may have needed room too, if its request was not there yet when it was accepted
                # (then the fourth oldest went): the oldest go first, the three newest stay.
                def state() -> list[bool]:
                    return [closed(s) for s in silent]

                assert wait_until(lambda: state()[:3] == [True] * 3 and state()[4:] == [False] * 3, timeout=10), state()
                assert listener.dropped in (3, 4)
                assert listener.dropped == sum(state())
            finally:
                for sock in silent:
                    sock.close()

    def test_bad_limits_are_refused(self) -> None:
        """request_timeout and max_connections are checked when the listener is made."""
        with pytest.raises(
            ConfigurationError, match=r"request_timeout must be a finite number of seconds > 0, not: inf"
        ):
            ProbeListener(HealthChecks(), request_timeout=float("inf"))
        with pytest.raises(ConfigurationError, match=r"request_timeout must be .*, not: 0 \(int\)"):
            ProbeListener(HealthChecks(), request_timeout=0)
        with pytest.raises(ConfigurationError, match=r"max_connections must be an int >= 1, not: 0 \(int\)"):
            ProbeListener(HealthChecks(), max_connections=0)
        with pytest.raises(ConfigurationError, match=r"show_error_messages must be True, False, or None"):
            ProbeListener(HealthChecks(), show_error_messages="yes")  # type: ignore[arg-type]


SECRET = "postgresql://app:s3cret@db.internal/prod"


class TestErrorMessages:
    def _host_with_secrets(self) -> tuple[HostBuilder, HealthChecks, threading.Event]:
        faulted = threading.Event()

        class Sync(BackgroundService):
            def execute(self, stopping):
                faulted.set()
                raise ConnectionError(f"could not connect to {SECRET}")

        def database() -> HealthCheckResult:
            raise OSError(f"connection to {SECRET} refused")

        def cache() -> HealthCheckResult:
            try:
                raise TimeoutError(f"redis at {SECRET} timed out")
            except TimeoutError as err:
                return HealthCheckResult.unhealthy("cache unreachable", exception=err)

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5, on_background_error="ignore"))
        builder.services.add_hosted_service(Sync)
        checks = use_health(builder)
        checks.add("database", database)
        checks.add("cache", cache)
        return builder, checks, faulted

    def test_messages_hidden_when_not_shown(self) -> None:
        """With show_error_messages=False, /health shows each exception's type and the
        service or check it came from, never its message; on loopback it shows them by default."""
        builder, checks, faulted = self._host_with_secrets()
        with builder.build() as host:
            assert faulted.wait(10)
            assert wait_until(lambda: host.status()["Sync"].state.value == "faulted", timeout=10)
            with ProbeListener(checks, port=0, show_error_messages=False) as hidden:
                assert hidden.shows_error_messages is False
                status, raw = get(hidden.port, "/health")
                _, live = get(hidden.port, "/health/live")
            with ProbeListener(checks, port=0) as shown:
                assert shown.shows_error_messages is True
                _, full = get(shown.port, "/health")
        assert status == 503
        assert "s3cret" not in json.dumps(raw) and "s3cret" not in json.dumps(live)
        described = {name: check["description"] for name, check in raw["checks"].items()}
        assert described["database"] == "check raised OSError"
        assert described["cache"] == "cache unreachable (TimeoutError)"
        assert described["services"] == "Sync is faulted (ConnectionError)"
        assert full["checks"]["database"]["description"] == f"check raised OSError: connection to {SECRET} refused"
        assert (
            full["checks"]["cache"]["description"] == f"cache unreachable (TimeoutError: redis at {SECRET} timed out)"
        )
        assert (
            full["checks"]["services"]["description"]
            == f"Sync is faulted (ConnectionError: could not connect to {SECRET})"
        )

    def test_run_option_hides_them(self, spawn, tmp_path) -> None:
        """`hostkit run --probe-error-messages hide` serves exception types only, even on loopback."""
        (tmp_path / "leaky.py").write_text(
            "from hostkit import BackgroundService, HostBuilder\n"
            "from hostkit.health import use_health\n\n\n"
            "class Idle(BackgroundService):\n"
            "    def execute(self, stopping):\n"
            "        stopping.wait()\n\n\n"
            "def database():\n"
            f"    raise OSError('connection to {SECRET} refused')\n\n\n"
            "def create_builder():\n"
            "    builder = HostBuilder()\n"
            "    builder.services.add_hosted_service(Idle)\n"
            "    use_health(builder).add('database', database, tags=('ready',))\n"
            "    return builder\n"
        )
        argv = ["run", "leaky:create_builder", "--probe-port", "0", "--probe-error-messages", "hide", "--no-systemd"]
        program = spawn([sys.executable, "-m", "hostkit", *argv], cwd=tmp_path, stdout=False, stderr="separate")
        # Port 0: the log line is the only place that says which port was picked.
        program.wait_for_output("Health probe listening on http://127.0.0.1:", stream="err")
        line = next(line for line in program.err.splitlines() if "Health probe listening on" in line)
        port = int(line.rsplit(":", 1)[1])
        status, body = get(port, "/health/ready")
        program.signal(signal.SIGTERM)
        assert program.wait(timeout=30) == 0, program.err
        assert status == 503
        assert body["checks"]["database"]["description"] == "check raised OSError"
        assert "s3cret" not in json.dumps(body)

    @pytest.mark.parametrize(
        ("host", "option", "shown"),
        [
            ("127.0.0.1", None, True),
            ("127.0.0.2", None, True),
            ("::1", None, True),
            ("::ffff:127.0.0.1", None, True),
            ("0.0.0.0", None, False),
            ("::", None, False),
            ("10.1.2.3", None, False),
            ("fe80::1%eth0", None, False),
            ("0.0.0.0", True, True),
            ("127.0.0.1", False, False),
        ],
    )
    def test_shown_on_loopback_or_when_asked(self, host: str, option: bool | None, shown: bool) -> None:
        """Messages are shown on a loopback address, hidden on any other (0.0.0.0 and :: are every
        interface), unless show_error_messages says otherwise. Decided without binding."""
        assert ProbeListener(HealthChecks(), host=host, show_error_messages=option).shows_error_messages is shown


class TestSwitchInterval:
    def test_left_alone_by_default(self) -> None:
        """The switch interval is the whole process's setting: a listener, or use_health(), that
        was not asked to lower it leaves it as it was while serving and after."""
        original = sys.getswitchinterval()
        with ProbeListener(HealthChecks(), port=0) as listener:
            assert get(listener.port, "/health/live")[0] == 200
            assert sys.getswitchinterval() == original
        assert sys.getswitchinterval() == original
        builder = HostBuilder()
        builder.services.add_hosted_service(Idle, name="idle")
        use_health(builder, port=0)
        with builder.build() as host:
            listener = next(r.service for r in host.service_records() if r.name == "health").listener
            assert get(listener.port, "/health/ready")[0] == 200
            assert sys.getswitchinterval() == original
        assert sys.getswitchinterval() == original

    def test_use_health_opts_in_for_the_hosts_run(self) -> None:
        """use_health(switch_interval=...) lowers it while the host's listener serves, and the
        listener restores it once the host has stopped."""
        original = sys.getswitchinterval()
        try:
            builder = HostBuilder()
            builder.services.add_hosted_service(Idle, name="idle")
            use_health(builder, port=0, switch_interval=0.001)
            host = builder.build()
            assert sys.getswitchinterval() == original  # nothing changes before the listener runs
            with host:
                listener = next(r.service for r in host.service_records() if r.name == "health").listener
                assert get(listener.port, "/health/live")[0] == 200
                assert sys.getswitchinterval() == 0.001
            assert sys.getswitchinterval() == original
        finally:
            sys.setswitchinterval(original)

    def test_overlapping_listeners_restore_it(self) -> None:
        """Listeners share the lowered switch interval: it stays lowered while any of them runs,
        at the lowest asked for, and the last to close restores the original."""
        original = sys.getswitchinterval()
        a = ProbeListener(HealthChecks(), switch_interval=0.002)
        b = ProbeListener(HealthChecks(), switch_interval=0.001)
        try:
            a.start()
            assert sys.getswitchinterval() == 0.002
            b.start()
            assert sys.getswitchinterval() == 0.001
            a.close()
            assert sys.getswitchinterval() == 0.001  # b still runs
            b.close()
            assert sys.getswitchinterval() == original
            a = ProbeListener(HealthChecks(), switch_interval=0.002)
            b = ProbeListener(HealthChecks(), switch_interval=0.001)
            a.start()
            b.start()
            b.close()
            assert sys.getswitchinterval() == 0.002  # a still runs
            a.close()
            assert sys.getswitchinterval() == original
        finally:
            a.close()
            b.close()
            sys.setswitchinterval(original)

    def test_a_change_made_meanwhile_is_kept(self) -> None:
        """If someone else sets the switch interval while a listener runs, closing it keeps theirs."""
        original = sys.getswitchinterval()
        try:
            with ProbeListener(HealthChecks(), switch_interval=0.001):
                sys.setswitchinterval(0.003)
            assert sys.getswitchinterval() == 0.003
        finally:
            sys.setswitchinterval(original)
