"""Shared by the once-per-cluster tests: a host process that stands for one machine, and a socket proxy.

As a script:

- ``python tests/cluster_helpers.py host BACKEND TARGET KEY RECORD_DIR TTL`` runs a host
  whose only service is ``OncePerDeployment(Writer(), lock=...)`` on a Redis lease
  (``BACKEND`` ``redis``, ``TARGET`` a URL) or a PostgreSQL lock (``postgres``, a DSN).
  The writer makes a fenced write every 50 ms: into the same Redis (a Lua check of
  the highest token seen) or the same database (``Lease.fence_postgres``).
  Every event goes to ``RECORD_DIR/<pid>.log`` as ``event token monotonic-time``:
  ``start``, ``write-ok``, ``write-refused``, ``working``, ``stop``. While the file
  ``RECORD_DIR/work`` exists, each round first does two seconds of uninterruptible
  "work" (``working`` is logged before it), the window in which a test pauses it.
- ``python tests/cluster_helpers.py proxy LISTEN TARGET`` forwards a unix socket to
  another: a network path that a test cuts by stopping this process (SIGSTOP).

It stops on SIGTERM like any worker host.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the `tests` package and hostkit importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The fenced write on Redis: refuse a token lower than the highest seen, else record it and write.
REDIS_FENCED_WRITE = """
local seen = tonumber(redis.call('GET', KEYS[1]) or '0')
local token = tonumber(ARGV[1])
if token < seen then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[1] .. ' ' .. ARGV[2])
return 1
"""

POSTGRES_SCHEMA = "CREATE TABLE IF NOT EXISTS fenced_log (name text NOT NULL, token bigint NOT NULL, pid integer)"


def record_lines(folder: Path) -> dict[int, list[tuple[str, int, float]]]:
    """Every host's events, by pid: (event, token, monotonic time)."""
    events: dict[int, list[tuple[str, int, float]]] = {}
    for path in folder.glob("*.log"):
        rows = []
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                rows.append((parts[0], int(parts[1]), float(parts[2])))
        events[int(path.stem)] = rows
    return events


def _fenced_writer(backend: str, target: str, key: str, lease: Any) -> Any:
    """A function token -> bool that makes one fenced write (True: accepted)."""
    pid = os.getpid()
    if backend == "redis":
        import redis

        client = redis.Redis.from_url(target, socket_timeout=0.5, socket_connect_timeout=0.5)
        script = client.register_script(REDIS_FENCED_WRITE)
        keys = [f"resource:{key}:fence", f"resource:{key}:log"]
        return lambda token: int(script(keys=keys, args=[token, pid])) == 1
    import psycopg

    state: dict[str, Any] = {}

    def write(token: int) -> bool:
        conn = state.get("conn")
        if conn is None or conn.closed:
            conn = state["conn"] = psycopg.connect(target, connect_timeout=2)
        # The documented pattern: pass the fence, then write, in one transaction.
        with conn.transaction():
            if not lease.fence_postgres(conn, key):
                return False
            conn.execute("INSERT INTO fenced_log (name, token, pid) VALUES (%s, %s, %s)", (key, token, pid))
        return True

    return write


def run_host(backend: str, target: str, key: str, folder: str, ttl: float) -> None:
    from hostkit import BackgroundService, CancellationToken, HostBuilder, OncePerDeployment
    from hostkit.cluster import LockBackend, RedisLease, current_lease

    record_path = os.path.join(folder, f"{os.getpid()}.log")
    work_flag = os.path.join(folder, "work")

    def record(event: str, token: int) -> None:
        with open(record_path, "a") as f:
            f.write(f"{event} {token} {time.monotonic():.6f}\n")

    class Writer(BackgroundService):
        def execute(self, stopping: CancellationToken) -> None:
            lease = current_lease()
            assert lease is not None and lease.token is not None
            token = lease.token
            write = _fenced_writer(backend, target, key, lease)
            record("start", token)
            try:
                while True:
                    if os.path.exists(work_flag):
                        record("working", token)
                        # Work that cannot be interrupted (a test pauses the process here), ending
                        # 2 s after it began by the clock: time spent stopped counts, as it does
                        # for time.sleep() from Python 3.11 (on 3.10 a stopped sleep resumes
                        # with its whole remaining time).
                        done_at = time.monotonic() + 2
                        while time.monotonic() < done_at:
                            time.sleep(0.01)
                    try:
                        record("write-ok" if write(token) else "write-refused", token)
                    except Exception as err:
                        record("write-failed", token)
                        print(f"write failed: {type(err).__name__}: {err}", flush=True)
                    if stopping.wait(0.05):
                        break
            finally:
                record("stop", token)

    lock: LockBackend
    if backend == "redis":
        lock = RedisLease(target, key=key, ttl=ttl)
    else:
        from hostkit.cluster import PostgresLock

        lock = PostgresLock(target, key=key, ttl=ttl)
    builder = HostBuilder()
    builder.add_hosted_service(OncePerDeployment(Writer(), lock=lock, poll_interval=0.05), name="Writer")
    print("ready", flush=True)
    builder.build().run()


def run_proxy(listen: str, target: str) -> None:
    """Forward every connection on unix socket ``listen`` to unix socket ``target``."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(listen)
    server.listen(16)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(target)
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


if __name__ == "__main__":
    if sys.argv[1] == "host":
        run_host(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], float(sys.argv[6]))
    elif sys.argv[1] == "proxy":
        run_proxy(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
