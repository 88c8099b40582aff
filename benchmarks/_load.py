"""The load harness of the web benchmarks: a Flask app on gunicorn under open-loop load, and the CPU kernel.

``contention.py`` and ``gc_pause.py`` drive the same kind of server the same way:
gunicorn (gthread, 1 worker x 4 threads) on 127.0.0.1, started fresh for each case
from an app module and a config file written to a temporary folder, then requests
scheduled at a fixed rate in advance over persistent connections, each one's latency
measured from its *due* time, so a stalled server is charged for every request it
delayed (no coordinated omission).

The background work is :func:`crunch`, the same pure-Python kernel in every case. The
app and the bare children import it from here (the temporary folder's ``PYTHONPATH``
holds this folder), so a child started by the fork server finds it by name.

This module imports neither hostkit nor Flask: the cases without hostkit stay without it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: The gunicorn settings every case shares; a benchmark's config file starts with them.
GUNICORN_SETTINGS = """\
worker_class = "gthread"
workers = 1
threads = 4
keepalive = 30
graceful_timeout = 10
control_socket_disable = True
accesslog = None
"""


def crunch(stopping: Any, count_file: str) -> None:
    """Pure-Python CPU work until ``stopping`` is set, holding the GIL between the interpreter's switch points.

    Every 0.25 s it writes ``first_done first_time done time`` to ``count_file`` (by
    rename, so a reader never sees half a line): :func:`iterations_per_second` reads
    the rate since its first report, past the start-up.
    """
    done, first, last = 0, None, time.monotonic()
    while not stopping.is_set():
        n = 0
        for i in range(10_000):
            n += i * i
        done += 1
        now = time.monotonic()
        if now - last >= 0.25:
            last = now
            first = first or (done, now)
            with open(count_file + ".tmp", "w") as f:
                f.write(f"{first[0]} {first[1]} {done} {now}")
            os.replace(count_file + ".tmp", count_file)


def iterations_per_second(count_file: str | Path) -> float | None:
    """The kernel's rate between its first and its latest report, or ``None`` without two reports."""
    try:
        first_done, first_at, done, at = Path(count_file).read_text().split()
    except (OSError, ValueError):
        return None
    span = float(at) - float(first_at)
    return (int(done) - int(first_done)) / span if span > 0 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(port: int, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def open_loop(port: int, rate: float, duration: float, senders: int = 16) -> list[tuple[float, float]]:
    """``rate`` requests/s for ``duration`` s: (due time, latency s) per request, both on ``time.monotonic``.

    Request i is due at t0 + i/rate and belongs to sender i % senders; a sender that is
    late sends at once, and the wait counts in the latency. ``time.monotonic`` is the
    machine's one monotonic clock, so due times compare with marks taken in the server.
    """
    total = int(rate * duration)
    t0 = time.monotonic() + 0.05
    out: list[tuple[float, float]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def sender(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for i in range(k, total, senders):
            due = t0 + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
            except (OSError, http.client.HTTPException) as err:
                errors.append(repr(err))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            mine.append((due, time.monotonic() - due))
        conn.close()
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print(f"  warning: {len(errors)} request(s) failed, e.g. {errors[0]}", file=sys.stderr)
    return sorted(out)


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``."""
    data = sorted(values)
    rank = max(int(-(-q / 100.0 * len(data) // 1)), 1)
    return data[min(rank, len(data)) - 1]


def latency_summary(requests: list[tuple[float, float]]) -> dict[str, float]:
    """p50, p99, p99.9 and max (ms) of the latencies in ``requests``."""
    lat = [latency for _, latency in requests]
    return {
        "requests": len(lat),
        "p50_ms": pct(lat, 50) * 1000,
        "p99_ms": pct(lat, 99) * 1000,
        "p999_ms": pct(lat, 99.9) * 1000,
        "max_ms": max(lat) * 1000,
    }


@contextlib.contextmanager
def gunicorn(workdir: Path, env: Mapping[str, str], ready_path: str, what: str) -> Iterator[int]:
    """Run ``bench_app:app`` with ``bench_conf.py`` from ``workdir``; yield its port once ``ready_path`` answers.

    ``workdir`` and this folder lead ``PYTHONPATH``. The server gets SIGTERM on the way
    out (its hooks stop what they started) and SIGKILL to its group after 30 s.
    """
    port = free_port()
    full_env = dict(env, PYTHONPATH=os.pathsep.join([str(workdir), str(HERE), str(ROOT)]))
    argv = [sys.executable, "-m", "gunicorn", "-c", str(workdir / "bench_conf.py")]
    argv += ["--bind", f"127.0.0.1:{port}", "bench_app:app"]
    proc = subprocess.Popen(
        argv,
        cwd=workdir,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get_json(port, ready_path)
                break
            except (OSError, http.client.HTTPException, ValueError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
                    raise RuntimeError(f"gunicorn did not come up for {what}: {err}") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def bare_child(stopping: Any, count_file: str, priority: str, keep_cores: int) -> None:
    """:func:`crunch` in a bare child that set its own priority and CPUs first, as a user would by hand.

    ``priority``: ``"inherit"`` (no change), ``"low"`` (nice 19), ``"batch"`` (SCHED_BATCH
    at nice 19) or ``"idle"`` (SCHED_IDLE). ``keep_cores``: leave that many of the
    lowest-numbered CPUs of this process's affinity to the server.
    """
    if priority in ("batch", "idle"):
        policy = os.SCHED_BATCH if priority == "batch" else os.SCHED_IDLE
        os.sched_setscheduler(0, policy, os.sched_param(0))
    if priority in ("low", "batch"):
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    if keep_cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[keep_cores:])
    crunch(stopping, count_file)
