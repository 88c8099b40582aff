"""No orphans, no zombies: a killed host leaves nothing, Ctrl+C stops once, killed children are restarted,
and what a service started (its own subprocesses, forks of itself) is stopped with it.

Hosts run in their own session (``sys.executable``), as a user would run them, or in
this process; processes are checked by pid and start time, so a reused pid is not
mistaken for a survivor.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hostkit import (
    BackgroundService,
    CancellationToken,
    HostBuilder,
    HostOptions,
    HostState,
    RestartPolicy,
    ServiceState,
)
from tests.conftest import PROJECT_ROOT, wait_until
from tests.subproc import Program, python

HOST_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from loguru import logger
    from hostkit import BackgroundService, HostBuilder, HostOptions

    class Worker(BackgroundService):
        def __init__(self, folder):
            self.folder = folder

        def execute(self, stopping):
            Path(self.folder, str(os.getpid())).touch()
            logger.info("worker {} running", os.getpid())
            while not stopping.wait(0.05):
                pass
            logger.info("worker {} saw the stop", os.getpid())

    if __name__ == "__main__":
        folder, method, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10, start_method=method))
        for i in range(count):
            builder.services.add_hosted_service(Worker(folder), placement="process", name=f"worker-{i}")
        raise SystemExit(builder.build().run())
    """
)


class HostProcess:
    """HOST_SCRIPT in its own session; each worker records its pid as a file name in ``folder``."""

    def __init__(self, tmp_path: Path, method: str, count: int) -> None:
        self.folder = tmp_path / "pids"
        self.folder.mkdir()
        script = tmp_path / "host.py"
        script.write_text(HOST_SCRIPT)
        self.program = Program(python(script, self.folder, method, str(count)), folder=tmp_path)
        self.count = count

    def child_pids(self) -> list[int]:
        return [int(p.name) for p in self.folder.iterdir()]

    def wait_ready(self) -> list[int]:
        self.program.wait_for(lambda: len(self.child_pids()) >= self.count, timeout=60, what="every worker running")
        return self.child_pids()

    def text(self) -> str:
        return self.program.output

    def close(self) -> None:
        self.program.close()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class TestHostKilled:
    @pytest.mark.timeout(120)
    @pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
    def test_sigkill_of_the_host_leaves_no_child_after_2_s(self, method, tmp_path) -> None:
        """SIGKILL the host while process-placed services run: every process it started is gone within 2 s."""
        host = HostProcess(tmp_path, method, 2)
        try:
            services = host.wait_ready()
            descendants = [p.pid for p in psutil.Process(host.program.pid).children(recursive=True)]
            assert set(services) <= set(descendants)
            host.program.signal(signal.SIGKILL)
            host.program.wait(10)
            killed_at = time.monotonic()
            gone = wait_until(lambda: not any(alive(pid) for pid in descendants), timeout=2.0, interval=0.02)
            left = [pid for pid in descendants if alive(pid)]
            assert gone, f"still running {time.monotonic() - killed_at:.2f} s after the host was killed: {left}"
        finally:
            for pid in host.child_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            host.close()


class TestCtrlC:
    @pytest.mark.timeout(120)
    def test_sigint_to_the_process_group_is_one_graceful_stop(self, tmp_path) -> None:
        """Ctrl+C reaches every process of the group: children ignore it, the host stops once, exit code 0."""
        host = HostProcess(tmp_path, "forkserver", 3)
        try:
            pids = host.wait_ready()
            host.program.signal_group(signal.SIGINT)
            code = host.program.wait(30)
            text = host.text()
            assert code == 0, text
            assert text.count("Received SIGINT; stopping the host") == 1, text
            assert text.count("Host stopping") == 1, text
            for pid in pids:
                assert f"worker {pid} saw the stop" in text, text
            for i in range(3):
                assert f"Background service 'worker-{i}' stopped" in text, text
            assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
            assert wait_until(lambda: not any(alive(pid) for pid in pids), timeout=5)
        finally:
            host.close()


