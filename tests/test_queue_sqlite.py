"""The SQLite queue backend and the consumer service over it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from hostkit.exceptions import ConfigurationError, PayloadError
from hostkit.queues import SQLiteQueue
from tests.conftest import wait_until
from tests.queue_helpers import (
    ConsumerContract,
    QueueContract,
    assert_outage_logged_quietly,
    most_backoff_steps,
    unique_name,
)

# Another process that holds the database's write lock until told to let go (a long
# migration, an operator's sqlite3 shell with a transaction open).
LOCK_HOLDER = textwrap.dedent(
    """
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    sys.stdin.readline()
    conn.execute("ROLLBACK")
    conn.close()
    """
)


@pytest.fixture
def make_queue(tmp_path: Path) -> Any:
    made: list[SQLiteQueue] = []

    def make(**options: Any) -> SQLiteQueue:
        q = SQLiteQueue(tmp_path / "queue.db", unique_name(), **options)
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()


class TestSQLiteQueueContract(QueueContract):
    """The queue contract, on SQLite."""

    @staticmethod
    def cli_target(q: SQLiteQueue) -> list[str]:
        return ["--sqlite", str(q.path)]


class TestSQLiteConsumer(ConsumerContract):
    """QueueConsumer over SQLite."""


class TestSQLiteConsumerAtFullDurability(ConsumerContract):
    """QueueConsumer over SQLite at durability='full', where consumers hold settlements to share an fsync."""

    @pytest.fixture
    def make_queue(self, tmp_path: Path) -> Any:
        made: list[SQLiteQueue] = []

        def make(**options: Any) -> SQLiteQueue:
            q = SQLiteQueue(tmp_path / "queue.db", unique_name(), **{"durability": "full", **options})
            made.append(q)
            return q

        yield make
        for q in made:
            q.close()


# Counts the fsyncs of each phase: strace logs the syscalls, and chdir(".") marks where a phase ends.
FSYNC_PHASES = textwrap.dedent(
    """
    import os, sys
    from hostkit.queues import SQLiteQueue
    q = SQLiteQueue(sys.argv[1], "f", durability="full")
    # One lease and ack first: starting a fresh write-ahead log syncs its header once.
    assert q.ack(q.lease("c1")[0])
    os.chdir(".")
    held = [q.lease("c1")[0] for _ in range(20)]
    os.chdir(".")
    assert all(q.ack(m) for m in held)
    os.chdir(".")
    q.close()
    """
)


class TestSQLiteSpecifics:
    def test_durability_sets_synchronous(self, tmp_path: Path) -> None:
        """durability='full' and 'normal' set SQLite's synchronous mode in WAL journal mode."""
        for durability, expected in (("full", 2), ("normal", 1), ("off", 0)):
            q = SQLiteQueue(tmp_path / "d.db", "d", durability=durability)  # type: ignore[arg-type]
            conn = q._conn()
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == expected
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            q.close()

    def test_at_full_durability_a_lease_waits_for_no_fsync_and_an_ack_does(self, tmp_path: Path) -> None:
        """durability='full': a lease commits without an fsync (losing it only re-delivers), each ack with one."""
        strace = shutil.which("strace")
        if strace is None:
            pytest.skip("strace is not installed (.ci/system-deps installs it)")
        db = tmp_path / "full.db"
        with SQLiteQueue(db, "f", durability="full") as q:
            q.enqueue_many([{"n": n} for n in range(21)])
        trace = tmp_path / "trace"
        traced = [strace, "-f", "-qq", "-o", str(trace), "-e", "trace=fsync,fdatasync,chdir"]
        run = subprocess.run(
            [*traced, sys.executable, "-c", FSYNC_PHASES, str(db)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if run.returncode != 0 and "ptrace" in run.stderr:
            pytest.skip(f"strace cannot trace here: {run.stderr.strip()}")
        assert run.returncode == 0, run.stderr
        phases = [0]
        for line in trace.read_text().splitlines():
            if "chdir(" in line:
                phases.append(0)
            elif "fsync(" in line or "fdatasync(" in line:
                phases[-1] += 1
        _, leasing, acking, _ = phases
        assert leasing == 0, f"20 leases at durability 'full' waited for {leasing} fsync(s)"
        assert acking >= 20, f"20 acks at durability 'full' made only {acking} fsync(s): an ack must be durable"

    def test_bad_arguments_are_refused(self, tmp_path: Path) -> None:
        """A memory database, a missing directory, an unknown durability or queue name fail at construction."""
        with pytest.raises(ConfigurationError, match="in-memory database cannot be shared"):
            SQLiteQueue(":memory:")
        with pytest.raises(ConfigurationError, match="directory of the queue database does not exist"):
            SQLiteQueue(tmp_path / "missing" / "q.db")
        with pytest.raises(ConfigurationError, match=r"durability must be 'full', 'normal' or 'off', not: 'fast'"):
            SQLiteQueue(tmp_path / "q.db", durability="fast")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="a queue name must be a non-empty str"):
            SQLiteQueue(tmp_path / "q.db", "has space")
        with pytest.raises(ConfigurationError, match="lease_time must be > 0"):
            SQLiteQueue(tmp_path / "q.db", lease_time=0)
        with pytest.raises(ConfigurationError, match="codec must be 'json', 'pickle' or an object"):
            SQLiteQueue(tmp_path / "q.db", codec="yaml")  # type: ignore[arg-type]

    def test_queues_share_a_file_without_mixing(self, tmp_path: Path) -> None:
        """Two queue names in one file keep their messages apart."""
        a, b = SQLiteQueue(tmp_path / "q.db", "a"), SQLiteQueue(tmp_path / "q.db", "b")
        a.enqueue("for a")
        assert b.lease("c") == []
        assert [m.payload for m in a.lease("c")] == ["for a"]
        a.close()
        b.close()

    def test_undecodable_message_is_dead_lettered_not_redelivered_forever(self, tmp_path: Path) -> None:
        """A row another codec wrote is dead-lettered at lease with the reason, so it cannot block the queue."""
        writer = SQLiteQueue(tmp_path / "q.db", "mixed", codec="pickle")
        reader = SQLiteQueue(tmp_path / "q.db", "mixed")
        writer.enqueue({1, 2})
        reader.enqueue({"ok": True})
        assert [m.payload for m in reader.lease("c", max_messages=5)] == [{"ok": True}]
        [dead] = writer.dead_letters()
        assert "undecodable payload" in dead.error
        with pytest.raises(PayloadError, match="not valid JSON"):
            reader.dead_letters()
        writer.close()
        reader.close()

    def test_a_pickled_queue_reconnects_in_the_other_process(self, tmp_path: Path) -> None:
        """A SQLiteQueue crosses to another process by pickle and works there against the same file."""
        import pickle

        q = SQLiteQueue(tmp_path / "q.db", "x")
        script = textwrap.dedent(
            """
            import pickle, sys
            q = pickle.loads(sys.stdin.buffer.read())
            q.enqueue({"from": "child"})
            """
        )
        subprocess.run([sys.executable, "-c", script], input=pickle.dumps(q), check=True, timeout=60)
        assert [m.payload for m in q.lease("c")] == [{"from": "child"}]
        q.close()

    def test_cli_names_a_missing_database(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`hostkit queue` with a wrong --sqlite path exits 2 with one line naming the path."""
        from hostkit.cli import main

        missing = tmp_path / "nope.db"
        assert main(["queue", "stats", "jobs", "--sqlite", str(missing)]) == 2
        err = capsys.readouterr().err
        assert f"hostkit queue: error: no queue database at {str(missing)!r}" in err
        assert not missing.exists(), "inspecting must not create a database"

    @pytest.mark.timeout(120)
    def test_consumer_runs_with_process_placement(self, tmp_path: Path) -> None:
        """placement='process': the same QueueConsumer consumes in a child process and stops with the host."""
        from hostkit import HostBuilder
        from hostkit.queues import QueueConsumer

        q = SQLiteQueue(tmp_path / "q.db", "proc")
        q.enqueue_many([{"n": i} for i in range(20)])
        out = tmp_path / "pids"

        def handler(message: Any, scope: Any) -> None:
            with open(out, "a") as f:
                f.write(f"{os.getpid()}\n")

        builder = HostBuilder()
        builder.services.add_hosted_service(
            QueueConsumer(q, handler, concurrency=2, poll_interval=0.05), placement="process"
        )
        with builder.build():
            assert wait_until(lambda: q.stats().depth + q.stats().in_flight == 0, timeout=60)
        pids = set(out.read_text().split())
        assert len(out.read_text().split()) == 20
        assert pids and str(os.getpid()) not in pids, "handlers must run in the child"
        q.close()

    @pytest.mark.timeout(120)
    def test_several_processes_never_lease_the_same_message(self, tmp_path: Path) -> None:
        """Four processes leasing and acking in parallel each get distinct messages: every one exactly once."""
        path = tmp_path / "q.db"
        q = SQLiteQueue(path, "par")
        q.enqueue_many([{"n": i} for i in range(2000)])
        script = textwrap.dedent(
            """
            import os, sys, time
            from hostkit.queues import SQLiteQueue
            q = SQLiteQueue(sys.argv[1], "par")
            # Start gate: all four lease in parallel, not one draining the queue before
            # the others have even started their interpreter.
            open(sys.argv[2] + ".ready." + str(os.getpid()), "w").close()
            deadline = time.monotonic() + 60
            while not os.path.exists(sys.argv[2] + ".go") and time.monotonic() < deadline:
                time.sleep(0.005)
            got = []
            while True:
                batch = q.lease("c", max_messages=8)
                if not batch:
                    break
                for m in batch:
                    assert q.ack(m)
                    got.append(m.payload["n"])
            print(" ".join(map(str, got)))
            """
        )
        gate = str(tmp_path / "gate")
        procs = [
            subprocess.Popen([sys.executable, "-c", script, str(path), gate], stdout=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        assert wait_until(lambda: len(list(tmp_path.glob("gate.ready.*"))) == 4, timeout=60)
        Path(gate + ".go").touch()
        outputs = [p.communicate(timeout=100)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0]
        numbers = [int(n) for out in outputs for n in out.split()]
        assert sorted(numbers) == list(range(2000)), "each message exactly once across processes"
        assert sum(1 for out in outputs if out.strip()) >= 2, "the work should have been shared"
        q.close()


class TestSQLiteOutage:
    @pytest.mark.timeout(60)
    def test_a_write_lock_held_past_busy_timeout_is_ridden_out_like_an_outage(self, tmp_path: Path, logs: Any) -> None:
        """SQLite's outage: another process holds the write lock from before start-up, past busy_timeout.

        The host starts not ready, saying why, logs one WARNING per back-off step, and
        consumes every message once the lock is let go.
        """
        from hostkit import HostBuilder
        from hostkit.health import HealthStatus, use_health
        from hostkit.queues import QueueConsumer

        path = tmp_path / "q.db"
        queue = SQLiteQueue(path, "jobs", busy_timeout=0.05)
        queue.enqueue_many([{"n": n} for n in range(5)])
        holder = subprocess.Popen(
            [sys.executable, "-c", LOCK_HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None and holder.stdin is not None
            assert holder.stdout.readline().strip() == "locked"
            handled: list[int] = []
            consumer = QueueConsumer(
                queue, lambda m, s: handled.append(m.payload["n"]), concurrency=2, poll_interval=0.05, name="jobs"
            )
            builder = HostBuilder()
            checks = use_health(builder)
            builder.services.add_hosted_service(consumer, name="jobs")
            began = time.monotonic()
            with builder.build() as host:
                assert wait_until(
                    lambda: (host.status()["jobs"].detail or "").startswith(
                        "broker unavailable: OperationalError, next try in "
                    )
                ), host.status()["jobs"]
                ready = checks.run("ready")
                assert ready.status is HealthStatus.UNHEALTHY
                assert ready["jobs.broker"].result.data["error"] == "OperationalError: database is locked"
                assert wait_until(lambda: checks.run("ready")["jobs.broker"].result.data.get("tries", 0) >= 4)
                assert handled == []
                holder.stdin.write("go\n")
                holder.stdin.flush()
                assert holder.wait(10) == 0
                locked_for = time.monotonic() - began
                assert wait_until(lambda: sorted(handled) == [0, 1, 2, 3, 4], timeout=30), handled
                assert wait_until(lambda: checks.run("ready").status is HealthStatus.HEALTHY)
                assert host.status()["jobs"].detail is None
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait(10)
            for stream in (holder.stdin, holder.stdout):
                if stream is not None:
                    stream.close()
        assert_outage_logged_quietly(logs, "jobs", reconnected="connected to", max_steps=most_backoff_steps(locked_for))
        assert (queue.stats().depth, queue.stats().in_flight) == (0, 0)
        queue.close()

    def test_reconnect_backoff_is_0_1_s_doubling_to_5_s_with_jitter(self, tmp_path: Path) -> None:
        """The default wait between tries while the broker is down: 0.1 s doubling to 5 s, each cut by up to a fifth."""
        import tenacity

        from hostkit.exceptions import ConfigurationError
        from hostkit.queues import QueueConsumer

        queues = [SQLiteQueue(tmp_path / "q.db") for _ in range(3)]
        consumer = QueueConsumer(queues[0], lambda m, s: None)
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        for attempt in range(1, 12):
            state.attempt_number = attempt
            full = min(0.1 * 2 ** (attempt - 1), 5.0)
            waits = {consumer.reconnect_backoff(state) for _ in range(20)}
            assert all(0.8 * full <= w <= full for w in waits), (attempt, waits)
            assert len(waits) > 1, "jittered: not every consumer of a fleet waits the same"
        fixed = QueueConsumer(queues[1], lambda m, s: None, reconnect_backoff=2)
        assert fixed.reconnect_backoff(state) == 2
        with pytest.raises(ConfigurationError, match="reconnect_backoff must be a tenacity wait strategy or seconds"):
            QueueConsumer(queues[2], lambda m, s: None, reconnect_backoff="5s")  # type: ignore[arg-type]
        for queue in queues:  # closed here, not by the garbage collector in some later test
            queue.close()

    def test_a_failed_lease_that_is_no_outage_keeps_its_traceback(self, tmp_path: Path, logs: Any) -> None:
        """A lease failing with a bug, not an outage: ERROR with its traceback on try 1, then one line per try."""
        from hostkit import HostBuilder
        from hostkit.queues import QueueConsumer

        failures = 3

        class Buggy(SQLiteQueue):
            def lease(self, consumer: str, **options: Any) -> Any:
                nonlocal failures
                if failures:
                    failures -= 1
                    raise TypeError("a bug in a custom backend")
                return super().lease(consumer, **options)

        queue = Buggy(tmp_path / "q.db", "jobs")
        queue.enqueue({"n": 1})
        handled: list[int] = []
        consumer = QueueConsumer(queue, lambda m, s: handled.append(m.payload["n"]), poll_interval=0.05, name="jobs")
        builder = HostBuilder()
        builder.services.add_hosted_service(consumer, name="jobs")
        with builder.build():
            assert wait_until(lambda: handled == [1], timeout=20)
        [first] = logs.find("Queue consumer 'jobs': leasing from", level="ERROR")
        assert first["exception"] is not None
        assert "failed with TypeError: a bug in a custom backend; next try in 0.1 s" in first["message"]
        later = logs.find("Queue consumer 'jobs': leasing from", level="WARNING")
        assert len(later) == 2 and all(r["exception"] is None for r in later)
        assert len(logs.find("Queue consumer 'jobs': connected to", level="INFO")) == 1
        queue.close()
