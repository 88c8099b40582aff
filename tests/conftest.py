"""Shared fixtures: leak checks on every test, log capture, helpers."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from loguru import logger

# Long-lived helpers that multiprocess starts once per process and keeps on purpose.
_KEEP_CMDLINE = ("forkserver", "resource_tracker")


def _children() -> dict[int, psutil.Process]:
    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            cmdline = ""
        if any(k in cmdline for k in _KEEP_CMDLINE):
            continue
        found[child.pid] = child
    return found


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval)


def fetch_json(url: str, timeout: float = 10.0) -> Any:
    """The JSON a server answers at ``url``, or None when no whole answer came.

    A dev server's reloader ends the serving process whenever it likes, between the headers and
    the body too: a refused connection, an empty or cut body all mean "no answer yet".
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read().decode())
    except (OSError, http.client.HTTPException, json.JSONDecodeError):
        return None


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail any test that leaves a thread or a child process (zombies included) behind."""
    threads_before = set(threading.enumerate())
    children_before = set(_children())
    yield

    def leaked() -> tuple[list[threading.Thread], list[psutil.Process]]:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        procs = []
        for pid, proc in _children().items():
            if pid in children_before:
                continue
            try:
                if proc.status() == psutil.STATUS_ZOMBIE or proc.is_running():
                    procs.append(proc)
            except psutil.NoSuchProcess:
                pass
        return threads, procs

    wait_until(lambda: leaked() == ([], []), timeout=5.0, interval=0.02)
    threads, procs = leaked()
    for proc in procs:  # clean up so one leak does not cascade into the next tests
        try:
            proc.kill()
            proc.wait(2)
        except psutil.Error:
            pass
    assert not threads, f"test leaked threads: {[t.name for t in threads]}"
    assert not procs, f"test leaked child processes: {[(p.pid, p.info if hasattr(p, 'info') else '') for p in procs]}"


class LogCapture:
    """loguru records captured during a test (hostkit's included)."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self._lock = threading.Lock()

    def sink(self, message) -> None:  # type: ignore[no-untyped-def]
        record = message.record
        with self._lock:
            self.records.append(
                {
                    "level": record["level"].name,
                    "message": record["message"],
                    "service": record["extra"].get("service"),
                    "exception": record["exception"],
                    "thread": record["thread"].name,
                    "process": record["process"].id,
                }
            )

    @property
    def messages(self) -> list[str]:
        with self._lock:
            return [r["message"] for r in self.records]

    def text(self) -> str:
        return "\n".join(self.messages)

    def find(self, needle: str, level: str | None = None) -> list[dict]:
        with self._lock:
            return [r for r in self.records if needle in r["message"] and (level is None or r["level"] == level)]


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Capture every loguru record (hostkit's too) for the duration of the test."""
    capture = LogCapture()
    logger.enable("hostkit")
    handler_id = logger.add(capture.sink, level="DEBUG", format="{message}", enqueue=False)
    try:
        yield capture
    finally:
        logger.remove(handler_id)
        logger.disable("hostkit")


@pytest.fixture(autouse=True)
def _no_stray_logging_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Host.run()`` in a test must not replace the test process's loguru sinks.

    Tests of ``configure_logging`` itself call it explicitly and restore the sinks.
    """
    import hostkit._logging

    monkeypatch.setattr(hostkit._logging, "_configured", True)


PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start programs in their own session (``tests.subproc.Program``); every one is closed at teardown.

    ``spawn(argv, **options)`` returns the Program; its output files go under ``tmp_path``
    unless ``folder=`` says otherwise.
    """
    from tests.subproc import Program

    started: list[Program] = []

    def start(argv: list[str], **options: Any) -> Program:
        options.setdefault("folder", tmp_path)
        program = Program(argv, **options)
        started.append(program)
        return program

    try:
        yield start
    finally:
        for program in started:
            program.close()