class Worker(BackgroundService):
    """Runs until stopped."""

    def execute(self, stopping: CancellationToken) -> None:
        stopping.wait()


def zombies() -> list[int]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                out.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return out


class TestKillNine:
    @pytest.mark.timeout(180)
    def test_50_rounds_of_kill_9_on_a_random_child(self, logs) -> None:
        """Each killed child is restarted under the policy, the host stays up, no zombie, nothing left after stop."""
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        policy = RestartPolicy(max_restarts=None, backoff=0.005, multiplier=1, jitter=0.0)
        names = [f"w{i}" for i in range(3)]
        for name in names:
            builder.services.add_hosted_service(Worker(), placement="process", restart=policy, name=name)
        host = builder.build()
        rng = random.Random(7)
        killed: list[int] = []
        with host:

            def running_pid(name: str) -> int | None:
                status = host.status()[name]
                if status.state.value != "running" or status.pid in (None, os.getpid()) or status.pid in killed:
                    return None
                return status.pid if alive(status.pid) else None

            for round_ in range(50):
                name = rng.choice(names)
                assert wait_until(lambda n=name: running_pid(n), timeout=30), f"round {round_}: {host.status()[name]}"
                pid = running_pid(name)
                assert pid is not None
                before = host.status()[name].restarts
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                assert wait_until(lambda n=name, b=before: host.status()[n].restarts > b, timeout=30), (
                    f"round {round_}: {name} was not restarted"
                )
                assert host.state is HostState.RUNNING and not host.lifetime.stopping.is_set()
            assert not zombies(), f"zombies: {zombies()}"
            total = sum(host.status()[n].restarts for n in names)
            assert total == 50
        assert not any(alive(pid) for pid in killed)
        for name in names:
            assert host.status()[name].state.value == "stopped"
        # Every kill is logged as a failure followed by a restart, naming the child's pid.
        # (The cause's wording is asserted in test_process_placement; here a forkserver
        # child's status occasionally reaches the parent as exit code 255 instead of -9,
        # when multiprocess's fork server loses it, so only the pid is matched.)
        restarts = logs.find("failed; restarting it in", level="ERROR")
        assert len(restarts) == 50
        assert sorted(
            pid for pid in killed if any(f"child process {pid} " in r["message"] for r in restarts)
        ) == sorted(killed)


# -- what a service starts is stopped with it ----------------------------------------------


