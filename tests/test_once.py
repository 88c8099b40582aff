"""The deployment lock: one holder at a time, released when the holder dies, taken over by a waiter."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostkit import BackgroundService, CancellationToken, HostBuilder, LockStatus, OncePerDeployment
from hostkit._once import DeploymentLock, default_lock_path
from hostkit.exceptions import ConfigurationError, InvalidServiceError, UnsafePathError
from hostkit.health import HealthChecks
from tests.conftest import wait_until
from tests.subproc import python
from tests.unprivileged import ATTACKER, attacker_popen, attacker_run, make_shared_dir, need_attacker


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

    def test_released_when_holder_is_killed(self, spawn, tmp_path: Path) -> None:
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
        proc = spawn(python("-c", code), cwd=tmp_path)
        proc.wait_for_output("held\n")
        mine = DeploymentLock(path)
        assert not mine.try_acquire()
        assert path.read_text().strip() == str(proc.pid)
        proc.signal(signal.SIGKILL)
        proc.wait(10)
        assert mine.try_acquire()
        mine.release()

    def test_default_path_names_the_service(self) -> None:
        """The default lock file is named after the key and this deployment's directory, the same every time."""
        path = default_lock_path("Cleaner")
        assert os.path.basename(path).startswith("Cleaner-")
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
        # The second host stands by: its status says so once its first try for the lock failed.
        assert wait_until(lambda: (lock := hosts[1].status()["Marker"].lock) is not None and lock.role == "standby")
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


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    with make_shared_dir() as path:
        yield path


