"""The typed seams of process placement: options, messages, and no hostkit state on the user's object."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import dill
import pytest

from hostkit import BackgroundService, CancellationToken, HostBuilder, HostOptions, HostServiceCollection, LockStatus
from hostkit._process import protocol
from hostkit._process.options import ProcessOptions
from tests.conftest import wait_until

log = logging.getLogger(__name__)


class ReportsItsOwnAttributes(BackgroundService):
    """Beats, then says which underscore attributes its object has in the child."""

    def execute(self, stopping: CancellationToken) -> None:
        self.heartbeat()
        private = sorted(k for k in vars(self) if k.startswith("_"))
        log.warning("underscore attributes in the child: %s", private)
        while not stopping.wait(0.05):
            self.heartbeat()


class Idle(BackgroundService):
    def execute(self, stopping: CancellationToken) -> None:
        stopping.wait()


class TestProcessOptions:
    def test_registration_makes_validated_frozen_options(self) -> None:
        """The keywords stay as they were; the registration holds one frozen, normalised ProcessOptions."""
        services = HostServiceCollection()
        reg = services.add_hosted_service(
            Idle, placement="process", start_method="spawn", nice=5, cpu_affinity={1, 0, 1}, memory_limit=4096
        )
        assert reg.process_options == ProcessOptions(
            start_method="spawn", nice=5, cpu_affinity=(0, 1), memory_limit=4096
        )
        with pytest.raises(dataclasses.FrozenInstanceError):
            reg.process_options.nice = 0  # type: ignore[misc]


class TestMessages:
    @pytest.mark.parametrize(
        "message",
        [
            protocol.LockReport(LockStatus("holder", "/run/x.lock", 42)),
            protocol.LockReport(None),
            protocol.StopApplication(),
            protocol.Finished(),
            protocol.EndedBySigterm(),
            protocol.Failed(None, "builtins.KeyError", "KeyError: 'x'", "Traceback ..."),
        ],
    )
    def test_every_message_is_frozen_and_crosses_with_dill(self, message: Any) -> None:
        assert dataclasses.is_dataclass(message)
        assert dill.loads(dill.dumps(message)) == message
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(message, "extra_field", 1)


class TestChildState:
    @pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
    def test_child_keeps_no_hostkit_state_on_the_service_and_its_heartbeat_reaches_the_host(
        self, start_method: str, logs: Any
    ) -> None:
        """The runner stand-in is found by hostkit's registry, not stored in the user's object."""
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_hosted_service(
            ReportsItsOwnAttributes(), placement="process", start_method=start_method, heartbeat_timeout=30
        )
        with builder.build() as host:
            assert wait_until(lambda: logs.find("underscore attributes in the child"), timeout=30)
            assert wait_until(
                lambda: host.status()["ReportsItsOwnAttributes"].last_heartbeat_at is not None, timeout=30
            )
        (record,) = logs.find("underscore attributes in the child")
        assert record["message"].endswith(": []")
        assert record["process"] != os.getpid()


FORK_SERVER_SCRIPT = """
import sys, time
import psutil
from hostkit import BackgroundService, HostBuilder, HostOptions
from hostkit._process.forkserver import in_fork_server


class Idle(BackgroundService):
    def execute(self, stopping):
        stopping.wait()


if __name__ == "__main__":
    builder = HostBuilder(options=HostOptions(shutdown_timeout=10, configure_logging=False))
    builder.services.add_hosted_service(Idle, placement="process", start_method="forkserver")
    with builder.build() as host:
        deadline = time.monotonic() + 30
        while host.status()["Idle"].pid in (None, psutil.Process().pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        servers = [
            p for p in psutil.Process().children()
            if "from multiprocess.forkserver import main" in " ".join(p.cmdline())
        ]
        (server,) = servers
        with open(f"/proc/{server.pid}/status") as status:
            ignored = next(int(line.split()[1], 16) for line in status if line.startswith("SigIgn:"))
        print("here:", in_fork_server())
        print("server ignores SIGTERM:", bool(ignored & (1 << (15 - 1))))
"""


class TestForkServerGuard:
    def test_the_fork_server_ignores_sigterm_and_this_process_is_not_taken_for_it(self, tmp_path: Any) -> None:
        """Recognised by its command line (no stack walking): the guard runs in the server, nowhere else."""
        import subprocess
        import sys

        script = tmp_path / "forkserver_guard.py"
        script.write_text(FORK_SERVER_SCRIPT, encoding="utf-8")
        out = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["here: False", "server ignores SIGTERM: True"]
