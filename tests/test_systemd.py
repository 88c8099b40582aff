"""systemd notify: the sender and the host integration, against a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from hostkit import BackgroundService, HostBuilder, HostedService, HostOptions
from hostkit.exceptions import ConfigurationError, HostStartupError, SystemdNotifyError
from hostkit.health import HealthCheckResult, use_health
from hostkit.systemd import Notifier, SystemdService, use_systemd
from tests.conftest import wait_until


class NotifySocket:
    """What systemd would be: a datagram socket that records every message."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[str] = []

    def receive_until(self, predicate: Callable[[list[str]], bool], timeout: float = 15.0) -> list[str]:
        """Receive until ``predicate(messages)`` holds; fail at the deadline."""
        deadline = time.monotonic() + timeout
        while not predicate(self.messages):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"systemd never got the expected message; got: {self.messages}")
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        return self.messages

    def drain(self) -> list[str]:
        """Everything already queued on the socket."""
        got = []
        self.sock.setblocking(False)
        try:
            while True:
                got.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        self.messages.extend(got)
        return got

    def close(self) -> None:
        self.sock.close()


def has(fragment: str) -> Callable[[list[str]], bool]:
    return lambda messages: any(fragment in m for m in messages)


@pytest.fixture
def notify_socket(tmp_path) -> Iterator[NotifySocket]:
    sock = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        yield sock
    finally:
        sock.close()


class Idle(BackgroundService):
    def execute(self, stopping):
        stopping.wait()


