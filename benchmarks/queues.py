"""Durable-queue speed: hostkit's SQLite and Redis queues beside raw loops on the same storage.

For each backend it measures, in every round:

* enqueue rate: one ``enqueue()`` call per message, as a request handler would
  (baseline: one raw ``INSERT`` in autocommit / one raw ``XADD`` per message);
* end-to-end rate with 1 and 4 consumer processes, at prefetch 1 and 16:
  consumers are started and idle, then this process enqueues N messages one by
  one, and the clock stops when the last one is acknowledged (queue empty,
  nothing in flight). hostkit's consumers are worker hosts running a
  :class:`~hostkit.queues.QueueConsumer` (lease ``prefetch`` at a time, a no-op
  handler in a DI scope, ack). Baseline consumers are raw loops with the same
  batch size and no leases: SQLite ``BEGIN IMMEDIATE; SELECT ... LIMIT b;
  DELETE ...; COMMIT``; Redis ``XREADGROUP COUNT b`` then ``XACK`` per message;
* SQLite at full durability (``synchronous=FULL``), 1 consumer, prefetch 1,
  beside huey's ``SqliteHuey(fsync=True)`` (if huey is installed): huey's
  producer calls a task, its consumer loops on ``huey.dequeue()`` and
  ``huey.execute()``, as huey's worker does. huey deletes a task when it
  dequeues it (at most once); hostkit leases, then acks (at least once).

Storage settings are the same on both sides: SQLite in WAL mode with
``synchronous=NORMAL`` (hostkit's ``durability="normal"``: a process crash loses
nothing, a power loss may lose the last commits) except in the full-durability
case; Redis without persistence, on a unix socket, started by this script.

Figures are medians over ``--rounds`` rounds (5 by default); ratios are medians of
per-round ratios (hostkit rate / baseline rate: above 1 is faster than the
baseline). A calibration loop is timed in every round and reported. Beside each
end-to-end rate, the consumers' CPU time per message (psutil, all consumer
processes together), for Redis the server's, and the producer's (this process,
while it enqueues) show what each message costs: on a shared 2-core machine the
wall-clock rates with four consumers mostly measure who gets the CPU.

Run from the repository root::

    python benchmarks/queues.py           # a few minutes
    python benchmarks/queues.py --quick   # about a minute

Results: a table and the targets (met / NOT met) on stdout, and
``benchmarks/results/queue.json``.

Targets:

* Redis end to end at least 0.9x of its raw loop at the same batch size, with 1
  and 4 consumers, at prefetch 1 and 16;
* SQLite at full durability, prefetch 1: at least huey's rate at full durability;
* SQLite at least 5,000 messages/s end to end with one consumer at prefetch 1
  (durability "normal").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import Target, calibrate, report_targets, start_redis, write_json

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PREFETCHES = (1, 16)
CONSUMERS = (1, 4)
# The redis-server this run started: its CPU time per message is measured beside the consumers'.
SERVER: list[int] = []
SERVER_CPU: list[float] = []  # the last end-to-end run's server CPU per message, in microseconds
PRODUCER_CPU: list[float] = []  # the last end-to-end run's enqueue CPU per message (this process), in microseconds


def make_huey(target: str, name: str) -> tuple[Any, Any]:
    """huey on SQLite at synchronous=FULL (WAL), and the benchmark's task, the same in producer and consumer."""
    from huey import SqliteHuey

    huey = SqliteHuey(name, filename=target, fsync=True, results=False)

    @huey.task(name="job")
    def job(payload: dict[str, Any]) -> None:
        return None

    return huey, job


# -- consumer processes ---------------------------------------------------------------------


