"""Once per cluster: lock backends, fencing tokens, the slot ledger, and hosts in separate processes.

The Redis tests run a real redis-server (tests/queue_helpers.py); the PostgreSQL tests a
real PostgreSQL server on 127.0.0.1 (tests/pg_helpers.py). Each "machine" is a separate
host process (tests/cluster_helpers.py) that records what its service did, with the
monotonic clock every process of this machine shares.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from hostkit import BackgroundService, CancellationToken, HostBuilder, LockStatus, OncePerDeployment
from hostkit._ledger import SlotLedger, SlotState, current_ledger
from hostkit.cluster import FileLock, Lease, PostgresLock, RedisLease, current_lease
from hostkit.exceptions import ConfigurationError
from tests.cluster_helpers import POSTGRES_SCHEMA, record_lines
from tests.conftest import wait_until
from tests.pg_helpers import PostgresServer, postgres_server, start_postgres
from tests.queue_helpers import RedisServer, redis_server
from tests.subproc import python

__all__ = ["postgres_server", "redis_server"]  # session fixtures, imported so pytest finds them here

HELPER = Path(__file__).with_name("cluster_helpers.py")
SLOT = datetime(2026, 3, 29, 1, 0, tzinfo=timezone.utc)
TTL = 2.0
#: Scheduling delay allowed on top of a promised time, on a loaded 2-core machine.
SLACK = 1.0

#: Takeover times measured by the kill tests (seconds from SIGKILL to the new holder's start).
TAKEOVERS: list[float] = []


def unique_key() -> str:
    return f"job-{uuid.uuid4().hex[:10]}"


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


class TestOptionalExtras:
    def test_import_hostkit_and_its_cluster_module_import_neither_redis_nor_psycopg(self) -> None:
        """`import hostkit`, OncePerDeployment and hostkit.cluster load no optional extra."""
        out = _fresh(
            """
            import sys
            import hostkit
            from hostkit import OncePerDeployment
            from hostkit.cluster import FileLock, PostgresLock, RedisLease, current_lease
            print(sorted(m for m in ("redis", "psycopg") if m in sys.modules))
            """
        )
        assert out == "[]"


class TestValidation:
    def test_bad_lease_options_are_refused_at_construction(self) -> None:
        """Timings that could not keep the promise, bad URLs and keys fail when the backend is made."""
        with pytest.raises(ConfigurationError, match=r"renew_interval \(1 s\) must be less than half of ttl \(2 s\)"):
            RedisLease("redis://127.0.0.1:6379/0", ttl=2, renew_interval=1)
        with pytest.raises(ConfigurationError, match=r"RedisLease ttl must be > 0 seconds, not: 0"):
            RedisLease("redis://127.0.0.1:6379/0", ttl=0)
        with pytest.raises(ConfigurationError, match=r"RedisLease url must be a redis URL .* not: 'localhost'"):
            RedisLease("localhost")
        with pytest.raises(ConfigurationError, match=r"needs a redis URL or a redis.Redis client, not: 3 \(int\)"):
            RedisLease(3)
        with pytest.raises(ConfigurationError, match=r"key must be a non-empty string, not: ''"):
            RedisLease("redis://127.0.0.1:6379/0", key="")
        # Accepted: the default renewal (ttl / 3) and one just under half.
        assert RedisLease("redis://127.0.0.1:6379/0", ttl=3).renew_interval == 1.0
        RedisLease("redis://127.0.0.1:6379/0", ttl=3, renew_interval=1.49)

    def test_once_per_deployment_takes_one_lock(self, tmp_path: Path) -> None:
        """lock= and lock_path= together, or a lock that is not a backend, are refused naming the fix."""
        with pytest.raises(ConfigurationError, match=r"lock= or lock_path=, not both: lock_path=PATH is the shortcut"):
            OncePerDeployment(Idle(), lock=FileLock(tmp_path / "a.lock"), lock_path=tmp_path / "a.lock")
        with pytest.raises(
            ConfigurationError, match=r"lock must be a lock backend from hostkit.cluster .* not: 'redis"
        ):
            OncePerDeployment(Idle(), lock="redis://127.0.0.1/0")  # type: ignore[arg-type]
        once = OncePerDeployment(Idle(), lock_path=tmp_path / "b.lock")
        assert isinstance(once.lock, FileLock) and once.lock_path == str(tmp_path / "b.lock")


class Idle(BackgroundService):
    def execute(self, stopping: CancellationToken) -> None:
        stopping.wait()


# -- leases on one key: tokens and the ledger -----------------------------------------------


def redis_leases(server: RedisServer, key: str, ttl: float = TTL) -> tuple[Lease, Lease]:
    backend = RedisLease(server.url, ttl=ttl)
    return backend.lease(key), backend.lease(key)


def check_ledger_refuses_a_stale_token(old: Lease, new: Lease, take_over: Callable[[], None]) -> None:
    """Ledger semantics shared by every backend: only the current token writes."""
    assert old.try_acquire()
    assert isinstance(old, SlotLedger)
    assert old.slot_state("nightly") == SlotState()
    assert old.begin_slot("nightly", SLOT)
    assert old.slot_state("nightly") == SlotState(completed=None, begun=SLOT)
    take_over()
    assert new.try_acquire()
    assert new.token is not None and old.token is not None and new.token > old.token
    # The old holder does not know yet; its writes are refused and change nothing.
    assert not old.begin_slot("nightly", SLOT + timedelta(hours=1))
    assert not old.complete_slot("nightly", SLOT)
    assert not old.is_current()
    assert new.is_current()
    assert new.slot_state("nightly") == SlotState(completed=None, begun=SLOT)
    assert new.complete_slot("nightly", SLOT)
    assert new.slot_state("nightly") == SlotState(completed=SLOT, begun=None)
    # A slot begun and not completed shows beside the last completed one; other schedules are apart.
    later = SLOT + timedelta(hours=1)
    assert new.begin_slot("nightly", later)
    assert new.slot_state("nightly") == SlotState(completed=SLOT, begun=later)
    assert new.slot_state("hourly") == SlotState()
    # Stored in UTC whatever the slot's zone; a naive datetime is refused.
    berlin = timezone(timedelta(hours=2))
    assert new.complete_slot("nightly", later.astimezone(berlin))
    assert new.slot_state("nightly") == SlotState(completed=later, begun=None)
    with pytest.raises(ConfigurationError, match=r"a slot must be a timezone-aware datetime, not: datetime"):
        new.begin_slot("nightly", datetime(2026, 1, 1))
    new.release()
    old.release()


class TestRedisLease:
    def test_one_holder_and_the_token_grows_with_every_takeover(self, redis_server: RedisServer) -> None:
        """Of two leases on a key one holds; the standby sees who; each takeover hands out a higher token."""
        a, b = redis_leases(redis_server, unique_key())
        assert a.try_acquire()
        assert not b.try_acquire()
        assert b.holder.pid == os.getpid() and b.holder.host
        first = a.token
        assert first is not None and first > 1_000_000_000_000, "seeded from the server's clock in ms"
        a.release()
        assert b.try_acquire()
        assert b.token == first + 1
        assert a.renew() is False
        b.release()
        assert a.try_acquire()
        assert a.token == first + 2
        a.release()

    def test_ledger_refuses_a_stale_token(self, redis_server: RedisServer) -> None:
        """After the lease expired and another took it, the old holder can neither renew nor record a slot."""
        key = unique_key()
        old, new = redis_leases(redis_server, key)
        import redis

        with redis.Redis.from_url(redis_server.url) as client:
            # The lease key expires (deleted here rather than waited for), and the other lease takes it.
            check_ledger_refuses_a_stale_token(old, new, lambda: client.delete(f"hostkit:lock:{{{key}}}"))
        assert old.renew() is False

    def test_a_client_is_accepted_and_its_settings_copied(self, redis_server: RedisServer) -> None:
        """A redis.Redis client works as the target; the lease makes its own pool with its own timeouts."""
        import redis

        with redis.Redis.from_url(redis_server.url) as client:
            backend = RedisLease(client, ttl=TTL)
            lease = backend.lease(unique_key())
            assert lease.try_acquire()
            assert lease.is_current()
            lease.release()
        assert backend.where == f"unix://{redis_server.socket}"

    def test_the_token_keeps_growing_across_a_restart_without_persistence(self) -> None:
        """A server that restarts empty seeds the counter from its clock: the next token is still higher."""
        server = RedisServer()
        try:
            server.start()
        except RuntimeError as err:
            server.stop()
            pytest.skip(f"no redis-server: {err}")
        try:
            key = unique_key()
            lease = RedisLease(server.url, ttl=TTL).lease(key)
            assert lease.try_acquire()
            before = lease.token
            lease.release()
            server.halt()
            server.start()
            assert lease.try_acquire()
            assert lease.token is not None and before is not None and lease.token > before
            lease.release()
        finally:
            server.stop()


class TestFileLease:
    def test_token_counts_takeovers_and_the_ledger_refuses_a_stale_token(self, tmp_path: Path) -> None:
        """The file lock's token is a counter in its state file; a lease that is no longer held writes nothing."""
        backend = FileLock(tmp_path / "f.lock")
        old, new = backend.lease("job"), backend.lease("job")
        assert old.try_acquire()
        assert old.token == 1
        assert not new.try_acquire()
        assert new.holder.pid == os.getpid()
        stale_token = old.token

        def take_over() -> None:
            # Another process took over: the flock is free, and the next holder counts one more.
            old.lock.release()

        check_ledger_refuses_a_stale_token(old, new, take_over)
        assert stale_token == 1
        again = backend.lease("job")
        assert again.try_acquire() and again.token == 3
        assert again.slot_state("nightly").completed == SLOT + timedelta(hours=1)
        again.release()