class TestNotifier:
    def test_sends_to_a_path_socket(self, notify_socket) -> None:
        """notify() sends one datagram of KEY=VALUE lines to the socket path."""
        notifier = Notifier(notify_socket.address)
        try:
            notifier.notify("READY=1", STATUS="Running")
        finally:
            notifier.close()
        assert notify_socket.receive_until(has("READY=1")) == ["READY=1\nSTATUS=Running"]

    def test_sends_to_an_abstract_socket(self) -> None:
        """An address starting with '@' names a socket in the abstract namespace."""
        receiver = NotifySocket(f"@hostkit-test-{uuid.uuid4().hex}")
        notifier = Notifier(receiver.address)
        try:
            notifier.notify("WATCHDOG=1")
            assert receiver.receive_until(has("WATCHDOG=1")) == ["WATCHDOG=1"]
        finally:
            notifier.close()
            receiver.close()

    def test_missing_socket_is_a_clear_error(self, tmp_path) -> None:
        """A NOTIFY_SOCKET that does not exist fails at connect(), naming it and the fix."""
        missing = str(tmp_path / "nope.sock")
        with pytest.raises(SystemdNotifyError) as info:
            Notifier(missing).connect()
        assert f"NOTIFY_SOCKET={missing!r} cannot be used: No such file or directory" in str(info.value)
        assert "Unset NOTIFY_SOCKET" in str(info.value)
        assert isinstance(info.value, OSError)

    def test_relative_address_is_refused(self) -> None:
        """Only absolute paths and '@names' are socket addresses systemd gives."""
        with pytest.raises(ConfigurationError, match="absolute socket path or an abstract name"):
            Notifier("relative.sock")

    def test_from_environment_reads_then_unsets(self, notify_socket) -> None:
        """The variables are read once and removed, so children do not inherit them."""
        env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
        notifier = Notifier.from_environment(env)
        assert notifier is not None
        assert notifier.watchdog_interval == 1.5
        assert env == {}
        assert Notifier.from_environment({}) is None

    def test_watchdog_for_another_pid_is_ignored(self, notify_socket) -> None:
        """WATCHDOG_USEC meant for another process (WATCHDOG_PID) is not ours to ping."""
        env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
        notifier = Notifier.from_environment(env)
        assert notifier is not None and notifier.watchdog_interval is None

    def test_bad_watchdog_usec_is_refused(self, notify_socket) -> None:
        """A malformed WATCHDOG_USEC is an error naming the value."""
        with pytest.raises(ConfigurationError, match=r"WATCHDOG_USEC must be a positive number.*'soon'"):
            Notifier.from_environment({"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "soon"})


class TestHostIntegration:
    def test_not_under_systemd_does_nothing(self) -> None:
        """Without NOTIFY_SOCKET, use_systemd registers nothing."""
        builder = HostBuilder()
        assert use_systemd(builder, environ={}) is None
        assert list(builder.services.hosted) == []

    def test_ready_once_every_service_started_then_stopping(self, notify_socket) -> None:
        """READY=1 arrives only after the slowest start returned; STOPPING=1 when the stop begins."""
        release = threading.Event()

        class SlowStart(HostedService):
            def start(self, token):
                release.wait(10)

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        use_systemd(builder, environ={"NOTIFY_SOCKET": notify_socket.address})
        builder.services.add_hosted_service(SlowStart)
        builder.services.add_hosted_service(Idle)
        host = builder.build()
        starter = threading.Thread(target=host.start)
        starter.start()
        try:
            messages = notify_socket.receive_until(has("STATUS=Starting 3 service(s)"))
            assert not any("READY=1" in m for m in messages)
            release.set()
            messages = notify_socket.receive_until(has("READY=1"))
            ready = next(m for m in messages if "READY=1" in m)
            assert "STATUS=Running: 3 service(s)" in ready
            assert host.lifetime.started.is_set()
        finally:
            release.set()
            starter.join(10)
            host.stop()
        messages = notify_socket.receive_until(has("STOPPING=1"))
        stopping = next(m for m in messages if "STOPPING=1" in m)
        assert "STATUS=Stopping (shutdown budget 5 s)" in stopping
        assert [m for m in messages if "READY=1" in m] == [ready]  # once

    def test_watchdog_pings_only_while_healthy(self, notify_socket, logs) -> None:
        """WATCHDOG=1 every half WATCHDOG_USEC while liveness passes; none once a service faulted."""
        fail = threading.Event()

        class Fragile(BackgroundService):
            def execute(self, stopping):
                while not stopping.wait(0.01):
                    if fail.is_set():
                        raise RuntimeError("disk on fire")

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5, on_background_error="ignore"))
        env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000"}
        service = use_systemd(builder, environ=env)
        assert service is not None
        builder.services.add_hosted_service(Fragile)
        with builder.build():
            notify_socket.receive_until(lambda ms: sum(m == "WATCHDOG=1" for m in ms) >= 3)
            fail.set()
            assert wait_until(lambda: service.pings_withheld >= 1, timeout=15)
            notify_socket.drain()  # pings sent before the fault was seen
            assert wait_until(lambda: service.pings_withheld >= 3, timeout=15)
            assert "WATCHDOG=1" not in notify_socket.drain()
        assert logs.find(
            "withholding systemd watchdog pings: services: Fragile is faulted (RuntimeError: disk on fire)"
        )

    def test_watchdog_follows_registered_health_checks(self, notify_socket) -> None:
        """A liveness check of use_health() that fails stops the pings; when it passes again they resume."""
        healthy = threading.Event()
        healthy.set()
        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        checks = use_health(builder)
        checks.add(
            "db",
            lambda: HealthCheckResult.healthy() if healthy.is_set() else HealthCheckResult.unhealthy("db down"),
            tags=("live",),
        )
        service = use_systemd(builder, environ={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000"})
        assert service is not None
        with builder.build():
            notify_socket.receive_until(has("WATCHDOG=1"))
            healthy.clear()
            assert wait_until(lambda: service.pings_withheld >= 2, timeout=15)
            pings = service.pings
            healthy.set()
            assert wait_until(lambda: service.pings > pings, timeout=15)

    def test_long_stop_extends_the_timeout(self, notify_socket) -> None:
        """During a slow stop EXTEND_TIMEOUT_USEC is sent, repeatedly, within budget + margin."""
        release = threading.Event()

        class SlowStop(BackgroundService):
            def execute(self, stopping):
                stopping.wait()
                release.wait(10)

        builder = HostBuilder(options=HostOptions(shutdown_timeout=8))
        notifier = Notifier(notify_socket.address)
        service = SystemdService(notifier, extend_every=0.05, extend_margin=1.0)
        builder.services.add_hosted_service(service, name="systemd")
        builder.services.add_hosted_service(SlowStop)
        host = builder.build()
        host.start()
        stopper = threading.Thread(target=host.stop)
        stopper.start()
        try:
            messages = notify_socket.receive_until(lambda ms: sum("EXTEND_TIMEOUT_USEC=" in m for m in ms) >= 3)
        finally:
            release.set()
            stopper.join(15)
        values = [int(m.split("=", 1)[1]) for m in messages if m.startswith("EXTEND_TIMEOUT_USEC=")]
        assert all(0 < v <= 9_000_000 for v in values), values
        assert values[0] >= values[-1]

    def test_reload_sends_reloading_with_monotonic_usec_then_ready(self, notify_socket) -> None:
        """A reload is RELOADING=1 (with MONOTONIC_USEC, as Type=notify-reload needs) and READY=1 once it ended."""
        called_at: list[int] = []

        class Reloadable(HostedService):
            def reload(self, token):
                called_at.append(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        use_systemd(builder, environ={"NOTIFY_SOCKET": notify_socket.address})
        builder.services.add_hosted_service(Reloadable)
        with builder.build() as host:
            notify_socket.receive_until(has("READY=1"))
            del notify_socket.messages[:]
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert host.reload().reloaded == ("Reloadable",)
            messages = notify_socket.receive_until(has("READY=1"))
        reloading = next(m for m in messages if "RELOADING=1" in m)
        usec = int(next(line for line in reloading.split("\n") if line.startswith("MONOTONIC_USEC="))[15:])
        # Sent as the reload began: after the call, before any reload() ran.
        assert before <= usec <= called_at[0]
        assert "STATUS=Reloading" in reloading
        assert messages.index(reloading) < next(i for i, m in enumerate(messages) if "READY=1" in m)

    def test_a_stop_during_a_reload_sends_no_ready_after_stopping(self, notify_socket) -> None:
        """A stop that begins during a reload ends it (its token is set); READY=1 never follows STOPPING=1."""
        inside = threading.Event()

        class Waits(HostedService):
            def reload(self, token):
                inside.set()
                token.wait()

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5, reload_timeout=30))
        use_systemd(builder, environ={"NOTIFY_SOCKET": notify_socket.address})
        builder.services.add_hosted_service(Waits)
        host = builder.build()
        host.start()
        reports: list[object] = []
        reloader = threading.Thread(target=lambda: reports.append(host.reload()))
        reloader.start()
        try:
            assert inside.wait(10)
            notify_socket.receive_until(has("RELOADING=1"))
            host.stop()
        finally:
            host.stop()
            reloader.join(10)
        assert reports, "Host.reload() did not return"
        messages = notify_socket.receive_until(has("STOPPING=1"))
        notify_socket.drain()
        stopping = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
        assert not any("READY=1" in m for m in messages[stopping:]), messages

    def test_unreachable_socket_fails_startup_naming_it(self, tmp_path) -> None:
        """Start-up fails with the socket's name when NOTIFY_SOCKET cannot be reached."""
        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        missing = str(tmp_path / "gone.sock")
        use_systemd(builder, environ={"NOTIFY_SOCKET": missing})
        host = builder.build()
        with pytest.raises(HostStartupError) as info:
            host.start()
        assert f"NOTIFY_SOCKET={missing!r} cannot be used" in str(info.value)
        assert info.value.service == "systemd"
