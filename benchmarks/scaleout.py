"""Scaling out: Redis Streams consumer throughput with 1, 2 and 4 worker processes.

Each worker is a separate ``hostkit run`` process (``python -m hostkit run
scaleout:create_builder``), as replicas of a deployment would be: one host, one
:class:`~hostkit.queues.QueueConsumer` (one consumer thread, ``prefetch`` 8) on one
real ``redis-server`` that this script starts on a unix socket and stops. The
handler does a small fixed amount of pure-Python work per message (``--work``
loop steps, about a millisecond here), the shape of a CPU-bound consumer whose
throughput should grow with processes, not threads (the GIL).

One run with k workers: the k processes start on an empty queue and are waited for
until all k have joined the consumer group; then the queue is filled with
``--messages`` messages in one transaction (MULTI/EXEC: every worker sees them at
once), and the clock runs until the queue is empty (nothing waiting, nothing in
flight). The workers are then stopped with SIGTERM and must exit 0.

Figures are medians over ``--rounds`` rounds; the order of 1, 2, 4 alternates
between rounds so a load drift affects all alike. The scaling ratio is the median of
the per-round ratios (rate with k workers / rate with 1 worker). Beside each rate,
the workers' CPU time per message (psutil, all workers together): on a machine
other programs load, k busy processes get a larger share of the cores than one
does, which flatters the ratios; the load average at the start is recorded too.

What the 4-worker figure means: on a machine with fewer than 4 cores, 4 busy
processes share the cores the 2 had, so the ratio cannot exceed the core count; it
shows what over-subscription costs (context switches, one more process per core),
not more capacity. Throughput grows with cores, so on a 2-core machine 2 workers
is the figure to read, and redis-server (single-threaded) takes its share of them.

Run from the repository root::

    python benchmarks/scaleout.py           # about a minute
    python benchmarks/scaleout.py --quick   # about half a minute

Results: a table on stdout and ``benchmarks/results/scaleout.json``.

Targets (machines with 2 or more cores): 2 workers at least 1.6x the rate of 1;
4 workers at least 0.8 x min(4, cores) times the rate of 1 (on 2 cores: 1.6x, i.e.
over-subscription costs little).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _common import Target, calibrate, report_targets, sigterm_to_exit, start_redis, write_json

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PREFETCH = 8
WORKERS = (1, 2, 4)


# -- the worker (imported by `hostkit run scaleout:create_builder` in each process) ---------


def busy(steps: int) -> int:
    """A fixed amount of pure-Python work (holds the GIL, as CPU-bound handlers do)."""
    x = 0
    for i in range(steps):
        x = (x * 31 + i) % 1_000_003
    return x


def create_builder() -> Any:
    """The worker's host: one QueueConsumer on the queue named in the environment."""
    from hostkit import HostBuilder, HostOptions
    from hostkit.queues import QueueConsumer, RedisStreamQueue

    url = os.environ["SCALEOUT_REDIS_URL"]
    name = os.environ["SCALEOUT_QUEUE"]
    steps = int(os.environ["SCALEOUT_WORK"])

    def handle(message: Any, scope: Any) -> None:
        busy(steps)

    builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
    builder.services.add_hosted_service(
        QueueConsumer(
            # The client name tells the driver this worker is connected (CLIENT LIST).
            RedisStreamQueue(url, name, client_options={"client_name": f"{name}-worker-{os.getpid()}"}),
            handle,
            prefetch=PREFETCH,
            poll_interval=0.1,
        ),
        name="consumer",
    )
    return builder


# -- the driver ------------------------------------------------------------------------------


def cpu_seconds(procs: list[subprocess.Popen[bytes]]) -> float:
    """User + system CPU time the processes used so far."""
    import psutil

    total = 0.0
    for p in procs:
        times = psutil.Process(p.pid).cpu_times()
        total += times.user + times.system
    return total


