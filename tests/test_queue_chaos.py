"""Chaos: 10,000 messages, 4 consumer processes, 20 kill -9s during the run, per backend.

Every message must be handled at least once, none lost; duplicates (a consumer
killed after its handler finished but before the ack) are counted and reported;
the only dead letters are the messages whose handler always fails.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.queue_helpers import open_queue, read_records, read_records_by_pid, redis_server, unique_name
from tests.subproc import Program, python

__all__ = ["redis_server"]

HELPER = str(Path(__file__).with_name("queue_helpers.py"))
MESSAGES = 10_000
POISON = set(range(250, MESSAGES, 500))  # 20 messages whose handler always fails
KILLS = 20
CONSUMERS = 4
CONCURRENCY, PREFETCH = 2, 4
LEASE_TIME = 2.0
WORK = 0.004  # seconds each handler works


class TestChaos:
    @pytest.mark.timeout(180)
    @pytest.mark.parametrize("durability", ["normal", "full"])
    def test_sqlite_kill_9_of_consumers_loses_nothing(
        self, durability: str, tmp_path: Path, record_property: Any
    ) -> None:
        """SQLite: 20 SIGKILLs of 4 consumer processes; all 10,000 handled at least once, dead letters only poison.

        At "full" the consumers lease without an fsync and hold acks back to share one.
        """
        run_chaos("sqlite", str(tmp_path / "chaos.db"), tmp_path, record_property, durability=durability)

    @pytest.mark.timeout(180)
    def test_redis_kill_9_of_consumers_loses_nothing(
        self, redis_server: Any, tmp_path: Path, record_property: Any
    ) -> None:
        """Redis: 20 SIGKILLs of 4 consumer processes; all 10,000 handled at least once, dead letters only poison."""
        run_chaos("redis", redis_server.url, tmp_path, record_property)


def run_chaos(backend: str, target: str, tmp_path: Path, record_property: Any, durability: str = "") -> None:
    name = unique_name("chaos")
    options: dict[str, Any] = {"durability": durability} if durability else {}
    queue = open_queue(backend, target, name, lease_time=LEASE_TIME, **options)
    for start in range(0, MESSAGES, 1000):
        queue.enqueue_many([{"n": n, "poison": n in POISON} for n in range(start, start + 1000)])
    records = tmp_path / "records"
    records.mkdir()
    env = {
        "QUEUE_LEASE_TIME": str(LEASE_TIME),
        "QUEUE_WORK": str(WORK),
        "QUEUE_CONCURRENCY": str(CONCURRENCY),
        "QUEUE_PREFETCH": str(PREFETCH),
        **({"QUEUE_DURABILITY": durability} if durability else {}),
    }
    all_procs: list[Program] = []

    def spawn() -> Program:
        program = Program(python(HELPER, backend, target, name, records), folder=tmp_path, **env)
        all_procs.append(program)
        return program

    def handled_by(program: Program) -> int:
        try:
            return (records / f"{program.pid}.log").stat().st_size
        except FileNotFoundError:
            return 0

    slots = [spawn() for _ in range(CONSUMERS)]
    killed: set[int] = set()
    started = time.monotonic()
    try:
        killed_with_work_left = 0
        for kill in range(KILLS):
            victim = slots[kill % CONSUMERS]
            # Kill only a consumer that is in the middle of work (it has handled
            # something), so each kill can strand leased and half-handled messages.
            assert wait_until(lambda v=victim: handled_by(v) > 0, timeout=60), "a consumer never got going"
            stats = queue.stats()
            if stats.depth + stats.in_flight > 0:
                killed_with_work_left += 1
            victim.signal(signal.SIGKILL)
            assert victim.wait(10) == -signal.SIGKILL
            killed.add(victim.pid)
            slots[kill % CONSUMERS] = spawn()
        assert killed_with_work_left == KILLS, "every kill must land while work remains, or the test proves nothing"

        wanted = set(range(MESSAGES)) - POISON

        def finished() -> bool:
            s = queue.stats()
            return s.depth == 0 and s.in_flight == 0 and s.dead == len(POISON)

        assert wait_until(finished, timeout=120, interval=0.1), f"queue did not drain: {queue.stats()}"
        elapsed = time.monotonic() - started
        for program in slots:
            program.signal(signal.SIGTERM)
        codes = [program.wait(30) for program in slots]
        assert codes == [0] * CONSUMERS, "surviving consumers must stop cleanly on SIGTERM"

        handled = read_records(str(records))
        missing = wanted - set(handled)
        assert not missing, f"{len(missing)} message(s) lost, e.g. {sorted(missing)[:10]}"
        assert not set(handled) & POISON, "a poison message can never have been handled"
        dead = queue.dead_letters(limit=1000)
        assert {d.payload["n"] for d in dead} == POISON, "dead letters must be exactly the always-failing messages"
        assert all(d.attempts == 3 and "poison message" in d.error for d in dead)
        duplicates = len(handled) - len(set(handled))
        # A message comes back only if a consumer was killed holding it, before its ack: one
        # that was acknowledged never does. So of its handlings, all but one were by killed consumers.
        handlers: dict[int, list[int]] = {}
        for pid, numbers in read_records_by_pid(str(records)).items():
            for n in numbers:
                handlers.setdefault(n, []).append(pid)
        again = {n: pids for n, pids in handlers.items() if sum(pid not in killed for pid in pids) > 1}
        assert not again, f"handled again though no consumer died holding it: {dict(list(again.items())[:5])}"
        # Each kill can strand at most what the victim held: concurrency x prefetch messages, and at
        # "full" also the handled ones whose acks it held back to share an fsync (at most 50 ms of work).
        per_thread = PREFETCH + (math.ceil(0.05 / WORK) if durability == "full" else 0)
        assert duplicates <= KILLS * CONCURRENCY * per_thread, f"{duplicates} duplicates is more than kills explain"
        record_property("duplicates", duplicates)
        record_property("elapsed_s", round(elapsed, 1))
        print(
            f"\n[chaos {backend}] {MESSAGES} messages, {KILLS} kill -9, {len(all_procs)} consumer processes: "
            f"handled {len(set(handled))} distinct, {duplicates} duplicate(s), {len(dead)} dead letter(s), "
            f"{elapsed:.1f} s"
        )
    finally:
        for program in all_procs:
            program.close()
        if backend == "redis":
            queue.purge()
        queue.close()