def child(kind: str, backend: str, target: str, name: str, prefetch_text: str, durability: str) -> int:
    """A consumer process: prints READY, consumes until SIGTERM, exits 0."""
    prefetch = int(prefetch_text)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started below inherit the mask
    if kind == "hostkit":
        from hostkit import HostBuilder, HostOptions
        from hostkit.queues import QueueConsumer, RedisStreamQueue, SQLiteQueue

        queue: Any = (
            SQLiteQueue(target, name, durability=durability)  # type: ignore[arg-type]
            if backend == "sqlite"
            else RedisStreamQueue(target, name)
        )
        builder = HostBuilder(options=HostOptions(configure_logging=False))
        builder.services.add_hosted_service(
            QueueConsumer(queue, lambda message, scope: None, prefetch=prefetch, poll_interval=0.2)
        )
        host = builder.build()
        host.start()
        print("READY", flush=True)
        signal.sigwait({signal.SIGTERM})
        host.stop()
        return 0
    # Raw loops: the same storage, no leases, no retries, no DI.
    import threading

    stop = threading.Event()

    def wait_term() -> None:
        signal.sigwait({signal.SIGTERM})
        stop.set()

    threading.Thread(target=wait_term, daemon=True).start()
    if kind == "huey":
        huey, _ = make_huey(target, name)
        print("READY", flush=True)
        while not stop.is_set():
            task = huey.dequeue()
            if task is None:
                stop.wait(0.002)
            else:
                huey.execute(task)
        return 0
    if backend == "sqlite":
        conn = sqlite3.connect(target, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={durability.upper()}")
        print("READY", flush=True)
        while not stop.is_set():
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute("SELECT id, payload FROM raw WHERE queue = ? ORDER BY id LIMIT ?", (name, prefetch))
            rows = rows.fetchall()
            if rows:
                conn.executemany("DELETE FROM raw WHERE id = ?", [(r[0],) for r in rows])
            conn.execute("COMMIT")
            for r in rows:
                json.loads(r[1])
            if not rows:
                stop.wait(0.002)
        conn.close()
        return 0
    import redis

    client = redis.Redis.from_url(target)
    stream = f"raw:{name}"
    consumer = f"raw-{os.getpid()}"
    print("READY", flush=True)
    while not stop.is_set():
        reply = client.xreadgroup("raw", consumer, {stream: ">"}, count=prefetch, block=200)
        for _, entries in reply or ():
            for eid, fields in entries:
                json.loads(fields[b"p"])
                client.xack(stream, "raw", eid)
    client.close()
    return 0


# -- producers and storage set-up ------------------------------------------------------------


class Storage:
    """Where one measurement's queue lives, and how to count what is left."""

    def __init__(self, kind: str, backend: str, target: str, name: str, durability: str = "normal") -> None:
        self.kind, self.backend, self.target, self.name = kind, backend, target, name
        self.queue: Any = None
        if kind == "hostkit":
            from hostkit.queues import RedisStreamQueue, SQLiteQueue

            self.queue = (
                SQLiteQueue(target, name, durability=durability)  # type: ignore[arg-type]
                if backend == "sqlite"
                else RedisStreamQueue(target, name)
            )
        elif kind == "huey":
            self.huey, self.job = make_huey(target, name)
        elif backend == "sqlite":
            self.conn = sqlite3.connect(target, timeout=30, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute(f"PRAGMA synchronous={durability.upper()}")
            self.conn.execute("CREATE TABLE IF NOT EXISTS raw (id INTEGER PRIMARY KEY, queue TEXT, payload BLOB)")
        else:
            import redis

            self.client = redis.Redis.from_url(target)
            self.stream = f"raw:{name}"
            self.client.xgroup_create(self.stream, "raw", id="0", mkstream=True)

    def enqueue(self, n: int) -> None:
        payload = {"job": "resize", "image": "photos/2024/01/02/cat.jpg", "sizes": [64, 128, 512]}
        if self.kind == "hostkit":
            enqueue = self.queue.enqueue
            for i in range(n):
                enqueue({**payload, "n": i})
        elif self.kind == "huey":
            for i in range(n):
                self.job({**payload, "n": i})
        elif self.backend == "sqlite":
            for i in range(n):
                self.conn.execute(
                    "INSERT INTO raw (queue, payload) VALUES (?, ?)",
                    (self.name, json.dumps({**payload, "n": i}, separators=(",", ":")).encode()),
                )
        else:
            for i in range(n):
                self.client.xadd(self.stream, {"p": json.dumps({**payload, "n": i}, separators=(",", ":")).encode()})

    def remaining(self) -> int:
        if self.kind == "hostkit":
            s = self.queue.stats()
            return int(s.depth + s.in_flight)
        if self.kind == "huey":
            return int(self.huey.pending_count())
        if self.backend == "sqlite":
            return int(self.conn.execute("SELECT COUNT(*) FROM raw WHERE queue = ?", (self.name,)).fetchone()[0])
        info = self.client.xinfo_groups(self.stream)[0]
        return int(info["pending"]) + int(info.get("lag") or 0)

    def close(self) -> None:
        if self.kind == "hostkit":
            self.queue.purge()
            self.queue.close()
        elif self.kind == "huey":
            self.huey.flush()
            self.huey.storage.close()
        elif self.backend == "sqlite":
            self.conn.execute("DELETE FROM raw WHERE queue = ?", (self.name,))
            self.conn.close()
        else:
            self.client.delete(self.stream)
            self.client.close()


def cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def end_to_end(
    kind: str, backend: str, target: str, consumers: int, prefetch: int, n: int, tag: str, durability: str = "normal"
) -> tuple[float, float]:
    """Messages per second from the first enqueue to the last ack, with ``consumers`` processes,
    and the consumers' CPU time per message in microseconds (a figure a loaded machine disturbs less)."""
    name = f"e2e-{tag}"
    storage = Storage(kind, backend, target, name, durability)
    argv = [sys.executable, __file__, "--child", kind, backend, target, name, str(prefetch), durability]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(consumers)]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "READY":
                raise RuntimeError(f"consumer process did not start: {line!r}")
        server = SERVER if backend == "redis" else []
        cpu_before, server_before = cpu_seconds([p.pid for p in procs]), cpu_seconds(server)
        start, produce = time.perf_counter(), time.process_time()
        storage.enqueue(n)
        PRODUCER_CPU.append((time.process_time() - produce) / n * 1e6)
        while storage.remaining() > 0:
            time.sleep(0.005)
        rate = n / (time.perf_counter() - start)
        cpu_us = (cpu_seconds([p.pid for p in procs]) - cpu_before) / n * 1e6
        if server:
            SERVER_CPU.append((cpu_seconds(server) - server_before) / n * 1e6)
        return rate, cpu_us
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
            if p.stdout:
                p.stdout.close()
        storage.close()


def enqueue_rate(kind: str, backend: str, target: str, n: int, tag: str) -> float:
    storage = Storage(kind, backend, target, f"enq-{tag}")
    try:
        start = time.perf_counter()
        storage.enqueue(n)
        return n / (time.perf_counter() - start)
    finally:
        storage.close()


# -- huey, calibration, statistics ------------------------------------------------------------


def huey_available() -> str | None:
    """Why huey cannot be the full-durability baseline, or ``None`` if it can."""
    try:
        import huey  # noqa: F401
    except ImportError:
        return "huey not installed (pip install huey): a benchmark-only baseline"
    return None


def cases(backend: str, with_huey: bool) -> list[tuple[str, int, int, str, str]]:
    """(measure, consumers, prefetch, durability, baseline kind) for one backend."""
    found = [(f"e2e-c{c}-p{p}", c, p, "normal", "raw") for p in PREFETCHES for c in CONSUMERS]
    if backend == "sqlite" and with_huey:
        found.append(("full-e2e-c1-p1", 1, 1, "full", "huey"))
    return found


def run(rounds: int, n_e2e: int, n_enqueue: int, n_full: int, backends: list[str]) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="hostkit-bench-queue-")
    redis_proc, redis_url = (None, None)
    skipped: dict[str, str] = {}
    if "redis" in backends:
        redis_proc, redis_url = start_redis(workdir)
        if redis_proc is not None:
            SERVER.append(redis_proc.pid)
        if redis_proc is None:
            skipped["redis"] = str(redis_url)
            backends = [b for b in backends if b != "redis"]
    no_huey = huey_available() if "sqlite" in backends else None
    if no_huey is not None:
        skipped["huey"] = no_huey
    raw: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    calibration = []
    try:
        for r in range(rounds):
            calibration.append(calibrate())
            for backend in backends:
                # hostkit and its baseline back to back for each figure, alternating which
                # goes first, so a machine whose load drifts affects both sides alike.
                first = r % 2 == 0
                target = os.path.join(workdir, f"q{r}.db") if backend == "sqlite" else str(redis_url)
                for kind in ("hostkit", "raw") if first else ("raw", "hostkit"):
                    raw.setdefault(f"{backend}/enqueue/{kind}", []).append(
                        enqueue_rate(kind, backend, target, n_enqueue, f"{kind}-{r}")
                    )
                for measure, consumers, prefetch, durability, base in cases(backend, no_huey is None):
                    for kind in ("hostkit", base) if first else (base, "hostkit"):
                        where = target
                        n = n_e2e
                        if durability == "full":
                            # A file of its own per side: huey's tables and hostkit's never share a WAL.
                            where, n = os.path.join(workdir, f"full-{kind}-{r}.db"), n_full
                        rate, cpu_us = end_to_end(
                            kind, backend, where, consumers, prefetch, n, f"{kind}-{r}-{measure}", durability
                        )
                        raw.setdefault(f"{backend}/{measure}/{kind}", []).append(rate)
                        cpu.setdefault(f"{backend}/{measure}/{kind}", []).append(cpu_us)
                        cpu.setdefault(f"producer/{backend}/{measure}/{kind}", []).append(PRODUCER_CPU.pop())
                        if backend == "redis":
                            cpu.setdefault(f"server/{measure}/{kind}", []).append(SERVER_CPU.pop())
                print(f"round {r + 1}/{rounds}: {backend} done", file=sys.stderr, flush=True)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for backend in backends:
        measures = [("enqueue", "raw", "normal")] + [
            (m, base, durability) for m, _, _, durability, base in cases(backend, no_huey is None)
        ]
        for what, base_kind, durability in measures:
            ours, base = raw[f"{backend}/{what}/hostkit"], raw[f"{backend}/{what}/{base_kind}"]
            ratios = [o / b for o, b in zip(ours, base, strict=True)]
            row: dict[str, Any] = {
                "backend": backend,
                "measure": what,
                "durability": durability if backend == "sqlite" else None,
                "baseline": base_kind,
                "hostkit_per_s": round(statistics.median(ours)),
                "baseline_per_s": round(statistics.median(base)),
                "ratio": round(statistics.median(ratios), 2),
                "hostkit_runs": [round(x) for x in ours],
                "baseline_runs": [round(x) for x in base],
            }
            if what != "enqueue":
                ours_cpu, base_cpu = cpu[f"{backend}/{what}/hostkit"], cpu[f"{backend}/{what}/{base_kind}"]
                row["hostkit_consumer_cpu_us_per_msg"] = round(statistics.median(ours_cpu), 1)
                row["baseline_consumer_cpu_us_per_msg"] = round(statistics.median(base_cpu), 1)
                for side, kind in (("hostkit", "hostkit"), ("baseline", base_kind)):
                    row[f"{side}_producer_cpu_us_per_msg"] = round(
                        statistics.median(cpu[f"producer/{backend}/{what}/{kind}"]), 1
                    )
                if backend == "redis":
                    row["hostkit_server_cpu_us_per_msg"] = round(statistics.median(cpu[f"server/{what}/hostkit"]), 1)
                    row["baseline_server_cpu_us_per_msg"] = round(
                        statistics.median(cpu[f"server/{what}/{base_kind}"]), 1
                    )
            rows.append(row)
    return {
        "benchmark": "queue",
        "rounds": rounds,
        "messages_end_to_end": n_e2e,
        "messages_full_durability": n_full,
        "messages_enqueue": n_enqueue,
        "prefetches": list(PREFETCHES),
        "sqlite_durability": "normal (WAL, synchronous=NORMAL) unless the row says full (synchronous=FULL)",
        "skipped": skipped,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "calibration_ms": round(statistics.median(calibration) * 1000, 1),
        "rows": rows,
    }