# -- OncePerDeployment in one process -----------------------------------------------------


class LeaseRecorder(BackgroundService):
    def __init__(self) -> None:
        self.seen: list[tuple[Lease | None, Any]] = []
        self.stopped_at: float | None = None

    def execute(self, stopping: CancellationToken) -> None:
        self.seen.append((current_lease(), current_ledger()))
        stopping.wait()
        self.stopped_at = time.monotonic()


class TestOncePerDeploymentOnRedis:
    def test_the_service_gets_its_lease_and_ledger_and_status_shows_the_token(self, redis_server: RedisServer) -> None:
        """current_lease() and current_ledger() are the holder's lease; status shows backend and token."""
        key = unique_key()
        service = LeaseRecorder()
        builder = HostBuilder()
        once = OncePerDeployment(service, lock=RedisLease(redis_server.url, key=key, ttl=TTL))
        builder.add_hosted_service(once)
        host = builder.build()
        with host:
            assert wait_until(lambda: service.seen)
            [(lease, ledger)] = service.seen
            assert lease is not None and ledger is lease and lease.token is not None
            assert once.lease is lease and once.holding
            status = host.status()["OncePerDeployment"].lock
            assert status == LockStatus(
                "holder", lease.where, os.getpid(), "redis", lease.token, status.holder_host if status else None
            )
            assert status is not None and status.holder_host
            assert f"hostkit:lock:{{{key}}}" in status.path and redis_server.socket in status.path
            detail = host.status()["OncePerDeployment"].detail
            assert detail == f"holds the redis lock {lease.where} (pid {os.getpid()}), fencing token {lease.token}"
        assert current_lease() is None
        assert once.lease is None and not once.holding

    def test_a_lost_lease_cancels_the_service_within_one_renewal_period(
        self, redis_server: RedisServer, logs: Any
    ) -> None:
        """When the lease key is taken away, the holder cancels its service at its next renewal, then stands by."""
        import redis

        key = unique_key()
        service = LeaseRecorder()
        backend = RedisLease(redis_server.url, key=key, ttl=TTL)
        builder = HostBuilder()
        builder.add_hosted_service(OncePerDeployment(service, lock=backend, poll_interval=0.05), name="R")
        host = builder.build()
        with host, redis.Redis.from_url(redis_server.url) as client:
            assert wait_until(lambda: service.seen)
            # Another holder took the key (as after an expiry); the counter moves on.
            lease_key = f"hostkit:lock:{{{key}}}"
            client.set(lease_key, "1 1 elsewhere", px=int(TTL * 1000))
            taken = time.monotonic()
            assert wait_until(lambda: service.stopped_at is not None, timeout=10)
            assert service.stopped_at is not None
            assert service.stopped_at - taken <= backend.renew_interval + SLACK  # type: ignore[operator]
            assert wait_until(lambda: (s := host.status()["R"].lock) is not None and s.role == "standby")
            assert host.status()["R"].lock.holder_host == "elsewhere"  # type: ignore[union-attr]
            client.delete(lease_key)
            assert wait_until(lambda: len(service.seen) == 2, timeout=10)
        assert logs.find("'LeaseRecorder' lost the redis lock", level="WARNING")
        assert logs.find("the lease has another holder or expired")
        assert logs.find("'LeaseRecorder' stopped after it lost the redis lock")

    def test_a_service_that_returns_runs_once_and_the_lease_is_released(self, redis_server: RedisServer) -> None:
        """execute returning on its own ends the wrapper too (it is not run again), and frees the lease."""
        import redis

        key = unique_key()
        runs: list[int] = []

        class OneShot(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                runs.append(1)

        once = OncePerDeployment(OneShot(), lock=RedisLease(redis_server.url, key=key, ttl=TTL), poll_interval=0.05)
        host = HostBuilder().add_hosted_service(once, name="OneShot").build()
        with host, redis.Redis.from_url(redis_server.url) as client:
            assert wait_until(lambda: host.status()["OneShot"].state.value == "completed")
            assert runs == [1]
            assert not client.exists(f"hostkit:lock:{{{key}}}")

    def test_raise_if_cancelled_after_a_lost_lease_is_a_stop_not_a_failure(
        self, redis_server: RedisServer, logs: Any
    ) -> None:
        """A service that raises OperationCancelledError when its lease is lost stands by; nothing failed."""
        import redis

        key = unique_key()
        started: list[int] = []

        class Strict(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                started.append(1)
                while True:
                    stopping.raise_if_cancelled()
                    stopping.wait(0.02)

        once = OncePerDeployment(Strict(), lock=RedisLease(redis_server.url, key=key, ttl=TTL), poll_interval=0.05)
        host = HostBuilder().add_hosted_service(once, name="Strict").build()
        with host, redis.Redis.from_url(redis_server.url) as client:
            assert wait_until(lambda: started == [1])
            client.set(f"hostkit:lock:{{{key}}}", "1 1 elsewhere", px=int(TTL * 1000))
            assert wait_until(lambda: (s := host.status()["Strict"].lock) is not None and s.role == "standby")
            status = host.status()["Strict"]
            assert (status.state.value, status.restarts, status.error) == ("running", 0, None)
            client.delete(f"hostkit:lock:{{{key}}}")
            assert wait_until(lambda: started == [1, 1], timeout=10)
        assert not [r["message"] for r in logs.records if r["level"] in ("ERROR", "CRITICAL")]

    @pytest.mark.timeout(120)
    def test_process_placement_the_child_holds_the_lease(self, redis_server: RedisServer) -> None:
        """With placement='process' the child takes the Redis lease; status shows its token; released at stop."""
        import redis

        key = unique_key()
        once = OncePerDeployment(Idle(), lock=RedisLease(redis_server.url, key=key, ttl=TTL), poll_interval=0.05)
        host = HostBuilder().add_hosted_service(once, placement="process", name="Idle").build()
        lease_key = f"hostkit:lock:{{{key}}}"
        with host, redis.Redis.from_url(redis_server.url) as client:

            def child_holds() -> bool:
                s = host.status()["Idle"]
                return (
                    s.lock is not None
                    and s.lock.role == "holder"
                    and s.lock.backend == "redis"
                    and s.pid != os.getpid()
                    and s.lock.holder_pid == s.pid
                    and s.lock.token is not None
                )

            assert wait_until(child_holds, timeout=60)
            status = host.status()["Idle"]
            assert status.lock is not None
            assert client.get(lease_key).decode().split(" ")[:2] == [str(status.lock.token), str(status.pid)]
        assert not client.exists(lease_key), "the child released the lease when it stopped"


# -- hosts in separate processes ------------------------------------------------------------


def start_hosts(
    spawn: Callable[..., Any], backend: str, target: str, key: str, folder: Path, n: int, ttl: float = TTL
) -> list[Any]:
    hosts = []
    for _ in range(n):
        proc = spawn(python(HELPER, "host", backend, target, key, str(folder), str(ttl)))
        hosts.append(proc)
    for proc in hosts:
        proc.wait_for_output("ready\n")
    return hosts


def running(folder: Path, killed: Collection[int] = ()) -> dict[int, int]:
    """pid -> token of every host (not killed) whose service started and has not recorded its stop."""
    now: dict[int, int] = {}
    for pid, events in record_lines(folder).items():
        if pid in killed:
            continue
        for event, token, _ in events:
            if event == "start":
                now[pid] = token
            elif event == "stop":
                now.pop(pid, None)
    return now


def starts(folder: Path) -> list[tuple[float, int, int]]:
    """(time, pid, token) of every start, in order."""
    return sorted((t, pid, tok) for pid, ev in record_lines(folder).items() for e, tok, t in ev if e == "start")


def assert_never_two_at_once(folder: Path, killed: dict[int, float]) -> None:
    """The service's runs (start to stop, or to the SIGKILL) never overlap, and tokens grow run after run."""
    runs = []
    for pid, events in record_lines(folder).items():
        began = None
        for event, token, t in events:
            if event == "start":
                began = (t, token)
            elif event == "stop" and began is not None:
                runs.append((began[0], t, token, pid))
                began = None
        if began is not None:
            runs.append((began[0], killed.get(pid, float("inf")), began[1], pid))
    runs.sort()
    for before, after in itertools.pairwise(runs):
        assert before[1] <= after[0], f"two runs at once: {before} and {after}"
        assert before[2] < after[2], f"the token did not grow: {before} then {after}"


def assert_exactly_once_for_a_while(folder: Path, seconds: float, killed: Collection[int] = ()) -> int:
    """One host runs the service, and stays the only one, for ``seconds``; returns its pid."""
    assert wait_until(lambda: len(running(folder, killed)) == 1, timeout=30)
    deadline = time.monotonic() + seconds
    holder = list(running(folder, killed))
    while time.monotonic() < deadline:
        assert list(running(folder, killed)) == holder, f"the service runs in {running(folder, killed)}"
        time.sleep(0.05)
    return holder[0]


def kill_and_measure(hosts: list[Any], folder: Path, killed: dict[int, float], deadline: float) -> tuple[int, float]:
    """SIGKILL the holder; wait for another host's start; return (new holder, takeover seconds)."""
    [holder] = list(running(folder, killed))
    proc = next(p for p in hosts if p.pid == holder)
    count = len(starts(folder))
    proc.signal(signal.SIGKILL)
    killed[holder] = time.monotonic()
    proc.wait(10)
    assert wait_until(lambda: len(starts(folder)) > count, timeout=deadline + 10)
    t, pid, _ = starts(folder)[-1]
    assert pid != holder
    return pid, t - killed[holder]


@pytest.fixture
def record_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "records"
    folder.mkdir()
    yield folder


class TestRedisCluster:
    @pytest.mark.timeout(120)
    def test_three_hosts_run_it_once_and_take_over_after_sigkill(
        self, redis_server: RedisServer, spawn: Callable[..., Any], record_dir: Path
    ) -> None:
        """Three host processes: the service runs in one; SIGKILL of the holder -> another runs it within the TTL."""
        key = unique_key()
        hosts = start_hosts(spawn, "redis", redis_server.url, key, record_dir, 3)
        killed: dict[int, float] = {}
        assert_exactly_once_for_a_while(record_dir, 1.0)
        for _ in range(2):
            _, took = kill_and_measure(hosts, record_dir, killed, TTL)
            TAKEOVERS.append(took)
            print(f"redis takeover after SIGKILL: {took:.3f} s (ttl {TTL} s)")
            # Within the lease time of the holder's last renewal (at most ttl after the kill), plus scheduling.
            assert took <= TTL + SLACK
            assert_exactly_once_for_a_while(record_dir, 0.5, killed)
        assert_never_two_at_once(record_dir, killed)
        for proc in hosts:
            if proc.pid not in killed:
                proc.signal(signal.SIGTERM)
                proc.wait(30)

    @pytest.mark.timeout(120)
    def test_a_paused_holder_is_fenced_out_and_stops(
        self, redis_server: RedisServer, spawn: Callable[..., Any], record_dir: Path
    ) -> None:
        """SIGSTOP the holder mid-work past its lease; another takes over; after SIGCONT its write is refused."""
        import redis

        key = unique_key()
        hosts = start_hosts(spawn, "redis", redis_server.url, key, record_dir, 2)
        holder = assert_exactly_once_for_a_while(record_dir, 0.2)
        proc = next(p for p in hosts if p.pid == holder)
        (record_dir / "work").touch()
        assert wait_until(lambda: any(e == "working" for e, _, _ in record_lines(record_dir)[holder]), timeout=10)
        proc.signal(signal.SIGSTOP)
        paused = time.monotonic()
        try:
            (record_dir / "work").unlink()
            # The other host takes over once the lease expired, and writes with its higher token.
            assert wait_until(lambda: len(starts(record_dir)) == 2, timeout=TTL + 10)
            _, new_pid, new_token = starts(record_dir)[-1]
            assert new_pid != holder

            def new_wrote() -> bool:
                return ("write-ok", new_token) in [(e, t) for e, t, _ in record_lines(record_dir)[new_pid]]

            assert wait_until(new_wrote, timeout=10)
        finally:
            proc.signal(signal.SIGCONT)
        resumed = time.monotonic()
        print(
            f"redis takeover of a paused holder: {starts(record_dir)[-1][0] - paused:.3f} s after SIGSTOP (ttl {TTL} s)"
        )
        assert paused < starts(record_dir)[-1][0] < resumed, "the other host took over while the holder was paused"
        # The old holder finishes its work, writes with its old token: refused. Then it stops.
        old = lambda: record_lines(record_dir)[holder]  # noqa: E731
        assert wait_until(lambda: any(e == "stop" for e, _, _ in old()), timeout=10)
        old_token = next(t for e, t, _ in old() if e == "start")
        after = [e for e, _, t in old() if t > paused]
        assert after[0] == "write-refused", f"the write after the pause must be refused: {old()}"
        assert "write-ok" not in after, "a stale write was accepted"
        stop_at = next(t for e, _, t in old() if e == "stop")
        renew = TTL / 3
        assert stop_at - resumed <= renew + SLACK, "the old holder stops within one renewal period of resuming"
        # The resource saw the new token and kept the old one out.
        with redis.Redis.from_url(redis_server.url) as client:
            assert int(client.get(f"resource:{key}:fence")) == new_token
            writers = [entry.decode().split() for entry in client.lrange(f"resource:{key}:log", 0, -1)]
        first_new = next(i for i, (tok, _) in enumerate(writers) if int(tok) == new_token)
        assert all(int(tok) == new_token for tok, _ in writers[first_new:]), "no old token after the new one"
        assert old_token < new_token
        assert running(record_dir) == {new_pid: new_token}
        for p in hosts:
            p.signal(signal.SIGTERM)
            p.wait(30)

    @pytest.mark.timeout(120)
    def test_a_cut_off_holder_stops_before_the_new_one_starts(
        self, redis_server: RedisServer, spawn: Callable[..., Any], record_dir: Path, tmp_path: Path
    ) -> None:
        """The holder reaches Redis through a proxy; stopping the proxy cuts it off: it stops its service
        before the lease expires, so its stop precedes the other host's start."""
        key = unique_key()
        proxy_socket = str(tmp_path / "proxy.sock")
        proxy = spawn(python(HELPER, "proxy", proxy_socket, redis_server.socket))
        proxy.wait_for_output("ready\n")
        [cut] = start_hosts(spawn, "redis", f"unix://{proxy_socket}", key, record_dir, 1)
        assert wait_until(lambda: list(running(record_dir)) == [cut.pid], timeout=30)
        [other] = start_hosts(spawn, "redis", redis_server.url, key, record_dir, 1)
        assert_exactly_once_for_a_while(record_dir, 0.3)
        proxy.signal(signal.SIGSTOP)
        try:
            assert wait_until(lambda: len(starts(record_dir)) == 2, timeout=TTL + 10)
            assert wait_until(lambda: any(e == "stop" for e, _, _ in record_lines(record_dir)[cut.pid]), timeout=10)
        finally:
            proxy.signal(signal.SIGCONT)
        stop_at = next(t for e, _, t in record_lines(record_dir)[cut.pid] if e == "stop")
        new_start, new_pid, _ = starts(record_dir)[-1]
        assert new_pid == other.pid
        print(f"redis partition: the cut-off holder stopped {new_start - stop_at:.3f} s before the new holder started")
        assert stop_at < new_start, "the cut-off holder must stop before another instance takes over"
        assert_never_two_at_once(record_dir, {})
        for p in (cut, other):
            p.signal(signal.SIGTERM)
            p.wait(30)

    @pytest.mark.timeout(120)
    def test_a_redis_restart_is_survived(self, spawn: Callable[..., Any], record_dir: Path) -> None:
        """The server goes away: the holder stops its service; once it is back, the service runs again, once."""
        server = RedisServer()
        try:
            server.start()
        except RuntimeError as err:
            server.stop()
            pytest.skip(f"no redis-server: {err}")
        try:
            key = unique_key()
            hosts = start_hosts(spawn, "redis", server.url, key, record_dir, 2)
            assert_exactly_once_for_a_while(record_dir, 0.3)
            before = starts(record_dir)[-1][2]
            server.halt()
            assert wait_until(lambda: not running(record_dir), timeout=TTL + 10)
            server.start()
            assert_exactly_once_for_a_while(record_dir, 1.0)
            [(_, token)] = running(record_dir).items()
            assert token > before, "the token after the restart is higher than any before it"
            assert_never_two_at_once(record_dir, {})
            for p in hosts:
                p.signal(signal.SIGTERM)
                p.wait(30)
        finally:
            server.stop()


# -- PostgreSQL ------------------------------------------------------------------------------


def prepare_resource(server: PostgresServer, key: str) -> None:
    """The table the host processes write to, behind the fence of ``key``."""
    import psycopg

    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(POSTGRES_SCHEMA)


def pg_backend_of(server: PostgresServer, lease: Lease) -> int:
    """The server pid of the session holding ``lease``'s advisory lock."""
    import psycopg

    with psycopg.connect(server.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (f"hostkit {os.getpid()} {socket.gethostname()[:40]}",),
        ).fetchall()
    assert row, "the holder's session must be visible"
    return int(row[0][0])


class TestPostgresLock:
    def test_bad_options_are_refused_at_construction(self) -> None:
        """Neither or both of dsn/connect, bad timings, a bad table name or DSN fail when the backend is made."""
        with pytest.raises(ConfigurationError, match=r"needs exactly one of dsn= .* and connect="):
            PostgresLock()
        with pytest.raises(ConfigurationError, match=r"needs exactly one of dsn= .* and connect="):
            PostgresLock("dbname=x", connect=lambda: None)
        with pytest.raises(ConfigurationError, match=r"renew_interval \(1 s\) must be less than half of ttl \(2 s\)"):
            PostgresLock("dbname=x", ttl=2, renew_interval=1)
        with pytest.raises(ConfigurationError, match=r"PostgresLock ttl must be at least 1 second, not: 0.5"):
            PostgresLock("dbname=x", ttl=0.5)
        with pytest.raises(ConfigurationError, match=r"table must be a plain SQL name .* not: 'a; drop'"):
            PostgresLock("dbname=x", table="a; drop")
        with pytest.raises(ConfigurationError, match=r"dsn is not a connection string libpq accepts"):
            PostgresLock("host=db port")
        with pytest.raises(ConfigurationError, match=r"connect must be a function returning a new psycopg connection"):
            PostgresLock(connect=3)  # type: ignore[arg-type]
        lock = PostgresLock("postgresql://app:secret@db.example:5433/shop", ttl=3)
        assert lock.renew_interval == 1.0
        assert lock.where == "postgresql://app@db.example:5433/shop", "no password in status pages"

    def test_one_holder_and_the_token_grows_with_every_takeover(self, postgres_server: PostgresServer) -> None:
        """Of two leases on a key one holds; the standby sees the holder's pid; each takeover adds one."""
        backend = PostgresLock(postgres_server.dsn, ttl=TTL)
        key = unique_key()
        a, b = backend.lease(key), backend.lease(key)
        assert a.try_acquire()
        assert a.token == 1
        assert not b.try_acquire()
        assert b.holder.pid == os.getpid() and b.holder.host == socket.gethostname()[:40]
        a.release()
        assert b.try_acquire() and b.token == 2
        assert b.renew() and b.is_current()
        b.release()
        assert a.try_acquire() and a.token == 3
        a.release()

    def test_ledger_refuses_a_stale_token(self, postgres_server: PostgresServer) -> None:
        """The server ended the holder's session; another took the lock; the old holder records nothing."""
        import psycopg

        backend = PostgresLock(postgres_server.dsn, ttl=TTL)
        key = unique_key()
        old, new = backend.lease(key), backend.lease(key)

        def take_over() -> None:
            with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
                # With a timeout, it waits until the session has ended (and its lock is free).
                conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pg_backend_of(postgres_server, old),))

        check_ledger_refuses_a_stale_token(old, new, take_over)

    def test_fence_postgres_refuses_a_stale_token_in_the_writing_transaction(
        self, postgres_server: PostgresServer
    ) -> None:
        """A write behind the fence lands for the newest token; an older one is refused and writes nothing."""
        import psycopg

        backend = PostgresLock(postgres_server.dsn, ttl=TTL)
        key = unique_key()
        old, new = backend.lease(key), backend.lease(key)
        assert old.try_acquire()
        with psycopg.connect(postgres_server.dsn) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS fence_demo (resource text, token bigint)")
            conn.commit()

            def write(lease: Lease) -> bool:
                with conn.transaction():
                    if not lease.fence_postgres(conn, key):
                        return False
                    conn.execute("INSERT INTO fence_demo VALUES (%s, %s)", (key, lease.token))
                return True

            assert write(old)
            stale = old.token
            old.release()  # as if it lost the lock: it keeps its token, which the fence now refuses
            assert new.try_acquire()
            assert write(new)
            assert not write(old), "the stale token must not pass the fence"
            assert write(new), "the current token passes again"
            rows = conn.execute("SELECT token FROM fence_demo WHERE resource = %s", (key,)).fetchall()
            assert rows == [(stale,), (new.token,), (new.token,)]
            with psycopg.connect(postgres_server.dsn, autocommit=True) as auto:
                with pytest.raises(ConfigurationError, match=r"must run in the transaction that makes the write"):
                    new.fence_postgres(auto, key)
            new.release()
            with pytest.raises(ConfigurationError, match=r"needs a lease that was acquired"):
                backend.lease(key).fence_postgres(conn, key)

    def test_connect_factory_and_django_settings(self, postgres_server: PostgresServer) -> None:
        """connect= takes a connection factory; from_django() builds the DSN from DATABASES in a Django process."""
        import psycopg

        lease = PostgresLock(connect=lambda: psycopg.connect(postgres_server.dsn), ttl=TTL).lease(unique_key())
        assert lease.try_acquire() and lease.token == 1
        lease.release()
        out = _fresh(
            f"""
            import django
            from django.conf import settings
            settings.configure(DATABASES={{"default": {{
                "ENGINE": "django.db.backends.postgresql", "NAME": "postgres", "USER": "postgres",
                "HOST": "127.0.0.1", "PORT": "{postgres_server.port}", "OPTIONS": {{"connect_timeout": 5}},
            }}, "other": {{"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}}})
            django.setup()
            from hostkit.cluster import PostgresLock
            from hostkit.exceptions import ConfigurationError
            lock = PostgresLock.from_django(ttl=3)
            lease = lock.lease("django-{uuid.uuid4().hex[:8]}")
            print(lock.where, lease.try_acquire(), lease.token)
            lease.release()
            for alias in ("other", "missing"):
                try:
                    PostgresLock.from_django(alias)
                except ConfigurationError as err:
                    print(err)
            """
        )
        assert out.splitlines() == [
            f"postgresql://postgres@127.0.0.1:{postgres_server.port}/postgres True 1",
            "PostgresLock.from_django: DATABASES['other'] is 'django.db.backends.sqlite3', not a PostgreSQL database",
            out.splitlines()[2],
        ]
        assert out.splitlines()[2].startswith("PostgresLock.from_django: no database alias 'missing' in DATABASES")


