"""Exactly once per slot across a cluster: three host processes, a Redis lease, the holder killed mid-run.

Each host is a separate process standing for a machine (tests/cron_helpers.py). A
one-minute schedule cannot run many slots in a short test in real time, and a
seconds field is not standard cron; so every host reads the same accelerated clock
(one minute every few real seconds, from one shared real epoch), as machines
synchronised by NTP read the same time. The lease, its renewals, the kill and the
takeover all happen in real time.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.cron_helpers import CLUSTER_START, read_events, record_keys
from tests.queue_helpers import RedisServer, redis_server
from tests.subproc import python

__all__ = ["redis_server"]  # the session fixture, imported so pytest finds it here

HELPER = Path(__file__).with_name("cron_helpers.py")
#: One fake minute every 6 real seconds: well over a takeover (ttl 2 s) plus a run (0.5 s), on
#: a loaded machine too, so that the slot after the killed one comes due while the new holder
#: waits for it. The
#: timer's misfire policy is "skip": the killed slot runs again because the ledger says it
#: was begun, not as a late misfire.
SPEED = 10.0
#: Slots to complete after the one whose holder is killed.
AFTER = 3


def record(client: Any, key: str) -> list[tuple[datetime, int, int]]:
    """The fenced record: (slot, token, pid) of every run that completed its work, in order."""
    rows = [line.decode().split() for line in client.lrange(record_keys(key)[1], 0, -1)]
    return [(datetime.fromisoformat(slot), int(token), int(pid)) for slot, token, pid in rows]


class TestExactlyOncePerSlot:
    @pytest.mark.timeout(150)
    def test_three_hosts_complete_every_slot_once_when_the_holder_is_killed_mid_run(
        self, redis_server: RedisServer, spawn: Callable[..., Any], tmp_path: Path
    ) -> None:
        """Slot K's holder is SIGKILLed mid-run: the next holder runs K again, then the rest; each slot once."""
        import redis

        client = redis.Redis.from_url(redis_server.url)
        key = f"cron-{uuid.uuid4().hex[:10]}"
        folder = tmp_path / "events"
        folder.mkdir()
        epoch = time.time()
        hosts = [
            spawn(python(HELPER, "host", redis_server.url, key, str(folder), repr(epoch), str(SPEED))) for _ in range(3)
        ]
        for host in hosts:
            host.wait_for_output("ready\n", timeout=60)

        # A first slot completes; then the next run hangs mid-run, and its holder is killed there.
        assert wait_until(lambda: record(client, key), timeout=60)
        (folder / "hang").touch()

        def hanging() -> tuple[int, str] | None:
            for pid, events in read_events(folder).items():
                for event, slot, _, _ in events:
                    if event == "hanging":
                        return pid, slot
            return None

        assert wait_until(hanging, timeout=60)
        victim_pid, victim_slot = hanging()  # type: ignore[misc]
        victim = next(host for host in hosts if host.pid == victim_pid)
        victim.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait(10)
        (folder / "hang").unlink()

        killed = datetime.fromisoformat(victim_slot)
        assert wait_until(lambda: len([s for s, _, _ in record(client, key) if s > killed]) >= AFTER, timeout=60)
        for host in hosts:
            if host is not victim:
                host.signal(signal.SIGTERM)
        for host in hosts:
            if host is not victim:
                assert host.wait(30) == 0, host.output

        rows = record(client, key)
        slots = [slot for slot, _, _ in rows]
        # Every slot from the first to the last completed once: none twice, none left out.
        minute = timedelta(minutes=1)
        expected = [slots[0] + n * minute for n in range(int((slots[-1] - slots[0]) / minute) + 1)]
        assert slots == expected, f"completed slots {slots}"
        assert slots[0] > CLUSTER_START
        # The killed slot was begun by the victim, run again by the next holder, and recorded once, by it.
        events = read_events(folder)
        assert ("begin", victim_slot) in [(e, s) for e, s, _, _ in events[victim_pid]]
        assert ("done", victim_slot) not in [(e, s) for e, s, _, _ in events[victim_pid]]
        [(_, token, pid)] = [row for row in rows if row[0] == killed]
        assert pid != victim_pid
        assert token > max(t for _, _, t, _ in events[victim_pid]), "the new holder's token is greater"
        assert ("begin", victim_slot) in [(e, s) for e, s, _, _ in events[pid]]
        # No stale write was attempted, and the tokens grew with each takeover.
        assert all(e != "refused" for evs in events.values() for e, _, _, _ in evs)
        tokens = [t for _, t, _ in rows]
        assert tokens == sorted(tokens)
        # The ledger in Redis says where the schedule stands: the last slot completed, none begun.
        completed = client.hget(f"hostkit:lock:{{{key}}}:completed", "* * * * * UTC")
        assert datetime.fromisoformat(completed.decode()) == slots[-1]
        # A slot begun after it can only be one the SIGTERM stopped mid-run, not recorded.
        begun = client.hget(f"hostkit:lock:{{{key}}}:begun", "* * * * * UTC")
        assert begun is None or datetime.fromisoformat(begun.decode()) > slots[-1]
        rerun = min(t for e, s, _, t in events[pid] if e == "begin" and s == victim_slot)
        print(
            f"cron cluster: {len(slots)} slots completed once each; slot {victim_slot} begun again "
            f"{rerun - killed_at:.2f} s after the SIGKILL of its holder (lease ttl 2 s)"
        )


class TestRefusedLedgerWrite:
    @pytest.mark.timeout(60)
    def test_a_holder_whose_slot_write_is_refused_stands_by_and_competes_again(
        self, redis_server: RedisServer, tmp_path: Path
    ) -> None:
        """The lease is taken over between two renewals; the timer's begin_slot is refused, so it stops.

        The wrapper must not take that stop for "the service is done": the process
        stands by and, once the lock is free again, holds it and runs the schedule.
        """
        import redis

        from hostkit import HostBuilder, OncePerDeployment, ScheduledService
        from hostkit.cluster import RedisLease
        from tests.cron_helpers import GateClock, SlotFile, read_slots

        key = f"cron-{uuid.uuid4().hex[:10]}"
        client = redis.Redis.from_url(redis_server.url)
        record_path = tmp_path / "slots.txt"
        clock = GateClock(CLUSTER_START)
        # A long lease: the renewer will not notice the takeover before the slot's write does.
        lock = RedisLease(redis_server.url, key=key, ttl=60)
        service = ScheduledService(SlotFile(record_path), "* * * * *", clock=clock)
        host = (
            HostBuilder()
            .add_hosted_service(OncePerDeployment(service, lock=lock, poll_interval=0.05), name="S")
            .build()
        )

        def role() -> str | None:
            lock_status = host.status()["S"].lock
            return None if lock_status is None else lock_status.role

        with host:
            assert wait_until(lambda: role() == "holder" and clock.waiting.is_set(), timeout=30)
            # Another instance takes the lock over (as after this holder was paused past its lease).
            client.delete(f"hostkit:lock:{{{key}}}")
            thief = RedisLease(redis_server.url, key=key, ttl=60).lease(key)
            assert thief.try_acquire()
            clock.gate.set()  # the slot comes due: begin_slot is refused, the iteration ends
            assert wait_until(lambda: role() == "standby", timeout=10), host.status()["S"]
            assert read_slots(record_path) == []
            thief.release()
            assert wait_until(lambda: read_slots(record_path), timeout=10), host.status()["S"]
            assert role() == "holder"
