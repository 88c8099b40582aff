"""The deployment lock: one holder at a time, released when the holder dies, taken over by a waiter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from hostkit import BackgroundService, CancellationToken, HostBuilder, OncePerDeployment
from hostkit._once import DeploymentLock, default_lock_path
from hostkit.exceptions import ConfigurationError, InvalidServiceError
from tests.conftest import wait_until


class Marker(BackgroundService):
    def __init__(self, runs: list[str], label: str) -> None:
        self.runs = runs
        self.label = label

    def execute(self, stopping: CancellationToken) -> None:
        self.runs.append(self.label)
        stopping.wait()


class TestDeploymentLock:
    def test_exclusive_within_one_process(self, tmp_path: Path) -> None:
        """Two lock objects on one file exclude each other, even in one process; release frees it."""
        a, b = DeploymentLock(tmp_path / "x.lock"), DeploymentLock(tmp_path / "x.lock")
        assert a.try_acquire()
        assert not b.try_acquire()
        a.release()
        assert b.try_acquire()
        b.release()
        a.release()  # idempotent

    def test_released_when_holder_is_killed(self, tmp_path: Path) -> None:
        """A process killed with SIGKILL while holding the lock frees it (the kernel closes its file)."""
        path = tmp_path / "k.lock"
        code = textwrap.dedent(
            f"""
            import sys, time
            from hostkit._once import DeploymentLock
            lock = DeploymentLock({str(path)!r})
            assert lock.try_acquire()
            print("held", flush=True)
            time.sleep(60)
            """
        )
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
            mine = DeploymentLock(path)
            assert not mine.try_acquire()
            assert path.read_text().strip() == str(proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert mine.try_acquire()
            mine.release()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()

    def test_default_path_names_the_service(self) -> None:
        """The default lock file is in the temp dir, named after the key and this deployment's directory."""
        path = default_lock_path("Cleaner")
        assert os.path.basename(path).startswith("hostkit-Cleaner-")
        assert path.endswith(".lock")
        assert default_lock_path("Cleaner") == path


class TestOncePerDeployment:
    def test_only_one_of_two_hosts_runs_it_and_the_other_takes_over(self, tmp_path: Path, logs) -> None:
        """Of two hosts wrapping the same service, one runs it; when that host stops, the other takes over."""
        runs: list[str] = []
        lock = tmp_path / "d.lock"
        hosts = []
        for label in ("a", "b"):
            builder = HostBuilder()
            builder.add_hosted_service(
                OncePerDeployment(Marker(runs, label), lock_path=lock, poll_interval=0.05), name="Marker"
            )
            hosts.append(builder.build())
        hosts[0].start()
        assert wait_until(lambda: runs == ["a"])
        hosts[1].start()
        assert wait_until(lambda: logs.find("another process holds"), timeout=10)
        assert runs == ["a"]
        began = time.monotonic()
        hosts[0].stop()
        assert wait_until(lambda: runs == ["a", "b"], timeout=10)
        assert time.monotonic() - began < 5
        hosts[1].stop()
        assert logs.find("'Marker' took the deployment lock")
        assert logs.find("'Marker' released the deployment lock")

    def test_stop_while_waiting_returns_promptly(self, tmp_path: Path) -> None:
        """A host waiting for the lock stops at once: waiting is an interruptible poll."""
        holder = DeploymentLock(tmp_path / "w.lock")
        assert holder.try_acquire()
        try:
            runs: list[str] = []
            service = OncePerDeployment(Marker(runs, "x"), lock_path=tmp_path / "w.lock", poll_interval=30)
            host = HostBuilder().add_hosted_service(service).build()
            host.start()
            stopped = threading.Event()

            def stop() -> None:
                host.stop()
                stopped.set()

            t = threading.Thread(target=stop)
            t.start()
            assert stopped.wait(10)
            t.join()
            assert runs == []
            assert host.status()["OncePerDeployment"].state.value == "stopped"
        finally:
            holder.release()

    @pytest.mark.timeout(90)
    def test_process_placement_the_child_holds_the_lock(self, tmp_path: Path) -> None:
        """With placement='process' the service's child takes the lock; it is free again after the stop."""
        lock = tmp_path / "p.lock"
        service = OncePerDeployment(Marker([], "p"), lock_path=lock, poll_interval=0.05)
        host = HostBuilder().add_hosted_service(service, placement="process", name="Marker").build()
        probe = DeploymentLock(lock)
        with host:

            def holder() -> int | None:
                pid = host.status()["Marker"].pid
                text = lock.read_text().strip() if lock.exists() else ""
                return pid if pid != os.getpid() and text == str(pid) else None

            assert wait_until(holder, timeout=60)
            assert not probe.try_acquire()
        assert probe.try_acquire()
        probe.release()

    def test_bad_arguments(self) -> None:
        """A non-service or a bad poll interval is refused with the value named."""
        with pytest.raises(InvalidServiceError, match=r"needs a BackgroundService instance or class, not: 3 \(int\)"):
            OncePerDeployment(3)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=r"poll_interval must be > 0 seconds, not: 0"):
            OncePerDeployment(Marker([], "x"), poll_interval=0)
