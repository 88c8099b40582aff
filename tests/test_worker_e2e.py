"""End to end, as a real process: `hostkit run` under a fake systemd with the probe port on.

The test plays systemd: it opens the AF_UNIX datagram socket named in
NOTIFY_SOCKET and sets WATCHDOG_USEC, then runs ``examples/probe_worker.py``
through ``python -m hostkit run probe_worker:create_builder`` from the examples
directory (so loading from the current directory is exercised too).
"""

from __future__ import annotations

import http.client
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, wait_until
from tests.subproc import python

EXAMPLES = Path(PROJECT_ROOT) / "examples"


class FakeSystemd:
    """The notify socket, and everything sent to it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name="fake-systemd", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.messages.append(data.decode())

    def count(self, predicate: Callable[[str], bool]) -> int:
        with self._lock:
            return sum(1 for m in self.messages if predicate(m))

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self.sock.close()


def count(text: str, fragment: str) -> int:
    """How many lines of ``text`` contain ``fragment``."""
    return sum(fragment in line for line in text.splitlines())


def status_of(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(tmp_path / "notify.sock"))
    try:
        yield fake
    finally:
        fake.close()


class TestWorkerUnderSystemd:
    @pytest.mark.timeout(120)
    def test_ready_health_fault_watchdog_and_sigterm(self, systemd: FakeSystemd, spawn, tmp_path: Path) -> None:
        """READY arrives; ready is 200; a fault turns it 503 and stops the watchdog; SIGTERM stops cleanly."""
        fault = tmp_path / "fault"
        argv = python(
            "-m", "hostkit", "run", "probe_worker:create_builder", "--probe-port", "0", "--log-level", "DEBUG"
        )
        worker = spawn(
            argv,
            cwd=EXAMPLES,
            stdout=False,
            stderr="separate",
            unset=("JOURNAL_STREAM",),
            NOTIFY_SOCKET=systemd.path,
            WATCHDOG_USEC="400000",  # a ping every 0.2 s
            PROBE_WORKER_FAULT_FILE=str(fault),
        )
        worker.wait_for_output("Health probe listening on", stream="err")
        match = re.search(r"Health probe listening on http://127\.0\.0\.1:(\d+)", worker.err)
        assert match, worker.err
        port = int(match.group(1))

        assert wait_until(lambda: systemd.count(lambda m: "READY=1" in m), 30), worker.err
        assert wait_until(lambda: status_of(port, "/health/ready") == 200, 30), worker.err
        assert status_of(port, "/health/live") == 200
        assert wait_until(lambda: systemd.count(lambda m: m == "WATCHDOG=1") >= 3, 30), systemd.messages

        fault.touch()
        assert wait_until(lambda: status_of(port, "/health/ready") == 503, 30), worker.err
        assert status_of(port, "/health/live") == 503
        # The withheld pings are the behaviour under test: the log line is how they show.
        assert wait_until(lambda: count(worker.err, "watchdog ping withheld"), 30), worker.err
        pings = systemd.count(lambda m: m == "WATCHDOG=1")
        seen = count(worker.err, "watchdog ping withheld")
        assert wait_until(lambda: count(worker.err, "watchdog ping withheld") >= seen + 3, 30), worker.err
        assert systemd.count(lambda m: m == "WATCHDOG=1") == pings, "pings went on while unhealthy"

        began = time.monotonic()
        worker.signal(signal.SIGTERM)
        code = worker.wait(timeout=30)
        elapsed = time.monotonic() - began
        assert code == 0, worker.err
        # Behaviour, not speed: the stop must fit the example's shutdown_timeout (10 s).
        assert elapsed < 10, f"the stop took {elapsed:.1f} s, past its 10 s budget"
        assert wait_until(lambda: systemd.count(lambda m: "STOPPING=1" in m), 10), systemd.messages
        assert "Ticker is faulted (RuntimeError: injected fault" in worker.err
        ready_at = next(i for i, m in enumerate(systemd.messages) if "READY=1" in m)
        stopping_at = next(i for i, m in enumerate(systemd.messages) if "STOPPING=1" in m)
        assert ready_at < stopping_at
        assert sum("READY=1" in m for m in systemd.messages) == 1