@pytest.fixture
def shared_tmp(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temp directory is a shared, world-writable one (like /tmp) that another user can reach."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(shared_dir))
    return shared_dir


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class TestSharedDirectories:
    """Another local user (an unprivileged uid) tries to hijack the lock; the suite runs as root."""

    def test_default_lock_is_private(self, shared_tmp: Path) -> None:
        """The default lock lives in a 0700 directory of this user, and the file is created 0600."""
        lock = DeploymentLock(default_lock_path("Private"))
        assert lock.try_acquire()
        try:
            directory = os.path.dirname(lock.path)
            assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
            assert os.lstat(directory).st_uid == os.geteuid()
            assert stat.S_IMODE(os.lstat(lock.path).st_mode) == 0o600
        finally:
            lock.release()

    def test_processes_of_one_user_find_the_same_default_lock(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Workers of one server (same user, environment and directory) compute the same default lock path."""
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        monkeypatch.setenv("TMPDIR", str(tmp_path))
        monkeypatch.setattr(tempfile, "tempdir", None)  # recomputed from TMPDIR
        code = "from hostkit._once import default_lock_path; print(default_lock_path('Cleaner'))"
        paths = {
            subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(2)
        }
        assert paths == {default_lock_path("Cleaner")}
        assert os.path.dirname(default_lock_path("Cleaner")) == str(tmp_path / f"hostkit-{os.geteuid()}")

    def test_another_user_cannot_hold_the_default_lock(self, shared_tmp: Path) -> None:
        """A user who takes the lock file first cannot keep the service from running."""
        need_attacker()
        runs: list[str] = []
        service = OncePerDeployment(Marker(runs, "host"), poll_interval=0.05)
        attacker = attacker_popen("flock", "-n", service.lock_path, "-c", "echo held; exec sleep 30")
        try:
            assert attacker.stdout is not None
            # "held" if the attacker got the lock; EOF if flock could not even open the file.
            took_it = attacker.stdout.readline().strip() == "held"
            host = HostBuilder().add_hosted_service(service, name="Marker").build()
            with host:
                assert wait_until(lambda: runs == ["host"], timeout=10), "the service never ran"
            assert not took_it
        finally:
            _stop(attacker)

    def test_another_user_cannot_plant_a_link_at_the_default_lock(self, shared_tmp: Path) -> None:
        """A link planted where the default lock goes never makes a root host truncate its target."""
        need_attacker()
        victim = shared_tmp / "victim"
        victim.write_text("precious")
        victim.chmod(0o644)
        runs: list[str] = []
        service = OncePerDeployment(Marker(runs, "host"), poll_interval=0.05)
        attacker_run("ln", "-s", str(victim), service.lock_path)  # refused when the directory is private
        host = HostBuilder().add_hosted_service(service, name="Marker").build()
        with host:
            assert wait_until(lambda: runs == ["host"] or host.status()["Marker"].error, timeout=10)
        assert victim.read_text() == "precious"
        assert not os.path.islink(service.lock_path)
        assert runs == ["host"]  # and the service ran, on a lock of its own

    def test_link_at_a_given_lock_path_is_refused(self, shared_dir: Path) -> None:
        """A link another user planted at a chosen lock path is refused, at registration and at the lock."""
        need_attacker()
        victim = shared_dir / "victim"
        victim.write_text("precious")
        link = shared_dir / "app.lock"
        assert attacker_run("ln", "-s", str(victim), str(link)).returncode == 0
        with pytest.raises(UnsafePathError, match=r"app\.lock is a symbolic link; hostkit does not follow links"):
            DeploymentLock(link).try_acquire()
        with pytest.raises(UnsafePathError, match="is a symbolic link"):
            OncePerDeployment(Marker([], "x"), lock_path=link)
        assert victim.read_text() == "precious"

    def test_lock_file_made_by_another_user_is_refused(self, shared_dir: Path) -> None:
        """A lock file another user created first (and could lock) is refused, naming its owner."""
        need_attacker()
        path = shared_dir / "app.lock"
        assert attacker_run("sh", "-c", f"umask 0 && : > {path}").returncode == 0
        with pytest.raises(UnsafePathError, match=rf"app\.lock belongs to uid {ATTACKER}, not to this user"):
            DeploymentLock(path).try_acquire()
        with pytest.raises(UnsafePathError, match=rf"belongs to uid {ATTACKER}"):
            OncePerDeployment(Marker([], "x"), lock_path=path)

    def test_given_lock_path_in_a_sticky_directory_works_and_is_private(self, shared_dir: Path) -> None:
        """A chosen path in a sticky shared directory is honoured: the file is made 0600, no other user opens it."""
        need_attacker()
        path = shared_dir / "app.lock"
        lock = DeploymentLock(path)
        assert lock.try_acquire()
        try:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert attacker_run("flock", "-n", str(path), "-c", "true").returncode != 0
        finally:
            lock.release()

    def test_given_lock_path_in_a_directory_others_may_write_is_refused(self, tmp_path: Path) -> None:
        """A directory others may write without the sticky bit is refused at registration, with the fix."""
        loose = tmp_path / "loose"
        loose.mkdir()
        loose.chmod(0o777)
        with pytest.raises(UnsafePathError, match=r"other users may write without the sticky bit"):
            OncePerDeployment(Marker([], "x"), lock_path=loose / "app.lock")

    def test_own_lock_file_open_to_others_is_made_private(self, tmp_path: Path, logs) -> None:
        """This user's lock file that others may read (an older hostkit made it 0644) is set to 0600, with a warning."""
        path = tmp_path / "old.lock"
        path.write_text("")
        path.chmod(0o644)
        lock = DeploymentLock(path)
        assert lock.try_acquire()
        lock.release()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert logs.find("had mode 0644, open to other users; it is now 0600", level="WARNING")


class Holder(BackgroundService):
    """Holds the lock until stopped."""

    def execute(self, stopping: CancellationToken) -> None:
        stopping.wait()


class TestLockStatus:
    """status(), the health JSON and the detail say which host holds the lock and which stands by."""

    def test_status_names_the_holder_and_the_standby(self, tmp_path: Path) -> None:
        """Thread placement: the holder and the standby each show the lock, its path and the holder's pid."""
        path = str(tmp_path / "s.lock")
        hosts = []
        for _ in range(2):
            builder = HostBuilder()
            builder.add_hosted_service(OncePerDeployment(Holder(), lock_path=path, poll_interval=0.05), name="H")
            hosts.append(builder.build())
        a, b = hosts
        a.start()
        try:
            # The fencing token counts takeovers of this lock file: 1 for the first holder.
            holder = LockStatus("holder", path, os.getpid(), "file", 1)
            assert wait_until(lambda: a.status()["H"].lock == holder)
            b.start()
            try:
                standby = LockStatus("standby", path, os.getpid(), "file")
                assert wait_until(lambda: b.status()["H"].lock == standby)
                assert (
                    a.status()["H"].detail == f"holds the deployment lock {path} (pid {os.getpid()}), fencing token 1"
                )
                assert b.status()["H"].detail == f"standby: pid {os.getpid()} holds the deployment lock {path}"
                expected = {
                    "role": "standby",
                    "path": path,
                    "holder_pid": os.getpid(),
                    "backend": "file",
                    "token": None,
                    "holder_host": None,
                }
                assert b.status().to_dict()["services"][0]["lock"] == expected
                data = HealthChecks().attach(b).run().to_dict()["checks"]["services"]["data"]
                assert data["locks"] == {"H": expected}
            finally:
                a.stop()
                assert wait_until(lambda: b.status()["H"].lock == LockStatus("holder", path, os.getpid(), "file", 2))
                assert a.status()["H"].lock is None
                b.stop()
            assert b.status()["H"].lock is None and b.status()["H"].detail is None
        finally:
            a.stop()

    @pytest.mark.timeout(120)
    def test_process_placement_reports_the_child_as_holder(self, tmp_path: Path) -> None:
        """Process placement: the holder's pid is its child's; the other host's child stands by naming it."""
        path = str(tmp_path / "p.lock")
        hosts = []
        for _ in range(2):
            builder = HostBuilder()
            service = OncePerDeployment(Holder(), lock_path=path, poll_interval=0.05)
            builder.add_hosted_service(service, name="H", placement="process")
            hosts.append(builder.build())
        a, b = hosts
        with a:

            def a_holds() -> bool:
                s = a.status()["H"]
                return s.lock == LockStatus("holder", path, s.pid, "file", 1) and s.pid != os.getpid()

            assert wait_until(a_holds, timeout=60)
            a_child = a.status()["H"].pid
            with b:

                def b_stands_by() -> bool:
                    s = b.status()["H"]
                    want = LockStatus("standby", path, a_child, "file")
                    return s.lock == want and s.pid not in (os.getpid(), a_child)

                assert wait_until(b_stands_by, timeout=60)
                assert b.status()["H"].detail == f"standby: pid {a_child} holds the deployment lock {path}"
                a.stop()
                assert a.status()["H"].lock is None

                def b_holds() -> bool:
                    s = b.status()["H"]
                    return s.lock == LockStatus("holder", path, s.pid, "file", 2)

                assert wait_until(b_holds, timeout=30)
            assert b.status()["H"].lock is None
