"""HostAware: a registered service that wants its host gets it when the host is built."""

from __future__ import annotations

import ast
import pathlib
import threading

import pytest

import hostkit
from hostkit import BackgroundService, Host, HostBuilder, HostedService
from hostkit.health import HealthService, use_health
from hostkit.systemd import SystemdService


class Reporter(BackgroundService):
    """A user's service that keeps the host and reads its status while it runs."""

    def __init__(self) -> None:
        self.host: Host | None = None
        self.attached = 0
        self.seen_running = threading.Event()

    def attach_host(self, host: Host) -> None:
        self.host = host
        self.attached += 1

    def execute(self, stopping: hostkit.CancellationToken) -> None:
        assert self.host is not None
        if any(s.name == "reporter" for s in self.host.status().services):
            self.seen_running.set()
        stopping.wait()


class TestHostAware:
    def test_a_users_service_is_handed_its_host_once_at_build(self) -> None:
        """The public protocol: a registered service with attach_host() gets the host it was built
        into, once, before it starts, and can read the host's status from its own thread."""
        reporter = Reporter()
        assert isinstance(reporter, hostkit.HostAware)
        builder = HostBuilder()
        builder.services.add_hosted_service(reporter, name="reporter")
        host = builder.build()
        assert reporter.host is host
        assert reporter.attached == 1
        with host:
            assert reporter.seen_running.wait(10)
        assert reporter.attached == 1

    def test_an_error_in_attach_host_fails_the_build(self) -> None:
        """attach_host runs at build: its error surfaces there, before anything starts."""

        class Broken(HostedService):
            def attach_host(self, host: Host) -> None:
                raise RuntimeError("cannot watch this host")

        builder = HostBuilder()
        builder.services.add_hosted_service(Broken())
        with pytest.raises(RuntimeError, match="cannot watch this host"):
            builder.build()

    def test_the_integrations_are_host_aware(self) -> None:
        """health and systemd take their host through the public protocol, not a private hook."""
        assert isinstance(SystemdService(), hostkit.HostAware)
        builder = HostBuilder()
        checks = use_health(builder)
        host = builder.build()
        assert checks.host is host
        service = next(r.service for r in host.service_records() if r.name == "health")
        assert isinstance(service, HealthService)
        assert isinstance(service, hostkit.HostAware)
        assert "HostAware" in hostkit.__all__
        assert "HostAware" in dir(hostkit)


def _private_reads(path: pathlib.Path) -> list[str]:
    """``obj._name`` on anything but self/cls, and ``getattr(obj, "_name")``, in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr")
            and len(node.args) >= 2
            and not (isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls"))
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and node.args[1].value.startswith("_")
        ):
            found.append(f"{path.name}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_health_reads_no_private_attributes_of_other_objects() -> None:
    """The health package (and systemd) use the host's public readers (status(),
    service_records()) and HostAware: no private attribute of another object is touched."""
    root = pathlib.Path(hostkit.__file__).parent
    health = root / "health"
    modules = sorted(health.glob("*.py")) if health.is_dir() else [root / "health.py"]
    found = [hit for path in [*modules, root / "systemd.py"] for hit in _private_reads(path)]
    assert found == []
