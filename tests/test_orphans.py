"""No orphans, no zombies: a killed host leaves nothing, Ctrl+C stops once, killed children are restarted.

The first two run a real host in its own session (``sys.executable``), as a user
would; the third kills children of a host in this process 50 times.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from hostkit import BackgroundService, CancellationToken, HostBuilder, HostOptions, HostState, RestartPolicy
from tests.conftest import PROJECT_ROOT, wait_until

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
    """A host script in its own session; its output is collected to a file."""

    def __init__(self, tmp_path: Path, method: str, count: int) -> None:
        self.folder = tmp_path / "pids"
        self.folder.mkdir()
        script = tmp_path / "host.py"
        script.write_text(HOST_SCRIPT)
        self.output = tmp_path / "output.txt"
        self._out = open(self.output, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(self.folder), method, str(count)],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.count = count

    def child_pids(self) -> list[int]:
        return [int(p.name) for p in self.folder.iterdir()]

    def wait_ready(self) -> list[int]:
        ready = wait_until(lambda: len(self.child_pids()) >= self.count or self.proc.poll() is not None, timeout=60)
        assert ready and self.proc.poll() is None, f"host not ready:\n{self.text()}"
        return self.child_pids()

    def text(self) -> str:
        self._out.flush()
        return self.output.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._out.close()


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
            descendants = [p.pid for p in psutil.Process(host.proc.pid).children(recursive=True)]
            assert set(services) <= set(descendants)
            host.proc.kill()
            host.proc.wait(10)
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
            os.killpg(host.proc.pid, signal.SIGINT)
            code = host.proc.wait(30)
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
