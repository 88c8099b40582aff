"""Queue gauges for autoscalers: depth, in flight, dead letters and oldest age, on /metrics and /health.

Real queues (a SQLite file, a real redis-server), a real host with a real probe
listener, a real consumer holding leases.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostkit import HostBuilder, HostOptions
from hostkit.health import use_health
from tests.conftest import wait_until
from tests.queue_helpers import RedisServer, probe, redis_server, unique_name

__all__ = ["redis_server"]  # the session fixture, imported so pytest finds it here

pytest.importorskip("prometheus_client")


def scrape(port: int) -> tuple[int, dict[tuple[str, tuple[tuple[str, str], ...]], float], float]:
    """GET /metrics: (status, {(series, labels): value}, seconds the answer took)."""
    from prometheus_client.parser import text_string_to_metric_families

    began = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode()
    finally:
        conn.close()
    took = time.monotonic() - began
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    return response.status, values, took


def queue_series(values: dict[Any, float], label: str) -> dict[str, float]:
    """The ``hostkit_queue_*`` series of one queue: {name: value}."""
    return {
        name: v
        for (name, labels), v in values.items()
        if name.startswith("hostkit_queue_") and labels == (("queue", label),)
    }


class QueueGaugesContract:
    """The gauges, on either backend (subclasses give ``make_queue``)."""

    @pytest.mark.timeout(60)
    def test_depth_in_flight_dead_and_oldest_age_on_metrics_and_health(self, make_queue: Any) -> None:
        """Enqueue 9, dead-letter 2, a consumer leases 3: /metrics and /health say 4 waiting, 3, 2, and the age."""
        queue = make_queue()
        from hostkit.queues import QueueConsumer

        enqueued: list[tuple[float, float]] = []  # (before, after) each enqueue, in queue order
        for n in range(9):
            before = time.time()
            queue.enqueue({"n": n})
            enqueued.append((before, time.time()))
        for m in queue.lease("by-hand", max_messages=2):
            assert queue.dead_letter(m, "ValueError: bad")
        release = threading.Event()
        started = threading.Event()

        def handler(message: Any, scope: Any) -> None:
            started.set()
            release.wait(30)

        builder = HostBuilder(options=HostOptions(shutdown_timeout=15))
        use_health(builder, port=0)
        builder.services.add_hosted_service(
            QueueConsumer(queue, handler, prefetch=3, poll_interval=0.05, name="jobs"), name="jobs"
        )
        host = builder.build()
        try:
            with host:
                port = next(r.service for r in host.service_records() if r.name == "health").listener.port
                assert started.wait(20)
                # The consumer holds messages 2, 3, 4; the oldest waiting one is message 5.
                assert wait_until(lambda: queue_series(scrape(port)[1], queue.name).get("hostkit_queue_in_flight") == 3)
                status, values, _ = scrape(port)
                assert status == 200
                got = queue_series(values, queue.name)
                assert got["hostkit_queue_up"] == 1
                assert (
                    got["hostkit_queue_depth"],
                    got["hostkit_queue_in_flight"],
                    got["hostkit_queue_dead_letters"],
                ) == (
                    4,
                    3,
                    2,
                )
                status, body = probe(port, "/health")
                assert status == 200
                shown = body["queues"][queue.name]
                assert (shown["up"], shown["depth"], shown["in_flight"], shown["dead"]) == (True, 4, 3, 2)
                before, after = enqueued[5]
                # Redis measures on the server's clock in whole milliseconds.
                assert (
                    shown["sampled_at"] - after - 0.002 <= shown["oldest_age"] <= shown["sampled_at"] - before + 0.002
                )
                # It grows while nobody takes the message.
                assert wait_until(
                    lambda: (
                        queue_series(scrape(port)[1], queue.name)["hostkit_queue_oldest_waiting_age_seconds"] >= 1.2
                    ),
                    timeout=20,
                )
                # The live and ready probes do not read the queue.
                assert "queues" not in probe(port, "/health/ready")[1]
                release.set()
                assert wait_until(
                    lambda: queue_series(scrape(port)[1], queue.name)["hostkit_queue_depth"] == 0, timeout=20
                )
                got = queue_series(scrape(port)[1], queue.name)
                assert (got["hostkit_queue_in_flight"], got["hostkit_queue_oldest_waiting_age_seconds"]) == (0, 0)
        finally:
            release.set()

    def test_a_producer_adds_its_queue_and_the_same_queue_twice_is_one_gauge(self, make_queue: Any) -> None:
        """add_queue() for a queue a host only produces to; the same queue twice is one gauge, another clashes."""
        from hostkit.exceptions import ConfigurationError
        from hostkit.health import HealthChecks

        queue = make_queue()
        queue.enqueue_many([1, 2])
        checks = HealthChecks().add_queue(queue).add_queue(queue)
        [sample] = checks.queue_samples()
        assert (sample.label, sample.stats.depth, sample.stats.in_flight) == (queue.name, 2, 0)
        other = make_queue()
        with pytest.raises(ConfigurationError, match="pass label="):
            checks.add_queue(other, label=queue.name)
        checks.add_queue(other, label="other")
        assert [s.label for s in checks.queue_samples()] == [queue.name, "other"]


@pytest.fixture
def sqlite_queues(tmp_path: Path) -> Iterator[Any]:
    from hostkit.queues import SQLiteQueue

    made: list[Any] = []

    def make(**options: Any) -> Any:
        made.append(SQLiteQueue(tmp_path / "jobs.db", unique_name(), **options))
        return made[-1]

    yield make
    for q in made:
        q.close()


@pytest.fixture
def redis_queues(redis_server: RedisServer) -> Iterator[Any]:
    from hostkit.queues import RedisStreamQueue

    made: list[Any] = []

    def make(**options: Any) -> Any:
        made.append(RedisStreamQueue(redis_server.url, unique_name(), **options))
        return made[-1]

    yield make
    for q in made:
        q.purge()
        q.close()


class TestSQLiteQueueGauges(QueueGaugesContract):
    @pytest.fixture
    def make_queue(self, sqlite_queues: Any) -> Any:
        return sqlite_queues


class TestRedisQueueGauges(QueueGaugesContract):
    @pytest.fixture
    def make_queue(self, redis_queues: Any) -> Any:
        return redis_queues


class TestPlacement:
    @pytest.mark.timeout(120)
    def test_a_process_placed_consumer_reports_its_queue_from_the_host(self, tmp_path: Path) -> None:
        """The host reads the queue's figures itself: a consumer in a child process has its gauges too."""
        from hostkit.queues import QueueConsumer, SQLiteQueue

        queue = SQLiteQueue(tmp_path / "jobs.db", "proc")
        queue.enqueue_many([{"n": n} for n in range(5)])
        builder = HostBuilder(options=HostOptions(shutdown_timeout=15))
        use_health(builder, port=0)
        builder.services.add_hosted_service(
            QueueConsumer(queue, lambda m, s: None, poll_interval=0.05), name="jobs", placement="process"
        )
        with queue, builder.build() as host:
            port = next(r.service for r in host.service_records() if r.name == "health").listener.port
            assert host.status()["jobs"].placement == "process"
            assert wait_until(
                lambda: (
                    queue_series(scrape(port)[1], "proc")
                    == {
                        "hostkit_queue_up": 1.0,
                        "hostkit_queue_depth": 0.0,
                        "hostkit_queue_in_flight": 0.0,
                        "hostkit_queue_dead_letters": 0.0,
                        "hostkit_queue_oldest_waiting_age_seconds": 0.0,
                    }
                ),
                timeout=60,
            )


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own that fsyncs every write: the test stops, freezes and starts it."""
    pytest.importorskip("redis")
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server on PATH; install it with `apt-get install redis-server`")
    server = RedisServer(persistent=True)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()


class TestBrokerOutage:
    @pytest.mark.timeout(90)
    def test_metrics_answer_through_a_redis_outage_with_the_queue_marked_down(self, own_redis: RedisServer) -> None:
        """Redis stopped or frozen: /metrics answers promptly with hostkit_queue_up 0 and no figures; back: figures."""
        from hostkit.health import HealthChecks, ProbeListener
        from hostkit.queues import RedisStreamQueue

        queue = RedisStreamQueue(own_redis.url, unique_name())
        queue.enqueue_many([{"n": n} for n in range(3)])
        checks = HealthChecks().add_queue(queue)
        with queue, ProbeListener(checks, port=0) as listener:
            got = queue_series(scrape(listener.port)[1], queue.name)
            assert (got["hostkit_queue_up"], got["hostkit_queue_depth"]) == (1, 3)

            own_redis.halt()
            assert wait_until(lambda: queue_series(scrape(listener.port)[1], queue.name) == {"hostkit_queue_up": 0.0})
            status, body = probe(listener.port, "/health")
            assert status == 200, "a broker outage changes no check"
            shown = body["queues"][queue.name]
            assert shown["up"] is False and shown["error"].startswith("ConnectionError"), shown

            own_redis.start()
            assert wait_until(
                lambda: queue_series(scrape(listener.port)[1], queue.name).get("hostkit_queue_depth") == 3
            )

            # A frozen server (as behind a partition) accepts the connection and never answers.
            assert own_redis.proc is not None
            os.kill(own_redis.proc.pid, signal.SIGSTOP)
            try:
                assert wait_until(
                    lambda: queue_series(scrape(listener.port)[1], queue.name) == {"hostkit_queue_up": 0.0}, timeout=10
                )
                timings = [scrape(listener.port)[2] for _ in range(3)]
                # One wait of the sampling timeout (1 s) at most, and none while the call is stuck.
                assert max(timings) < 1.8, timings
                assert probe(listener.port, "/health/live")[0] == 200
            finally:
                os.kill(own_redis.proc.pid, signal.SIGCONT)
            assert wait_until(
                lambda: queue_series(scrape(listener.port)[1], queue.name).get("hostkit_queue_depth") == 3
            )
            # The stuck call finished once the server woke: no sampling thread is left behind.
            assert wait_until(lambda: not any(t.name.startswith("hostkit-queue-stats") for t in threading.enumerate()))


class TestSQLiteConnections:
    def test_threads_that_used_a_queue_leave_no_connection_open(self, tmp_path: Path) -> None:
        """A gauge sample, or any short-lived thread (a request thread), closes its connection as it ends."""
        import psutil

        from hostkit.health import HealthChecks
        from hostkit.queues import SQLiteQueue

        path = tmp_path / "jobs.db"

        def open_handles() -> int:
            return sum(1 for f in psutil.Process().open_files() if f.path == str(path))

        with SQLiteQueue(path, "jobs") as queue:
            baseline = open_handles()  # the constructor's connection, on this thread
            for n in range(10):
                t = threading.Thread(target=queue.enqueue, args=({"n": n},))
                t.start()
                t.join()
            checks = HealthChecks().add_queue(queue)
            checks.queues.max_age = 0.0  # every call samples anew, on a helper thread
            for _ in range(10):
                [sample] = checks.queue_samples()
                assert sample.stats is not None
            assert sample.stats.depth == 10
            # SQLite keeps one closed connection's file descriptor for reuse while another
            # connection of the process holds the file (POSIX locks are per process): one
            # more at most, never one per thread.
            assert wait_until(lambda: open_handles() <= baseline + 1), (open_handles(), baseline)
            # The queue still works on every thread, and close() still closes this thread's connection.
            t = threading.Thread(target=queue.enqueue, args=({"n": 10},))
            t.start()
            t.join()
            assert queue.stats().depth == 11
        assert open_handles() == 0