class TestPostgresCluster:
    @pytest.mark.timeout(120)
    def test_three_hosts_run_it_once_and_take_over_after_sigkill(
        self, postgres_server: PostgresServer, spawn: Callable[..., Any], record_dir: Path
    ) -> None:
        """Three host processes: the service runs in one; SIGKILL of the holder -> the server frees the lock at once."""
        key = unique_key()
        prepare_resource(postgres_server, key)
        hosts = start_hosts(spawn, "postgres", postgres_server.dsn, key, record_dir, 3)
        killed: dict[int, float] = {}
        assert_exactly_once_for_a_while(record_dir, 1.0)
        for _ in range(2):
            _, took = kill_and_measure(hosts, record_dir, killed, TTL)
            print(f"postgres takeover after SIGKILL: {took:.3f} s (ttl {TTL} s)")
            # The server released the lock when the killed process's socket closed: one poll, not a TTL.
            assert took <= SLACK
            assert_exactly_once_for_a_while(record_dir, 0.5, killed)
        assert_never_two_at_once(record_dir, killed)
        for proc in hosts:
            if proc.pid not in killed:
                proc.signal(signal.SIGTERM)
                proc.wait(30)

    @pytest.mark.timeout(120)
    def test_a_paused_holder_is_fenced_out_and_stops(
        self, postgres_server: PostgresServer, spawn: Callable[..., Any], record_dir: Path
    ) -> None:
        """SIGSTOP the holder mid-work: the server ends its silent session after the TTL, another takes over;
        after SIGCONT the old holder's write is refused by the fencing token, and it stops."""
        import psycopg

        key = unique_key()
        prepare_resource(postgres_server, key)
        hosts = start_hosts(spawn, "postgres", postgres_server.dsn, key, record_dir, 2)
        holder = assert_exactly_once_for_a_while(record_dir, 0.2)
        proc = next(p for p in hosts if p.pid == holder)
        (record_dir / "work").touch()
        assert wait_until(lambda: any(e == "working" for e, _, _ in record_lines(record_dir)[holder]), timeout=10)
        proc.signal(signal.SIGSTOP)
        paused = time.monotonic()
        try:
            (record_dir / "work").unlink()
            assert wait_until(lambda: len(starts(record_dir)) == 2, timeout=TTL + 10)
            _, new_pid, new_token = starts(record_dir)[-1]
            assert new_pid != holder

            def new_wrote() -> bool:
                return ("write-ok", new_token) in [(e, t) for e, t, _ in record_lines(record_dir)[new_pid]]

            assert wait_until(new_wrote, timeout=10)
        finally:
            proc.signal(signal.SIGCONT)
        resumed = time.monotonic()
        took = starts(record_dir)[-1][0] - paused
        print(f"postgres takeover of a paused holder: {took:.3f} s after SIGSTOP (ttl {TTL} s)")
        assert paused < starts(record_dir)[-1][0] < resumed
        old = lambda: record_lines(record_dir)[holder]  # noqa: E731
        assert wait_until(lambda: any(e == "stop" for e, _, _ in old()), timeout=10)
        after = [e for e, _, t in old() if t > paused]
        assert after[0] == "write-refused", f"the write after the pause must be refused: {old()}"
        assert "write-ok" not in after, "a stale write was accepted"
        stop_at = next(t for e, _, t in old() if e == "stop")
        assert stop_at - resumed <= TTL / 3 + SLACK, "the old holder stops within one renewal period of resuming"
        with psycopg.connect(postgres_server.dsn) as conn:
            assert conn.execute("SELECT token FROM hostkit_fences WHERE resource = %s", (key,)).fetchone() == (
                new_token,
            )
            tokens = [t for (t,) in conn.execute("SELECT token FROM fenced_log WHERE name = %s", (key,))]
        old_token = next(t for e, t, _ in old() if e == "start")
        assert old_token < new_token
        assert tokens == sorted(tokens), "the resource saw no token lower than one before it"
        assert running(record_dir) == {new_pid: new_token}
        for p in hosts:
            p.signal(signal.SIGTERM)
            p.wait(30)

    @pytest.mark.timeout(120)
    def test_a_postgres_restart_is_survived(self, spawn: Callable[..., Any], record_dir: Path) -> None:
        """The server restarts: the holder stops its service; once it is back, the service runs again, once."""
        server = start_postgres()
        try:
            key = unique_key()
            prepare_resource(server, key)
            hosts = start_hosts(spawn, "postgres", server.dsn, key, record_dir, 2)
            assert_exactly_once_for_a_while(record_dir, 0.3)
            before = starts(record_dir)[-1][2]
            server.halt()
            assert wait_until(lambda: not running(record_dir), timeout=TTL + 10)
            server.start()
            assert_exactly_once_for_a_while(record_dir, 1.0)
            [(_, token)] = running(record_dir).items()
            assert token > before
            assert_never_two_at_once(record_dir, {})
            for p in hosts:
                p.signal(signal.SIGTERM)
                p.wait(30)
        finally:
            server.stop()
