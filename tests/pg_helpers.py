"""A real PostgreSQL server for the tests: initdb into a temporary directory, postgres on 127.0.0.1.

The fixture ``postgres_server`` (session scope) starts one; tests that restart a server
make their own :class:`PostgresServer`. The server runs as the user ``postgres`` when
the tests run as root (postgres refuses to run as root), else as the current user. It
is stopped by its pid. Without PostgreSQL server binaries the tests skip, saying how
to install them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

PG_SKIP = (
    "no PostgreSQL server could be started ({why}); install it with `apt-get install postgresql` "
    "(.ci/system-deps does this in CI) to run the PostgreSQL lock tests"
)


def find_bindir() -> str | None:
    """The directory of ``initdb`` and ``postgres``: Debian's versioned directory, PATH, or pg_config."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if os.path.exists(os.path.join(candidate, "initdb")):
            return candidate
    initdb = shutil.which("initdb")
    if initdb is not None:
        return os.path.dirname(initdb)
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if os.path.exists(os.path.join(bindir, "initdb")):
            return bindir
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresServer:
    """A postgres child on 127.0.0.1:``port``; :attr:`dsn` for psycopg. :meth:`halt` + :meth:`start` restarts it."""

    def __init__(self) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError("no initdb found in /usr/lib/postgresql/*/bin, on PATH or by pg_config")
        self.bindir = bindir
        self.dir = tempfile.mkdtemp(prefix="hostkit-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise RuntimeError(
                    "postgres refuses to run as root, and there is no user `postgres` to run it as"
                ) from None
            self._user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        out = subprocess.run(
            [
                os.path.join(bindir, "initdb"),
                "-D",
                self.data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            capture_output=True,
            cwd=self.dir,
            **self._user,
        )
        if out.returncode != 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise RuntimeError(f"initdb failed: {out.stderr.decode(errors='replace')[-500:]}")

    def start(self) -> None:
        # No unix socket (its default directory may not exist), TCP on loopback only. No fsync:
        # a clean restart still keeps every committed row; only crash safety is given up.
        self._log_file = open(os.path.join(self.dir, "server.log"), "ab")  # closed in halt()
        self.proc = subprocess.Popen(
            [
                os.path.join(self.bindir, "postgres"),
                "-D", self.data,
                "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1",
                "-c", "unix_socket_directories=",
                "-c", "fsync=off",
                "-c", "max_connections=50",
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            **self._user,
        )  # fmt: skip
        import psycopg

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self.log()[-500:]}")
            try:
                with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("postgres did not accept connections within 30 s")

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "server.log"), "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def halt(self) -> None:
        """Stop the server (SIGINT: "fast" shutdown, every session ends), keeping its data: :meth:`start` again."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """A started server, or a skip saying why none can start."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip(PG_SKIP.format(why="psycopg is not installed: pip install 'pyhostkit[postgres]'"))
    try:
        server = PostgresServer()
    except RuntimeError as err:
        pytest.skip(PG_SKIP.format(why=err))
    for attempt in range(3):
        try:
            server.start()
            return server
        except RuntimeError as err:
            server.halt()
            if "already in use" in str(err) and attempt < 2:
                # Another program took the port between free_port() and the bind: take another.
                server.port = free_port()
                server.dsn = f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres"
                continue
            server.stop()
            pytest.skip(PG_SKIP.format(why=err))
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole session; skips (saying why) where none can start."""
    server = start_postgres()
    yield server
    server.stop()
