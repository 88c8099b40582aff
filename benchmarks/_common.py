"""What several benchmark scripts share: child processes started, awaited and timed.

A benchmark run as a script has this folder as ``sys.path[0]``, so it imports this
module by its plain name. (No script here may be named like a standard-library
module, or it would shadow it for hostkit: the queue benchmark is ``queues.py``.)
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def ready_child(argv: list[str], what: str, timeout: float) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` in its own session and yield it once it printed a line starting with READY.

    The child (and its process group) is killed on the way out if it is still running.
    """
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.startswith(b"READY"):
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                raise SystemExit(f"{what} never said READY (exit {proc.poll()})")
            if select.select([proc.stdout], [], [], left)[0]:
                line = proc.stdout.readline()
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def sigterm_to_exit(proc: subprocess.Popen[bytes], what: str, timeout: float) -> float:
    """SIGTERM ``proc``; seconds until it exited. It must exit with code 0.

    A pidfd is readable the instant the process exits, whereas ``Popen.wait(timeout)``
    polls with growing sleeps (0.5 ms ... 50 ms) that would quantize the result.
    """
    pidfd = os.pidfd_open(proc.pid)
    try:
        began = time.perf_counter()
        os.kill(proc.pid, signal.SIGTERM)
        exited = select.select([pidfd], [], [], timeout)[0]
        took = time.perf_counter() - began
    finally:
        os.close(pidfd)
    if not exited:
        raise SystemExit(f"{what} did not exit within {timeout} s of SIGTERM")
    code = proc.wait()
    if code != 0:
        raise SystemExit(f"{what} exited with {code} after SIGTERM")
    return took


def calibrate() -> float:
    """Seconds for a fixed amount of pure-Python work: this machine's speed right now.

    A machine slows under sustained load (throttling), so every round times
    this beside its figures; compare result files only when their calibrations agree.
    """
    began = time.perf_counter()
    total = 0
    for i in range(300_000):
        total += i * i % 7
    return time.perf_counter() - began


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write a benchmark's result as indented JSON, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


@dataclass(frozen=True)
class Target:
    """One target a benchmark checks: ``value`` compared with ``limit`` by ``op``.

    ``value`` is ``None`` when the case was not measured in this run (``--quick`` may
    skip it); such a target is reported as "not measured", never as met.
    """

    name: str
    value: float | None
    limit: float
    op: str = "<="
    unit: str = ""

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"Target op must be '<=' or '>=', not {self.op!r}")

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def line(self) -> str:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[self.met]
        shown = "-" if self.value is None else _number(self.value) + self.unit
        return f"  {verdict:<12} {self.name}: {shown} (target {self.op} {_number(self.limit)}{self.unit})"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "op": self.op,
            "limit": self.limit,
            "unit": self.unit,
            "met": self.met,
        }


def report_targets(targets: Iterable[Target]) -> list[dict[str, Any]]:
    """Print every target with met / NOT met, and return them for the JSON file's ``"targets"`` key.

    Every script prints this block last and stores the list under ``"targets"``, so
    ``python -m benchmarks`` can gather one summary from the result files.
    """
    targets = list(targets)
    print("\ntargets:")
    for target in targets:
        print(target.line())
    return [t.as_json() for t in targets]


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes] | None, str]:
    """Start a private redis-server on a unix socket in ``directory``: ``(process, url)``, or ``(None, why not)``.

    The caller stops the process. Nothing is saved to disk.
    """
    binary = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        return None, "redis-py not installed (pip install 'pyhostkit[redis]')"
    if binary is None:
        return None, "redis-server not on PATH"
    sock = os.path.join(directory, "redis.sock")
    cmd = [binary, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no", "--dir", directory]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"unix://{sock}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if redis.Redis.from_url(url).ping():
                return proc, url
        except (redis.ConnectionError, FileNotFoundError):
            time.sleep(0.02)
    proc.kill()
    proc.wait()
    return None, "redis-server did not start"
