"""Shared by the queue tests: a real redis-server, and a consumer process for chaos runs.

As a module: fixtures ``redis_server`` (session: a real ``redis-server`` on a unix
socket in a temporary directory, stopped by its pid) and ``make_queue`` (a fresh,
uniquely named queue of the backend the test is parametrized with).

As a script: ``python tests/queue_helpers.py BACKEND TARGET NAME RECORD_DIR`` runs a
worker host whose :class:`~hostkit.queues.QueueConsumer` appends every payload
number it handled to ``RECORD_DIR/<pid>.log`` before acking. Payloads with
``"poison": true`` always fail. It stops on SIGTERM like any worker service.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

if not __package__:  # run as a script by the chaos test: make the `tests` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.conftest import wait_until

REDIS_SKIP = (
    "no redis-server could be started ({why}); install it with `apt-get install redis-server` "
    "(.ci/system-deps does this in CI) to run the Redis queue tests"
)


class RedisServer:
    """A redis-server child on a unix socket; :attr:`url` for redis-py.

    With ``persistent=True`` every write is fsynced to an append-only file, so
    :meth:`halt` then :meth:`start` is an outage that loses nothing, on the same socket.
    """

    def __init__(self, *, persistent: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="hostkit-redis-")
        self.socket = os.path.join(self.dir, "redis.sock")
        self.url = f"unix://{self.socket}"
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        durability = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        # --port 0: no TCP at all, so parallel test runs never race for a port; the
        # unix socket lives in this run's own directory. No snapshots: a test server.
        self.proc = subprocess.Popen(
            [
                binary,
                "--port", "0",
                "--unixsocket", self.socket,
                "--unixsocketperm", "700",
                "--save", "",
                *durability,
                "--dir", self.dir,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {out[-500:]}")
            try:
                with redis.Redis.from_url(self.url) as client:
                    if client.ping():
                        return
            except (redis.ConnectionError, FileNotFoundError):
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not answer PING within 20 s")

    def halt(self) -> None:
        """Stop the server (SIGTERM, as an operator would), keeping its directory: :meth:`start` brings it back."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stdout:
                proc.stdout.close()

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the whole session; skips (saying why) where none can start."""
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.skip(REDIS_SKIP.format(why="redis-py is not installed: pip install 'pyhostkit[redis]'"))
    server = RedisServer()
    try:
        server.start()
    except RuntimeError as err:
        server.stop()
        pytest.skip(REDIS_SKIP.format(why=err))
    yield server
    server.stop()


def unique_name(prefix: str = "q") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -- broker outages ----------------------------------------------------------------------


def probe(port: int, path: str) -> tuple[int, Any]:
    """GET ``path`` from a probe listener on 127.0.0.1: (status, decoded JSON)."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read().decode())
    finally:
        conn.close()


def most_backoff_steps(seconds: float) -> int:
    """The most back-off steps the consumer's default reconnect schedule fits in ``seconds``.

    The schedule is 0.1 s doubling to 5 s, each step cut by up to a fifth: counting
    every step at its shortest gives an upper bound.
    """
    steps, elapsed = 0, 0.0
    while elapsed < seconds:
        elapsed += 0.8 * min(0.1 * 2**steps, 5.0)
        steps += 1
    return steps


def assert_outage_logged_quietly(logs: Any, consumer: str, *, reconnected: str, max_steps: int) -> list[dict]:
    """One WARNING per back-off step, no traceback above DEBUG, one INFO at the recovery; return the steps."""
    steps = [
        r
        for r in logs.records
        if r["level"] == "WARNING" and f"Queue consumer {consumer!r}: broker unavailable" in r["message"]
    ]
    assert steps, "each back-off step must log one WARNING"
    assert len(steps) <= max_steps, f"{len(steps)} WARNING lines for at most {max_steps} back-off steps"
    assert all("next try in" in r["message"] for r in steps), "each step says when the next try is"
    loud = [r for r in logs.records if r["exception"] is not None and r["level"] not in ("DEBUG", "TRACE")]
    assert not loud, f"tracebacks belong at DEBUG in an outage, got: {[(r['level'], r['message']) for r in loud]}"
    back = [
        r
        for r in logs.records
        if r["level"] == "INFO" and f"Queue consumer {consumer!r}: {reconnected}" in r["message"]
    ]
    assert len(back) == 1, f"one INFO line when the broker is back, got {[r['message'] for r in back]}"
    return steps


