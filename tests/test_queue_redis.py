"""The Redis Streams queue backend, against a real redis-server started for the session."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest

from hostkit.exceptions import ConfigurationError
from tests.queue_helpers import ConsumerContract, QueueContract, RedisServer, redis_server, unique_name

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