class StartsProcesses(BackgroundService):
    """Starts `sleep 300` and a fork of itself that ignores SIGTERM, records both, then runs until stopped.

    The fork never sees the token (no watcher thread lives in it): only the host's sweep of
    the child's process group can end it, and only with SIGKILL.
    """

    def __init__(self, folder: str, hoard_mb: int = 0) -> None:
        self.folder = folder
        self.hoard_mb = hoard_mb

    def execute(self, stopping: CancellationToken) -> None:
        sleeper = subprocess.Popen(["sleep", "300"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "this process is multi-threaded": known, and the fork only sleeps
            copy = os.fork()
        if copy == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(300)
            os._exit(0)
        started = [(pid, psutil.Process(pid).create_time()) for pid in (sleeper.pid, copy)]
        record = Path(self.folder, f"{os.getpid()}.json")
        record.with_suffix(".tmp").write_text(json.dumps(started))
        record.with_suffix(".tmp").rename(record)
        hoard = bytearray(self.hoard_mb * 1024 * 1024)
        for i in range(0, len(hoard), 4096):
            hoard[i] = 1
        stopping.wait()


def recorded(folder: Path) -> list[tuple[int, float]]:
    """(pid, start time) of every process the services recorded in ``folder``."""
    found: list[tuple[int, float]] = []
    for path in folder.glob("*.json"):
        found.extend((pid, created) for pid, created in json.loads(path.read_text()))
    return found


def running(pid: int, created: float) -> bool:
    """``True`` if the process that had ``pid`` and started at ``created`` still runs (a zombie does not)."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def still_running(processes: list[tuple[int, float]]) -> list[int]:
    return [pid for pid, created in processes if running(pid, created)]


def describe(pids: list[int]) -> list[str]:
    """Each pid with its parent, group, state and command line, for a failure message."""
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            out.append(f"{pid} (ppid {proc.ppid()}, pgid {os.getpgid(pid)}, {proc.status()}): {proc.cmdline()}")
        except (psutil.Error, OSError):
            out.append(f"{pid} (gone)")
    return out


GRANDCHILDREN_SCRIPT = textwrap.dedent(
    """
    import sys
    from hostkit import HostBuilder, HostOptions
    from tests.test_orphans import StartsProcesses

    if __name__ == "__main__":
        folder, method = sys.argv[1], sys.argv[2]
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10, start_method=method))
        builder.services.add_hosted_service(StartsProcesses(folder), placement="process", name="starter")
        raise SystemExit(builder.build().run())
    """
)


@pytest.fixture
def records(tmp_path: Path) -> Iterator[Path]:
    """The folder services record their processes in; whatever of them still runs is killed at the end."""
    folder = tmp_path / "records"
    folder.mkdir()
    yield folder
    for pid in still_running(recorded(folder)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class TestWhatAServiceStarted:
    def test_graceful_stop_ends_the_processes_the_service_started(self, records, logs) -> None:
        """After a graceful stop, the service's `sleep 300` and its SIGTERM-deaf fork are gone, and the log says so."""
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_hosted_service(StartsProcesses(str(records)), placement="process", name="starter")
        host = builder.build()
        with host:
            assert wait_until(lambda: recorded(records), timeout=30), logs.text()
            started = recorded(records)
            assert len(still_running(started)) == 2
        assert wait_until(lambda: not still_running(started), timeout=2.0), f"still running: {still_running(started)}"
        assert host.status()["starter"].state is ServiceState.STOPPED
        assert logs.find("left processes running in its process group", level="WARNING"), logs.text()
        assert logs.find("sent them SIGKILL", level="WARNING"), logs.text()

    @pytest.mark.timeout(90)
    def test_memory_limit_kill_ends_the_processes_the_service_started(self, records, logs) -> None:
        """A child stopped over its memory_limit takes what it started with it."""
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10, on_background_error="ignore"))
        builder.services.add_hosted_service(
            StartsProcesses(str(records), hoard_mb=150), placement="process", name="starter", memory_limit="100MB"
        )
        host = builder.build()
        with host:
            assert wait_until(lambda: host.status()["starter"].state is ServiceState.FAULTED, timeout=40), logs.text()
            started = recorded(records)
            assert len(started) == 2
            assert wait_until(lambda: not still_running(started), timeout=2.0), (
                f"still running: {still_running(started)}"
            )
        assert "MemoryLimitError" in (host.status()["starter"].error or "")

    @pytest.mark.timeout(120)
    @pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
    def test_sigkill_of_the_host_ends_the_processes_the_service_started(self, method, tmp_path) -> None:
        """SIGKILL the host: within 2 s its child, what the child started, the fork server and the
        resource tracker are all gone."""
        script = tmp_path / "host.py"
        script.write_text(GRANDCHILDREN_SCRIPT)
        folder = tmp_path / "records"
        folder.mkdir()
        program = Program(python(script, folder, method), folder=tmp_path, PYTHONPATH=PROJECT_ROOT)
        everything: list[tuple[int, float]] = []
        try:
            program.wait_for(lambda: recorded(folder), timeout=60, what="the grandchildren starting")
            grandchildren = recorded(folder)
            descendants = psutil.Process(program.pid).children(recursive=True)
            everything = [(p.pid, p.create_time()) for p in descendants]
            assert {pid for pid, _ in grandchildren} <= {pid for pid, _ in everything}
            program.signal(signal.SIGKILL)
            program.wait(10)
            gone = wait_until(lambda: not still_running(everything), timeout=2.0, interval=0.02)
            assert gone, (
                f"still running 2 s after the host was killed: {describe(still_running(everything))}\n{program.output}"
            )
        finally:
            for pid in still_running(everything):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            program.close()