# -- the chaos / hybrid consumer process ------------------------------------------------


def open_queue(backend: str, target: str, name: str, **options: Any) -> Any:
    from hostkit.queues import RedisStreamQueue, SQLiteQueue

    if backend == "sqlite":
        return SQLiteQueue(target, name, **options)
    return RedisStreamQueue(target, name, **options)


def make_handler(record_dir: str, work: float) -> Callable[[Any, Any], None]:
    fd = os.open(os.path.join(record_dir, f"{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def handle(message: Any, scope: Any) -> None:
        if message.payload.get("poison"):
            raise ValueError(f"poison message {message.payload['n']}")
        if work:
            time.sleep(work)
        # One write() of one short line on an O_APPEND fd: a kill -9 leaves whole lines,
        # so the record says exactly which numbers a handler finished before its ack.
        os.write(fd, f"{message.payload['n']}\n".encode())

    return handle


def read_records(record_dir: str) -> list[int]:
    """Every payload number handled, one entry per handling (duplicates kept)."""
    numbers = []
    for entry in os.listdir(record_dir):
        if entry.endswith(".log"):
            with open(os.path.join(record_dir, entry)) as f:
                numbers.extend(int(line) for line in f.read().splitlines() if line.strip())
    return numbers


def read_records_by_pid(record_dir: str) -> dict[int, list[int]]:
    """The payload numbers each consumer process handled, by its pid."""
    found = {}
    for entry in os.listdir(record_dir):
        if entry.endswith(".log"):
            with open(os.path.join(record_dir, entry)) as f:
                found[int(entry[: -len(".log")])] = [int(line) for line in f.read().splitlines() if line.strip()]
    return found


def main(argv: list[str]) -> int:
    from hostkit import HostBuilder
    from hostkit.queues import QueueConsumer

    backend, target, name, record_dir = argv[:4]
    lease_time = float(os.environ.get("QUEUE_LEASE_TIME", "1.5"))
    work = float(os.environ.get("QUEUE_WORK", "0.002"))
    options: dict[str, Any] = {"lease_time": lease_time}
    if "QUEUE_DURABILITY" in os.environ:
        options["durability"] = os.environ["QUEUE_DURABILITY"]
    queue = open_queue(backend, target, name, **options)
    builder = HostBuilder()
    builder.configure_options(shutdown_timeout=10)
    builder.services.add_hosted_service(
        QueueConsumer(
            queue,
            make_handler(record_dir, work),
            concurrency=int(os.environ.get("QUEUE_CONCURRENCY", "2")),
            prefetch=int(os.environ.get("QUEUE_PREFETCH", "4")),
            max_attempts=3,
            backoff=0.05,
            poll_interval=0.2,
            name="chaos",
        )
    )
    return builder.build().run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# -- the behaviour every backend must show (subclassed per backend in test_queue_*.py) --


class QueueContract:
    """Tests shared by every backend; a subclass provides the ``make_queue`` fixture."""

    def test_enqueue_lease_ack_round_trip(self, make_queue: Callable[..., Any]) -> None:
        """An enqueued payload comes back from lease with attempts 1, and ack removes it for good."""
        q = make_queue()
        mid = q.enqueue({"job": 1, "text": "héllo"})
        assert q.stats().depth == 1
        [m] = q.lease("c1")
        assert (m.id, m.payload, m.attempts) == (mid, {"job": 1, "text": "héllo"}, 1)
        assert (q.stats().depth, q.stats().in_flight) == (0, 1)
        assert q.ack(m) is True
        assert q.ack(m) is False, "a second ack of the same delivery must do nothing"
        assert (q.stats().depth, q.stats().in_flight, q.lease("c1")) == (0, 0, [])

    def test_leased_message_is_hidden_then_redelivered_after_lease_expiry(self, make_queue: Callable[..., Any]) -> None:
        """A message whose consumer stops renewing goes to another consumer; the old receipt settles nothing."""
        q = make_queue(lease_time=0.3)
        q.enqueue({"n": 1})
        [first] = q.lease("dead-consumer")
        assert q.lease("c2") == []
        again: list[Any] = []
        assert wait_until(lambda: again.extend(q.lease("c2")) or again, timeout=10)
        [second] = again
        assert (second.id, second.attempts) == (first.id, 2)
        assert q.ack(first) is False, "a consumer whose lease expired must not ack"
        assert q.release(first) is False
        assert q.ack(second) is True
        assert q.stats().in_flight == 0

    def test_renew_keeps_a_slow_message(self, make_queue: Callable[..., Any]) -> None:
        """Renewing a lease keeps the message from other consumers past lease_time."""
        q = make_queue(lease_time=0.4)
        q.enqueue({"n": 1})
        [m] = q.lease("c1")
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            assert q.renew([m]) == 1
            assert q.lease("c2") == []
            time.sleep(0.1)
        assert q.ack(m) is True

    def test_release_with_delay_hides_the_message_until_due(self, make_queue: Callable[..., Any]) -> None:
        """A released message comes back only after its delay, with its attempts counted."""
        q = make_queue()
        q.enqueue({"n": 1})
        [m] = q.lease("c1")
        released_at = time.monotonic()
        assert q.release(m, delay=0.5) is True
        assert q.stats().depth == 1
        assert q.lease("c1") == []
        got: list[Any] = []
        assert wait_until(lambda: got.extend(q.lease("c1")) or got, timeout=10)
        assert time.monotonic() - released_at >= 0.45
        assert (got[0].id, got[0].attempts) == (m.id, 2)

    def test_release_without_counting_keeps_the_attempt_count(self, make_queue: Callable[..., Any]) -> None:
        """A release at stop (count_attempt=False) does not use up an attempt."""
        q = make_queue()
        q.enqueue({"n": 1})
        [m] = q.lease("c1")
        assert q.release(m, count_attempt=False) is True
        [again] = q.lease("c1")
        assert again.attempts == 1

    def test_dead_letters_are_listed_and_requeued(self, make_queue: Callable[..., Any]) -> None:
        """A dead-lettered message keeps payload, attempts and error; requeue_dead gives it fresh attempts."""
        q = make_queue()
        mid = q.enqueue({"n": 7})
        [m] = q.lease("c1")
        assert q.dead_letter(m, "ValueError: bad input") is True
        s = q.stats()
        assert (s.depth, s.in_flight, s.dead) == (0, 0, 1)
        [dead] = q.dead_letters()
        assert (dead.id, dead.payload, dead.attempts) == (mid, {"n": 7}, 1)
        assert "ValueError: bad input" in dead.error
        assert q.requeue_dead(["no-such-id"]) == 0
        assert q.requeue_dead() == 1
        assert q.stats().dead == 0
        [back] = q.lease("c1")
        assert (back.id, back.payload, back.attempts) == (mid, {"n": 7}, 1)

    def test_unserializable_payload_fails_at_enqueue_and_writes_nothing(self, make_queue: Callable[..., Any]) -> None:
        """A payload JSON cannot hold raises PayloadError naming the fix; no message of the batch is written."""
        from hostkit.exceptions import PayloadError

        q = make_queue()
        with pytest.raises(PayloadError) as info:
            q.enqueue_many([{"ok": 1}, {"when": object()}])
        assert "cannot be encoded as JSON" in str(info.value)
        assert "codec='pickle'" in str(info.value)
        assert isinstance(info.value, TypeError)
        with pytest.raises(PayloadError, match="Out of range float values"):
            q.enqueue({"x": float("nan")})
        assert q.stats().depth == 0

    def test_pickle_codec_is_opt_in_and_round_trips(self, make_queue: Callable[..., Any]) -> None:
        """With codec='pickle', Python objects JSON cannot hold survive the trip."""
        import datetime

        q = make_queue(codec="pickle")
        payload = {"at": datetime.datetime(2024, 1, 2, 3, 4), "tags": {"a", "b"}}
        q.enqueue(payload)
        [m] = q.lease("c1")
        assert m.payload == payload

    def test_ack_many_acks_only_what_is_still_held(self, make_queue: Callable[..., Any]) -> None:
        """ack_many settles a batch in one call and skips a delivery whose lease went to another consumer."""
        q = make_queue(lease_time=0.3)
        q.enqueue_many([{"n": i} for i in range(3)])
        batch = q.lease("c1", max_messages=3)
        got: list[Any] = []
        assert wait_until(lambda: got.extend(q.lease("c2", max_messages=1)) or got, timeout=10)
        assert q.renew([m for m in batch if m.id != got[0].id]) == 2
        assert q.ack_many(batch) == 2, "the message re-leased by c2 must not be acked by c1"
        assert (q.stats().depth, q.stats().in_flight) == (0, 1)
        assert q.ack_many(got) == 1

    def test_settle_applies_mixed_outcomes_of_a_batch_in_one_call(self, make_queue: Callable[..., Any]) -> None:
        """settle() acks, retries (now and later) and dead-letters the messages of one batch, each its own way."""
        from hostkit.queues import Settlement

        q = make_queue()
        q.enqueue_many([{"n": i} for i in range(4)])
        done, now, later, dead = q.lease("c1", max_messages=4)
        outcomes = [
            Settlement(done, "ack"),
            Settlement(now, "release"),
            Settlement(later, "release", delay=60),
            Settlement(dead, "dead_letter", error="ValueError: bad input"),
        ]
        assert q.settle(outcomes) == [True, True, True, True]
        s = q.stats()
        assert (s.depth, s.in_flight, s.dead) == (2, 0, 1), "one retry ready, one delayed, one dead, one gone"
        [again] = q.lease("c1", max_messages=4)
        assert (again.id, again.payload, again.attempts) == (now.id, {"n": 1}, 2)
        [letter] = q.dead_letters()
        assert (letter.id, letter.payload, letter.error) == (dead.id, {"n": 3}, "ValueError: bad input")
        assert q.settle([Settlement(done, "ack")]) == [False], "a settled delivery cannot be settled again"

    def test_settle_refuses_a_stolen_message_in_a_batch(self, make_queue: Callable[..., Any]) -> None:
        """A message re-leased by another consumer is neither acked, released nor dead-lettered by the old one."""
        from hostkit.queues import Settlement

        q = make_queue(lease_time=0.3)
        q.enqueue_many([{"n": i} for i in range(4)])
        batch = q.lease("c1", max_messages=4)
        stolen: list[Any] = []
        assert wait_until(lambda: stolen.extend(q.lease("c2", max_messages=1)) or stolen, timeout=10)
        [theirs] = stolen
        mine = [m for m in batch if m.id != theirs.id]
        assert q.renew(mine) == 3
        old = next(m for m in batch if m.id == theirs.id)
        for outcome in ("ack", "release", "dead_letter"):
            settled = q.settle([Settlement(mine[0], "ack"), Settlement(old, outcome, error="late")])  # type: ignore[arg-type]
            assert settled == [True, False], f"the stolen message must not be settled by {outcome}"
            mine.pop(0)
        s = q.stats()
        assert (s.depth, s.in_flight, s.dead) == (0, 1, 0), "only the thief's delivery is still leased"
        assert q.settle([Settlement(theirs, "ack")]) == [True], "the consumer holding it now settles it"

    def test_settle_and_lease_settles_first_then_leases(self, make_queue: Callable[..., Any]) -> None:
        """The last batch's settlements and the next lease go in one call; settling never waits for the lease."""
        from hostkit.queues import Settlement

        q = make_queue()
        q.enqueue_many([{"n": i} for i in range(3)])
        [first] = q.lease("c1")
        settled, batch = q.settle_and_lease([Settlement(first, "ack")], "c1", max_messages=5)
        assert settled == [True]
        assert [m.payload["n"] for m in batch] == [1, 2]
        settled, nothing = q.settle_and_lease(
            [Settlement(batch[0], "ack"), Settlement(batch[1], "release", delay=60)], "c1", wait=0.2
        )
        assert (settled, nothing) == ([True, True], [])
        s = q.stats()
        assert (s.depth, s.in_flight) == (1, 0), "settled even though the lease found nothing"

    def test_cli_shows_stats_and_dead_letters_and_requeues(self, make_queue: Callable[..., Any], capsys: Any) -> None:
        """`hostkit queue stats|dead|requeue` report the queue's counts and put dead letters back."""
        import json

        from hostkit.cli import main

        q = make_queue()
        q.enqueue_many([{"n": 1}, {"n": 2}])
        [m] = q.lease("c1")
        q.dead_letter(m, "Traceback (most recent call last):\nValueError: no such user")
        where = self.cli_target(q)
        assert main(["queue", "stats", q.name, *where]) == 0
        assert capsys.readouterr().out.strip() == f"queue {q.name!r}: depth=1 in_flight=0 dead=1"
        assert main(["queue", "dead", q.name, *where, "--json"]) == 0
        [row] = json.loads(capsys.readouterr().out)
        assert (row["id"], row["payload"], row["attempts"]) == (m.id, {"n": 1}, 1)
        assert main(["queue", "dead", q.name, *where]) == 0
        assert "ValueError: no such user" in capsys.readouterr().out
        assert main(["queue", "requeue", q.name, *where]) == 0
        assert "1 dead letter(s) re-queued" in capsys.readouterr().out
        assert main(["queue", "stats", q.name, *where, "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown.pop("oldest_age") >= 0.0  # the re-queued letters are ready now
        assert shown == {"name": q.name, "depth": 2, "in_flight": 0, "dead": 0}

    def test_batch_lease_and_delayed_enqueue(self, make_queue: Callable[..., Any]) -> None:
        """lease(max_messages=N) returns up to N in order; a delayed enqueue is invisible until due."""
        q = make_queue()
        q.enqueue({"n": "later"}, delay=0.4)
        q.enqueue_many([{"n": i} for i in range(5)])
        batch = q.lease("c1", max_messages=3)
        assert [m.payload["n"] for m in batch] == [0, 1, 2]
        rest = q.lease("c1", max_messages=10)
        assert [m.payload["n"] for m in rest] == [3, 4]
        got: list[Any] = []
        assert wait_until(lambda: got.extend(q.lease("c1")) or got, timeout=10)
        assert got[0].payload == {"n": "later"}


class ConsumerContract:
    """QueueConsumer behaviour over a real backend; a subclass provides ``make_queue``."""

    def test_handler_runs_in_a_fresh_scope_per_message(self, make_queue: Callable[..., Any]) -> None:
        """Each message gets its own scoped services, closed after the handler; acked messages leave the queue."""
        import threading

        from hostkit import HostBuilder, ServiceProvider
        from hostkit.queues import QueueConsumer

        q = make_queue()
        q.enqueue_many([{"n": i} for i in range(5)])
        sessions: list[Any] = []
        done = threading.Event()

        class Session:
            def __init__(self) -> None:
                self.closed = False
                sessions.append(self)

            def close(self) -> None:
                self.closed = True

        seen: list[tuple[int, Any]] = []

        class Worker(QueueConsumer):
            def __init__(self, provider: ServiceProvider) -> None:
                super().__init__(q, provider=provider, poll_interval=0.05)

            def handle(self, message: Any, scope: Any) -> None:
                session = scope.get(Session)
                assert scope.get(Session) is session
                seen.append((message.payload["n"], session))
                if len(seen) == 5:
                    done.set()

        builder = HostBuilder()
        builder.services.add_scoped(Session)
        builder.services.add_hosted_service(Worker)
        with builder.build():
            assert done.wait(20)
            assert wait_until(lambda: q.stats().in_flight == 0, timeout=10)
        assert sorted(n for n, _ in seen) == [0, 1, 2, 3, 4]
        assert len({id(s) for _, s in seen}) == 5, "each message must get its own scoped instance"
        assert all(s.closed for s in sessions), "scoped services must be closed after each message"
        assert (q.stats().depth, q.stats().in_flight) == (0, 0)

    def test_failures_retry_with_backoff_then_dead_letter(self, make_queue: Callable[..., Any], logs: Any) -> None:
        """A handler that keeps failing gets max_attempts deliveries, then its message is a dead letter."""
        from hostkit import HostBuilder
        from hostkit.queues import QueueConsumer

        q = make_queue()
        q.enqueue({"n": "poison"})
        q.enqueue({"n": "flaky"})
        calls: dict[str, list[int]] = {"poison": [], "flaky": []}

        def handler(message: Any, scope: Any) -> None:
            calls[message.payload["n"]].append(message.attempts)
            if message.payload["n"] == "poison" or message.attempts < 2:
                raise ValueError(f"cannot handle {message.payload['n']}")

        consumer = QueueConsumer(q, handler, max_attempts=3, backoff=0.05, poll_interval=0.05)
        builder = HostBuilder()
        builder.services.add_hosted_service(consumer)
        with builder.build():
            assert wait_until(lambda: q.stats().dead == 1 and q.stats().depth + q.stats().in_flight == 0, timeout=20)
        assert calls == {"poison": [1, 2, 3], "flaky": [1, 2]}
        [dead] = q.dead_letters()
        assert dead.payload == {"n": "poison"}
        assert dead.attempts == 3
        assert "ValueError: cannot handle poison" in dead.error
        assert consumer.stats()["dead_lettered"] == 1
        assert consumer.stats()["handled"] == 1
        assert logs.find("failed 3 time(s) and was dead-lettered", level="ERROR")
        assert logs.find("retrying in", level="WARNING")

    def test_a_batch_with_mixed_outcomes_is_settled_in_one_call(
        self, make_queue: Callable[..., Any], logs: Any
    ) -> None:
        """Successes, a retry and a dead letter of one leased batch reach the queue in one settle call."""
        from hostkit import HostBuilder
        from hostkit.queues import QueueConsumer

        q = make_queue()
        q.enqueue_many([{"n": "ok-1"}, {"n": "dying"}, {"n": "flaky"}, {"n": "ok-2"}])
        for m in q.lease("setup", max_messages=2):
            # "dying" uses up a delivery: its next is its second, the last of max_attempts=2.
            assert q.release(m, count_attempt=m.payload["n"] == "dying") is True
        calls: list[list[str]] = []
        settle, settle_and_lease = q.settle, q.settle_and_lease

        def spy(settlements: list[Any]) -> list[bool]:
            calls.append(sorted(s.outcome for s in settlements))
            return settle(settlements)  # type: ignore[no-any-return]

        def spy_with_lease(settlements: list[Any], *args: Any, **kwargs: Any) -> Any:
            if settlements:
                calls.append(sorted(s.outcome for s in settlements))
            return settle_and_lease(settlements, *args, **kwargs)

        q.settle, q.settle_and_lease = spy, spy_with_lease

        def handler(message: Any, scope: Any) -> None:
            if message.payload["n"] in ("dying", "flaky"):
                raise ValueError(f"cannot handle {message.payload['n']}")

        consumer = QueueConsumer(q, handler, prefetch=4, max_attempts=2, backoff=60, poll_interval=0.05)
        builder = HostBuilder()
        builder.services.add_hosted_service(consumer)
        with builder.build():
            assert wait_until(lambda: consumer.stats()["handled"] == 2 and q.stats().dead == 1, timeout=20)
        assert calls == [["ack", "ack", "dead_letter", "release"]], "one call for the whole batch"
        s = q.stats()
        assert (s.depth, s.in_flight, s.dead) == (1, 0, 1), "the flaky one waits for its retry"
        counts = consumer.stats()
        assert (counts["handled"], counts["retried"], counts["dead_lettered"]) == (2, 1, 1)
        assert logs.find("failed 2 time(s) and was dead-lettered", level="ERROR")
        assert logs.find("failed (attempt 1/2), retrying in 60 s", level="WARNING")

    def test_backoff_uses_tenacity_strategies(self, make_queue: Callable[..., Any]) -> None:
        """The retry delay follows the tenacity wait strategy given as backoff."""
        import tenacity

        from hostkit.queues import QueueConsumer

        strategy = tenacity.wait_exponential(multiplier=2, max=10)
        consumer = QueueConsumer(make_queue(), lambda m, s: None, backoff=strategy)
        assert [consumer.backoff_for(n) for n in (1, 2, 3, 4)] == [2, 4, 8, 10]

    def test_concurrency_runs_handlers_in_parallel(self, make_queue: Callable[..., Any]) -> None:
        """concurrency=3 means three handlers run at the same time."""
        import threading

        from hostkit import HostBuilder
        from hostkit.queues import QueueConsumer

        q = make_queue()
        q.enqueue_many([{"n": i} for i in range(3)])
        barrier = threading.Barrier(3, timeout=20)
        names: set[str] = set()

        def handler(message: Any, scope: Any) -> None:
            names.add(threading.current_thread().name)
            barrier.wait()  # only passes if three handlers are in flight together

        builder = HostBuilder()
        builder.services.add_hosted_service(QueueConsumer(q, handler, concurrency=3, poll_interval=0.05, name="par"))
        with builder.build():
            assert wait_until(lambda: q.stats().depth + q.stats().in_flight == 0, timeout=20)
        assert names == {"hostkit-par-1", "hostkit-par-2", "hostkit-par-3"}

    def test_stop_waits_for_a_handler_that_finishes_within_the_drain(self, make_queue: Callable[..., Any]) -> None:
        """A handler in progress at stop finishes and its message is acked."""
        import threading

        from hostkit import HostBuilder
        from hostkit.queues import QueueConsumer

        q = make_queue()
        q.enqueue({"n": 1})
        started, finish = threading.Event(), threading.Event()

        def handler(message: Any, scope: Any) -> None:
            started.set()
            finish.wait(20)

        consumer = QueueConsumer(q, handler, drain_timeout=20, poll_interval=0.05)
        builder = HostBuilder()
        builder.services.add_hosted_service(consumer)
        host = builder.build()
        host.start()
        assert started.wait(20)
        stopper = threading.Thread(target=host.stop)
        stopper.start()
        assert host.lifetime.stopping.wait(20)  # the stop has begun while the handler is still busy
        finish.set()
        stopper.join(30)
        assert not stopper.is_alive()
        assert consumer.stats()["handled"] == 1
        assert (q.stats().depth, q.stats().in_flight) == (0, 0)

    def test_stop_releases_a_handler_that_overruns_the_drain(self, make_queue: Callable[..., Any], logs: Any) -> None:
        """A handler still running after drain_timeout: its message goes back to the queue and is never acked."""
        import threading

        from hostkit import HostBuilder
        from hostkit.queues import QueueConsumer

        q = make_queue()
        q.enqueue({"n": 1})
        started, finish, returned = threading.Event(), threading.Event(), threading.Event()

        def handler(message: Any, scope: Any) -> None:
            started.set()
            finish.wait(30)
            returned.set()

        consumer = QueueConsumer(q, handler, drain_timeout=0.3, poll_interval=0.05)
        builder = HostBuilder()
        builder.services.add_hosted_service(consumer)
        host = builder.build()
        host.start()
        try:
            assert started.wait(20)
            host.stop()
            s = q.stats()
            assert (s.depth, s.in_flight) == (1, 0), "the overrun message must be back in the queue"
            assert logs.find("still running after drain_timeout", level="WARNING")
        finally:
            finish.set()
        assert returned.wait(10)
        # The handler returned after the release: it must not have acked.
        assert wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("hostkit-queue-")])
        assert consumer.stats()["handled"] == 0
        [again] = q.lease("other")
        assert (again.payload, again.attempts) == ({"n": 1}, 1), "the stop must not count as a failed attempt"

    def test_a_dying_consumer_thread_fails_the_service_and_returns_its_message(
        self, make_queue: Callable[..., Any], logs: Any
    ) -> None:
        """A handler raising SystemExit kills its thread: logged CRITICAL, consumer stops, message back in queue."""
        from hostkit import HostBuilder, HostOptions, ServiceState
        from hostkit.queues import QueueConsumer

        q = make_queue()
        q.enqueue({"n": 1})

        def handler(message: Any, scope: Any) -> None:
            raise SystemExit(3)

        builder = HostBuilder(options=HostOptions(on_background_error="ignore"))
        builder.services.add_hosted_service(QueueConsumer(q, handler, poll_interval=0.05, name="dies"))
        host = builder.build()
        with host:
            assert wait_until(lambda: host.status()["QueueConsumer"].state is ServiceState.FAULTED)
            assert logs.find("Queue consumer 'dies': thread hostkit-dies-1 died", "CRITICAL")  # the wording
            assert wait_until(lambda: (q.stats().depth, q.stats().in_flight) == (1, 0), timeout=10)
        assert logs.find("thread hostkit-dies-1 died: SystemExit: 3")
        [again] = q.lease("other")
        assert again.attempts == 2, "a delivery that killed its consumer counts as an attempt"

    def test_a_message_that_keeps_killing_its_consumer_is_dead_lettered(
        self, make_queue: Callable[..., Any], logs: Any
    ) -> None:
        """Past max_deliveries unsettled deliveries, a message is dead-lettered without running the handler."""
        from hostkit import HostBuilder
        from hostkit.queues import QueueConsumer

        q = make_queue(lease_time=0.2)
        q.enqueue({"n": "crasher"})
        for attempt in (1, 2):  # two consumers "die" holding it: their leases just expire
            got: list[Any] = []
            assert wait_until(lambda got=got: got.extend(q.lease(f"dead-{attempt}")) or got, timeout=10)
            assert got[0].attempts == attempt
        called = []
        consumer = QueueConsumer(q, lambda m, s: called.append(m), max_attempts=1, max_deliveries=2, poll_interval=0.05)
        builder = HostBuilder()
        builder.services.add_hosted_service(consumer)
        with builder.build():
            assert wait_until(lambda: q.stats().dead == 1, timeout=20)
        assert called == []
        [dead] = q.dead_letters()
        assert "delivered 3 times (max_deliveries 2) without being settled" in dead.error

    def test_bad_arguments_are_refused_with_the_fix(self, make_queue: Callable[..., Any]) -> None:
        """Wrong consumer options raise ConfigurationError naming the option, expected and got."""
        from hostkit.exceptions import ConfigurationError
        from hostkit.queues import QueueConsumer

        q = make_queue()
        with pytest.raises(ConfigurationError, match=r"concurrency must be an int >= 1, not: 0 \(int\)"):
            QueueConsumer(q, lambda m, s: None, concurrency=0)
        with pytest.raises(ConfigurationError, match=r"max_deliveries \(2\) must be >= max_attempts \(3\)"):
            QueueConsumer(q, lambda m, s: None, max_attempts=3, max_deliveries=2)
        with pytest.raises(ConfigurationError, match=r"queue must be a hostkit\.queues\.Queue"):
            QueueConsumer("jobs", lambda m, s: None)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=r"handler must be callable as handler\(message, scope\)"):
            QueueConsumer(q, 42)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="backoff must be a tenacity wait strategy or seconds"):
            QueueConsumer(q, lambda m, s: None, backoff="1s")  # type: ignore[arg-type]