def one_run(url: str, workers: int, messages: int, steps: int) -> tuple[float, float]:
    """(messages per second, workers' CPU ms per message) with ``workers`` hostkit processes."""
    from hostkit.queues import RedisStreamQueue

    name = f"scaleout-{uuid.uuid4().hex[:8]}"
    queue = RedisStreamQueue(url, name)
    env = {
        **os.environ,
        "SCALEOUT_REDIS_URL": url,
        "SCALEOUT_QUEUE": name,
        "SCALEOUT_WORK": str(steps),
        "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p),
    }
    argv = [sys.executable, "-m", "hostkit", "run", "scaleout:create_builder", "--no-systemd", "--log-level", "WARNING"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        queue.purge()  # makes the stream and its group, so workers join an existing group
        for _ in range(workers):
            procs.append(
                subprocess.Popen(
                    argv, cwd=HERE, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
                )
            )
        # A worker connects for its first lease (and Redis lists a group's consumers only
        # once they got an entry): wait until every worker's named connection is there.
        deadline = time.monotonic() + 60

        def connected() -> int:
            names = {c.get("name", "") for c in queue.client.client_list()}
            return sum(1 for n in names if n.startswith(f"{name}-worker-"))

        while connected() < workers:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(
                    f"the {workers} worker(s) did not all join the group (exits: {[p.poll() for p in procs]})"
                )
            time.sleep(0.05)
        payloads = [{"n": n} for n in range(messages)]
        cpu_before = cpu_seconds(procs)
        began = time.perf_counter()
        queue.enqueue_many(payloads)  # one MULTI/EXEC: every worker sees the whole queue at once
        while True:
            s = queue.stats()
            if s.depth == 0 and s.in_flight == 0:
                break
            if time.perf_counter() - began > 600:
                raise SystemExit(f"{workers} worker(s) did not drain {messages} messages in 10 minutes")
            time.sleep(0.01)
        took = time.perf_counter() - began
        cpu_ms = (cpu_seconds(procs) - cpu_before) / messages * 1000
        for p in procs:
            sigterm_to_exit(p, "a scale-out worker", 30)
        return messages / took, cpu_ms
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        with contextlib.suppress(Exception):
            queue.purge()
            queue.client.delete(queue.stream)
        queue.close()


def run(rounds: int, messages: int, steps: int) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="hostkit-bench-scaleout-")
    redis_proc, url = start_redis(workdir)
    if redis_proc is None:
        raise SystemExit(f"cannot run: {url}")
    rates: dict[int, list[float]] = {k: [] for k in WORKERS}
    cpu: dict[int, list[float]] = {k: [] for k in WORKERS}
    calibration = []
    load = os.getloadavg()[0]
    began = time.perf_counter()
    busy(steps)  # warm
    t0 = time.perf_counter()
    for _ in range(20):
        busy(steps)
    work_ms = (time.perf_counter() - t0) / 20 * 1000
    try:
        for r in range(rounds):
            calibration.append(calibrate())
            order = WORKERS if r % 2 == 0 else tuple(reversed(WORKERS))
            for k in order:
                rate, cpu_ms = one_run(url, k, messages, steps)
                rates[k].append(rate)
                cpu[k].append(cpu_ms)
            line = ", ".join(f"{k}: {rates[k][-1]:,.0f} msg/s" for k in WORKERS)
            print(f"round {r + 1}/{rounds}: {line}", file=sys.stderr, flush=True)
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for k in WORKERS:
        ratios = [rk / r1 for rk, r1 in zip(rates[k], rates[1], strict=True)]
        rows.append(
            {
                "workers": k,
                "msg_per_s": round(statistics.median(rates[k])),
                "vs_1_worker": round(statistics.median(ratios), 2),
                "worker_cpu_ms_per_msg": round(statistics.median(cpu[k]), 3),
                "runs": [round(x) for x in rates[k]],
            }
        )
    return {
        "benchmark": "scaleout",
        "rounds": rounds,
        "messages": messages,
        "work_steps": steps,
        "work_ms_per_message": round(work_ms, 3),
        "prefetch": PREFETCH,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        # The machine's 1-minute load when the run began: a loaded machine gives more
        # CPU to 4 processes than to 1, which flatters the ratios.
        "load_average_at_start": round(load, 2),
        "calibration_ms": round(statistics.median(calibration) * 1000, 1),
        "seconds": round(time.perf_counter() - began, 1),
        "rows": rows,
    }


def targets(result: dict[str, Any]) -> list[Target]:
    cpus = result["cpus"] or 1
    by_k = {row["workers"]: row["vs_1_worker"] for row in result["rows"]}
    # One core cannot scale: the targets are "not measured" there rather than failed.
    enough = cpus >= 2
    return [
        Target("2 workers vs 1 (scaling ratio)", by_k[2] if enough else None, 1.6, ">=", "x"),
        Target(
            f"4 workers vs 1 on {cpus} core(s)", by_k[4] if enough else None, round(0.8 * min(4, cpus), 2), ">=", "x"
        ),
    ]


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\nRedis Streams scale-out: median of {result['rounds']} round(s), {result['messages']:,} messages per run, "
        f"handler work {result['work_ms_per_message']} ms/message, prefetch {result['prefetch']}, "
        f"{result['cpus']} core(s), load {result['load_average_at_start']}, calibration {result['calibration_ms']} ms"
    )
    head = f"{'workers':>7} {'msg/s':>9} {'vs 1 worker':>12} {'worker CPU ms/msg':>18}   runs"
    print(head)
    print("-" * len(head))
    for row in result["rows"]:
        runs = ", ".join(f"{x:,}" for x in row["runs"])
        print(
            f"{row['workers']:>7} {row['msg_per_s']:>9,} {row['vs_1_worker']:>11.2f}x "
            f"{row['worker_cpu_ms_per_msg']:>18.2f}   {runs}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, fewer messages (about half a minute)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=5000, help="messages per run")
    parser.add_argument("--work", type=int, default=10_000, help="loop steps of work per message")
    parser.add_argument("--output", type=Path, default=RESULTS / "scaleout.json")
    args = parser.parse_args(argv)
    rounds, messages = args.rounds, args.messages
    if args.quick:
        rounds, messages = 2, 2500
    result = run(rounds, messages, args.work)
    print_table(result)
    result["targets"] = report_targets(targets(result))
    write_json(args.output, result)
    print(f"\nJSON: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
