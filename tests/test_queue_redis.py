"""The Redis Streams queue backend, against a real redis-server started for the session."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hostkit.exceptions import ConfigurationError
from tests.conftest import wait_until
from tests.queue_helpers import (
    ConsumerContract,
    QueueContract,
    RedisServer,
    assert_outage_logged_quietly,
    most_backoff_steps,
    probe,
    redis_server,
    unique_name,
)

__all__ = ["redis_server"]  # the session fixture, imported so pytest finds it here


@pytest.fixture
def make_queue(redis_server: RedisServer) -> Any:
    from hostkit.queues import RedisStreamQueue

    made: list[RedisStreamQueue] = []

    def make(**options: Any) -> RedisStreamQueue:
        q = RedisStreamQueue(redis_server.url, unique_name(), **options)
        made.append(q)
        return q

    yield make
    for q in made:
        q.purge()
        q.close()


class TestRedisQueueContract(QueueContract):
    """The queue contract, on Redis Streams."""

    @staticmethod
    def cli_target(q: Any) -> list[str]:
        return ["--redis", q.url]


class TestRedisConsumer(ConsumerContract):
    """QueueConsumer over Redis Streams."""


class TestRedisSpecifics:
    def test_import_works_without_redis_py_and_the_constructor_says_what_to_install(self) -> None:
        """`import hostkit.queues` needs no redis-py; making a RedisStreamQueue without it names the extra."""
        script = textwrap.dedent(
            """
            import sys
            sys.modules["redis"] = None  # as if redis-py were not installed
            import hostkit.queues
            try:
                hostkit.queues.RedisStreamQueue("redis://127.0.0.1:1/0")
            except ImportError as err:
                print(err)
            """
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
        assert "RedisStreamQueue needs redis-py" in out.stdout
        assert "pip install 'pyhostkit[redis]'" in out.stdout

    def test_bad_url_is_refused(self, redis_server: RedisServer) -> None:
        """A URL without a scheme fails at construction with an example of a good one."""
        from hostkit.queues import RedisStreamQueue

        with pytest.raises(ConfigurationError, match=r"url must be a redis URL such as 'redis://127\.0\.0\.1:6379/0'"):
            RedisStreamQueue("127.0.0.1:6379")

    def test_cli_names_an_unreachable_server(
        self, redis_server: RedisServer, tmp_path: Any, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`hostkit queue` against a server that is not there exits 2 with one line naming the URL."""
        from hostkit.cli import main

        url = f"unix://{tmp_path}/no-redis.sock"
        assert main(["queue", "stats", "jobs", "--redis", url]) == 2
        assert f"hostkit queue: error: cannot reach Redis at {url!r}" in capsys.readouterr().err

    def test_consumers_recover_when_the_stream_is_deleted(self, make_queue: Any) -> None:
        """A stream deleted under a consumer (FLUSHDB, a purge elsewhere) is re-created, and leasing goes on."""
        q = make_queue()
        q.client.delete(q.stream)
        assert q.lease("c") == []
        q.enqueue({"n": 1})
        assert [m.payload for m in q.lease("c")] == [{"n": 1}]

    def test_settle_and_lease_reloads_a_script_the_server_forgot(self, make_queue: Any) -> None:
        """After SCRIPT FLUSH (or a restarted server) the settle script is loaded again; nothing is lost."""
        from hostkit.queues import Settlement

        q = make_queue()
        q.enqueue_many([{"n": 1}, {"n": 2}])
        [first] = q.lease("c1")
        q.client.script_flush()
        settled, [second] = q.settle_and_lease([Settlement(first, "ack")], "c1")
        assert (settled, second.payload) == ([True], {"n": 2})
        assert q.ack(second) is True
        assert (q.stats().depth, q.stats().in_flight) == (0, 0)

    @pytest.mark.parametrize("protocol", [2, 3])
    def test_settle_and_lease_in_one_write_under_either_protocol(self, make_queue: Any, protocol: int) -> None:
        """The one-write settle and read (no redis-py pipeline) reads RESP2 and RESP3 replies alike."""
        from hostkit.queues import Settlement

        q = make_queue(client_options={"protocol": protocol})
        q.enqueue_many([{"n": i} for i in range(4)])
        [first] = q.lease("c1")
        # Pin the one-write path: a due maintenance round would take the plain one.
        q._next_maintenance = time.monotonic() + 60
        settled, batch = q.settle_and_lease([Settlement(first, "ack")], "c1", max_messages=2, wait=0.05)
        assert settled == [True]
        assert [(m.payload, m.attempts) for m in batch] == [({"n": 1}, 1), ({"n": 2}, 1)]
        retry = Settlement(batch[0], "release", delay=60.0)
        settled, more = q.settle_and_lease([retry, Settlement(batch[1], "ack")], "c1", max_messages=5, wait=0.05)
        assert (settled, [m.payload for m in more]) == ([True, True], [{"n": 3}])
        # A settlement whose lease went to another consumer is refused, and the read still happens.
        stale = type(first)(first.id, first.payload, first.attempts, first.receipt, first.enqueued_at)
        settled, nothing = q.settle_and_lease([Settlement(stale, "ack")], "c1", wait=0.01)
        assert (settled, nothing) == ([False], [])
        assert q.ack(more[0])
        s = q.stats()
        assert (s.depth, s.in_flight) == (1, 0)  # the retry waits for its delay

    def test_a_connection_the_server_dropped_heals_on_the_next_call(self, make_queue: Any) -> None:
        """After the server closed the pooled connection, settle_and_lease and enqueue still go through."""
        import redis

        from hostkit.queues import Settlement

        q = make_queue()
        q.enqueue_many([{"n": 1}, {"n": 2}])
        [first] = q.lease("c1")
        q._next_maintenance = time.monotonic() + 60  # the one-write path, as above

        def drop_the_queues_connection() -> None:
            # The pool holds one idle connection, which CLIENT ID is sent on.
            with redis.Redis.from_url(q.url) as admin:
                assert admin.client_kill_filter(_id=q.client.client_id()) == 1

        drop_the_queues_connection()
        settled, [second] = q.settle_and_lease([Settlement(first, "ack")], "c1", wait=0.05)
        assert (settled, second.payload) == ([True], {"n": 2})
        drop_the_queues_connection()
        q.enqueue({"n": 3})
        assert q.ack(second)
        assert [m.payload for m in q.lease("c1")] == [{"n": 3}]

    def test_enqueue_raises_the_servers_error_reply(self, make_queue: Any) -> None:
        """An error reply to the one-message XADD (a key of another type) is raised, not returned as an id."""
        import redis

        q = make_queue()
        q.enqueue({"n": 1})
        q.client.delete(q.stream)
        q.client.set(q.stream, "not a stream")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            q.enqueue({"n": 2})
        q.client.delete(q.stream)

    def test_acked_messages_leave_the_stream(self, make_queue: Any) -> None:
        """Acks delete stream entries, so the stream holds only waiting and in-flight messages."""
        q = make_queue()
        q.enqueue_many([{"n": i} for i in range(10)])
        for m in q.lease("c", max_messages=10):
            assert q.ack(m)
        assert q.client.xlen(q.stream) == 0

    def test_retired_consumer_leaves_the_group_only_when_nothing_is_pending(self, make_queue: Any) -> None:
        """retire() keeps a consumer that still holds messages (deleting it would lose them)."""
        q = make_queue()
        q.enqueue({"n": 1})
        [m] = q.lease("holder")
        q.retire("holder")
        consumers = {c["name"].decode() for c in q.client.xinfo_consumers(q.stream, "hostkit")}
        assert "holder" in consumers
        assert q.ack(m)
        q.retire("holder")
        consumers = {c["name"].decode() for c in q.client.xinfo_consumers(q.stream, "hostkit")}
        assert "holder" not in consumers

    def test_a_pickled_queue_reconnects_in_the_other_process(self, make_queue: Any) -> None:
        """A RedisStreamQueue crosses to another process by pickle and works there."""
        import pickle

        q = make_queue()
        script = "import pickle, sys; q = pickle.loads(sys.stdin.buffer.read()); q.enqueue({'from': 'child'})"
        subprocess.run([sys.executable, "-c", script], input=pickle.dumps(q), check=True, timeout=60)
        assert [m.payload for m in q.lease("c")] == [{"from": "child"}]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, not started yet, that fsyncs every write: the test stops and starts it."""
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.skip("redis-py is not installed: pip install 'hostkit[redis]'")
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server on PATH; install it with `apt-get install redis-server`")
    server = RedisServer(persistent=True)
    yield server
    server.stop()


def _tries(checks: Any, name: str) -> int:
    return int(checks.run("ready")[name].result.data.get("tries", 0))


class TestRedisOutage:
    """A Redis outage, at start-up or mid-run: the consumer waits with back-off, says so, and loses nothing."""

    @pytest.mark.timeout(90)
    def test_a_host_started_while_redis_is_down_is_not_ready_then_consumes(
        self, own_redis: RedisServer, logs: Any
    ) -> None:
        """With Redis down the host starts, readiness and status say why; once Redis is up the messages are consumed."""
        from hostkit import HostBuilder, HostState
        from hostkit.health import HealthStatus, ProbeListener, use_health
        from hostkit.queues import QueueConsumer, RedisStreamQueue

        queue = RedisStreamQueue(own_redis.url, unique_name())  # the server is not running yet
        handled: list[int] = []
        consumer = QueueConsumer(
            queue, lambda m, s: handled.append(m.payload["n"]), concurrency=2, poll_interval=0.05, name="jobs"
        )
        builder = HostBuilder()
        checks = use_health(builder)
        builder.services.add_hosted_service(consumer, name="jobs")
        host = builder.build()
        with host, ProbeListener(checks, port=0, switch_interval=None) as listener:
            assert host.state is HostState.RUNNING
            assert wait_until(
                lambda: (host.status()["jobs"].detail or "").startswith(
                    "broker unavailable: ConnectionError, next try in "
                )
            ), host.status()["jobs"]
            status, body = probe(listener.port, "/health/ready")
            assert status == 503
            description = body["checks"]["jobs.broker"]["description"]
            assert re.fullmatch(
                r"broker unavailable: ConnectionError, (next try in \d+\.\d s|retrying now)", description
            )
            assert probe(listener.port, "/health/live")[0] == 200, "an outage is no reason to restart the process"
            assert "broker='down'" in repr(consumer)

            own_redis.start()
            with RedisStreamQueue(own_redis.url, queue.name) as producer:
                producer.enqueue_many([{"n": n} for n in range(5)])
            assert wait_until(lambda: sorted(handled) == [0, 1, 2, 3, 4], timeout=30), handled
            assert wait_until(lambda: checks.run("ready").status is HealthStatus.HEALTHY, timeout=10)
            assert probe(listener.port, "/health/ready")[0] == 200
            assert host.status()["jobs"].detail is None
        assert_outage_logged_quietly(logs, "jobs", reconnected="connected to", max_steps=1000)
        assert (queue.stats().depth, queue.stats().in_flight) == (0, 0)
        queue.purge()
        queue.close()

    @pytest.mark.timeout(90)
    def test_redis_down_mid_run_logs_one_line_per_step_and_loses_nothing(
        self, own_redis: RedisServer, logs: Any
    ) -> None:
        """Redis stopped about 3 s mid-run: one WARNING per back-off step, one INFO when back, every message handled.

        The message in hand when Redis went away could not be acked: it is delivered again.
        """
        from hostkit import HostBuilder
        from hostkit.health import HealthStatus, use_health
        from hostkit.queues import QueueConsumer, RedisStreamQueue

        own_redis.start()
        queue = RedisStreamQueue(own_redis.url, unique_name(), lease_time=1.0)
        queue.enqueue_many([{"n": n} for n in range(40)])
        handled: list[int] = []
        in_hand, go_on = threading.Event(), threading.Event()

        def handler(message: Any, scope: Any) -> None:
            handled.append(message.payload["n"])
            if message.payload["n"] == 10 and not go_on.is_set():
                in_hand.set()
                go_on.wait(30)  # returns once Redis is gone: its ack cannot get through

        consumer = QueueConsumer(queue, handler, concurrency=2, prefetch=2, poll_interval=0.05, name="jobs")
        builder = HostBuilder()
        checks = use_health(builder)
        builder.services.add_hosted_service(consumer, name="jobs")
        with builder.build():
            assert in_hand.wait(30)
            own_redis.halt()
            went_down = time.monotonic()
            go_on.set()
            # Down through six failed tries (back-off 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s, jittered): about 3 s.
            assert wait_until(
                lambda: _tries(checks, "jobs.broker") >= 6 and time.monotonic() - went_down >= 3.0, timeout=30
            )
            assert checks.run("ready")["jobs.broker"].result.description.startswith(
                "broker unavailable: ConnectionError"
            )
            own_redis.start()
            down_for = time.monotonic() - went_down
            queue.enqueue_many([{"n": n} for n in range(40, 50)])
            assert wait_until(lambda: set(handled) >= set(range(50)), timeout=30), sorted(set(range(50)) - set(handled))
            assert wait_until(lambda: (queue.stats().depth, queue.stats().in_flight) == (0, 0), timeout=30)
            assert checks.run("ready").status is HealthStatus.HEALTHY
        assert handled.count(10) >= 2, "the message whose ack was lost in the outage must be delivered again"
        steps = assert_outage_logged_quietly(
            logs, "jobs", reconnected="reconnected to", max_steps=most_backoff_steps(down_for) + 1
        )
        assert len(steps) >= 6
        # Besides the steps, at most one line: the ack that met the outage first. Other
        # threads' failed calls are the same outage, logged at DEBUG.
        others = [
            r["message"]
            for r in logs.records
            if r["level"] in ("WARNING", "ERROR", "CRITICAL") and r not in steps and r["service"] == "jobs"
        ]
        assert len(others) <= 1, others
        print(f"\n[redis outage] down {down_for:.1f} s: {len(steps)} back-off WARNING line(s), other lines: {others}")
        queue.purge()
        queue.close()

    def test_a_stop_while_redis_is_down_is_prompt(self, own_redis: RedisServer, logs: Any) -> None:
        """A stop during the back-off ends the wait at once (the back-off sleeps on the stopping token)."""
        from hostkit import HostBuilder
        from hostkit.queues import QueueConsumer, RedisStreamQueue

        queue = RedisStreamQueue(own_redis.url, unique_name())
        consumer = QueueConsumer(queue, lambda m, s: None, concurrency=2, reconnect_backoff=60, name="jobs")
        builder = HostBuilder()
        builder.services.add_hosted_service(consumer, name="jobs")
        host = builder.build()
        host.start()
        # The status detail shows the outage and its back-off as soon as the consumer is in it.
        assert wait_until(lambda: "next try in 60.0 s" in (host.status()["jobs"].detail or ""))
        began = time.monotonic()
        host.stop()
        assert time.monotonic() - began < 5
        assert host.status()["jobs"].state.value == "stopped"
        queue.close()