def targets(result: dict[str, Any]) -> list[Target]:
    rows = {(row["backend"], row["measure"]): row for row in result["rows"]}

    def value(backend: str, measure: str, key: str) -> float | None:
        row = rows.get((backend, measure))
        return None if row is None else float(row[key])

    found = [
        Target(
            f"redis end to end, {c} consumer(s), prefetch {p}: hostkit / raw loop",
            value("redis", f"e2e-c{c}-p{p}", "ratio"),
            0.9,
            ">=",
            "x",
        )
        for p in PREFETCHES
        for c in CONSUMERS
    ]
    found.append(
        Target(
            "sqlite full durability, 1 consumer, prefetch 1: hostkit / huey",
            value("sqlite", "full-e2e-c1-p1", "ratio"),
            1.0,
            ">=",
            "x",
        )
    )
    found.append(
        Target(
            "sqlite normal durability, 1 consumer, prefetch 1: hostkit end to end",
            value("sqlite", "e2e-c1-p1", "hostkit_per_s"),
            5000,
            ">=",
            " msg/s",
        )
    )
    return found


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\nDurable queues: median of {result['rounds']} round(s); "
        f"{result['messages_end_to_end']} messages end to end ({result['messages_full_durability']} at full "
        f"durability), {result['messages_enqueue']} for enqueue; calibration {result['calibration_ms']} ms"
    )
    head = (
        f"{'backend':8} {'measure':38} {'hostkit msg/s':>14} {'baseline':>16} {'hostkit/base':>13} "
        f"{'CPU us/msg, hostkit / base: consumers (server) [producer]':>58}"
    )
    print(head)
    print("-" * len(head))
    for row in result["rows"]:
        what = row["measure"]
        if what == "enqueue":
            label = "enqueue"
        else:
            _, c, p = what.rsplit("-", 2)
            label = f"end to end, {c[1:]} consumer(s), prefetch {p[1:]}"
            if what.startswith("full-"):
                label += ", FULL"
        cpu_text = ""
        if "hostkit_consumer_cpu_us_per_msg" in row:
            cpu_text = f"{row['hostkit_consumer_cpu_us_per_msg']:.0f} / {row['baseline_consumer_cpu_us_per_msg']:.0f}"
            if "hostkit_server_cpu_us_per_msg" in row:
                ours, theirs = row["hostkit_server_cpu_us_per_msg"], row["baseline_server_cpu_us_per_msg"]
                cpu_text += f" (server {ours:.0f} / {theirs:.0f})"
            ours, theirs = row["hostkit_producer_cpu_us_per_msg"], row["baseline_producer_cpu_us_per_msg"]
            cpu_text += f" [{ours:.0f} / {theirs:.0f}]"
        base = f"{row['baseline_per_s']:,} {row['baseline']}"
        print(
            f"{row['backend']:8} {label:38} {row['hostkit_per_s']:>14,} {base:>16} "
            f"{row['ratio']:>12.2f}x {cpu_text:>58}"
        )
    for what, why in result["skipped"].items():
        print(f"{what}: skipped ({why})")


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["--child"]:
        return child(*args_list[1:7])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, fewer messages (about a minute)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=10_000, help="messages per end-to-end run")
    parser.add_argument("--backend", action="append", choices=("sqlite", "redis"), help="default: both")
    parser.add_argument("--output", type=Path, default=RESULTS / "queue.json")
    args = parser.parse_args(args_list)
    rounds, n_e2e, n_enqueue, n_full = args.rounds, args.messages, 10_000, min(args.messages, 5_000)
    if args.quick:
        rounds, n_e2e, n_enqueue, n_full = 2, 5_000, 3_000, 2_000
    result = run(rounds, n_e2e, n_enqueue, n_full, args.backend or ["sqlite", "redis"])
    print_table(result)
    result["targets"] = report_targets(targets(result))
    write_json(args.output, result)
    print(f"\nJSON: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
