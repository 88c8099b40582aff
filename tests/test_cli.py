"""The ``hostkit`` command line: ``run`` (loading, options, exit codes, bad input), ``probe``, ``new``.

``run`` is exercised as a real process (``python -m hostkit`` and the console
script) against small modules written into a temporary directory, which is the
process's current directory, as a user's would be.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hostkit.cli import main
from hostkit.health import HealthCheckResult, HealthChecks, ProbeListener

APPS = '''
from loguru import logger

from hostkit import ApplicationLifetime, BackgroundService, HostBuilder, HostedService, HostOptions


class StopSoon(BackgroundService):
    """Runs once, then asks the host to stop: the host exits 0."""

    def __init__(self, lifetime: ApplicationLifetime) -> None:
        self.lifetime = lifetime

    def execute(self, stopping):
        logger.info("stop-soon ran")
        self.lifetime.stop_application()


class Crash(BackgroundService):
    def execute(self, stopping):
        raise RuntimeError("worker exploded")


class BadStart(HostedService):
    def start(self, token):
        raise OSError("database unreachable")


def _builder(*services):
    builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
    for service in services:
        builder.services.add_hosted_service(service)
    return builder


builder = _builder(StopSoon)
host = _builder(StopSoon).build()


def create_builder():
    return _builder(StopSoon)


def create_host():
    return _builder(StopSoon).build()


def crashing():
    return _builder(Crash)


def bad_start():
    return _builder(BadStart)


def create_bad():
    return 42


def create_raises():
    raise KeyError("missing setting")


not_a_host = 42
'''


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "apps.py").write_text(textwrap.dedent(APPS))
    (tmp_path / "broken.py").write_text("import no_such_dependency_xyz\n")
    return tmp_path


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def hostkit(
    *args: str, cwd: Path, env: dict[str, str] | None = None, script: bool = False
) -> subprocess.CompletedProcess[str]:
    command = [shutil.which("hostkit") or "hostkit"] if script else [sys.executable, "-m", "hostkit"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


class TestRunTargets:
    @pytest.mark.parametrize("target", ["apps:builder", "apps:host", "apps:create_builder", "apps:create_host"])
    def test_every_kind_of_target_runs(self, app_dir: Path, target: str) -> None:
        """A HostBuilder, a Host, and callables returning either run, and exit 0 when stopped on request."""
        result = hostkit("run", target, cwd=app_dir)
        assert result.returncode == 0, result.stderr
        assert "stop-soon ran" in result.stderr
        assert "Host stopped in" in result.stderr and "(exit code 0)" in result.stderr

    def test_console_script_loads_from_the_current_directory(self, app_dir: Path) -> None:
        """The installed `hostkit` script imports modules from the current directory, like python -m."""
        if shutil.which("hostkit") is None:
            pytest.skip("the hostkit console script is not installed")
        result = hostkit("run", "apps:create_builder", cwd=app_dir, script=True)
        assert result.returncode == 0, result.stderr
        assert "stop-soon ran" in result.stderr

    def test_shutdown_timeout_option(self, app_dir: Path) -> None:
        """--shutdown-timeout sets the stop budget of a builder and of an already built host."""
        for target in ("apps:create_builder", "apps:host"):
            result = hostkit("run", target, "--shutdown-timeout", "7", cwd=app_dir)
            assert result.returncode == 0, result.stderr
            assert "budget 7.0 s" in result.stderr

    def test_failed_service_exits_1(self, app_dir: Path) -> None:
        """A background service failing under stop_host makes the process exit 1."""
        result = hostkit("run", "apps:crashing", cwd=app_dir)
        assert result.returncode == 1, result.stderr
        assert "RuntimeError: worker exploded" in result.stderr

    def test_failed_start_exits_3(self, app_dir: Path) -> None:
        """A start that raises makes the process exit 3, naming the service."""
        result = hostkit("run", "apps:bad_start", cwd=app_dir)
        assert result.returncode == 3, result.stderr
        assert "Hosted service 'BadStart' failed to start: OSError: database unreachable" in result.stderr


class TestRunOptions:
    def test_json_logs(self, app_dir: Path) -> None:
        """--json-logs writes one JSON object per line, with the service tag."""
        result = hostkit("run", "apps:create_builder", "--json-logs", cwd=app_dir)
        assert result.returncode == 0, result.stderr
        records = [json.loads(line) for line in result.stderr.splitlines()]
        messages = [r["record"]["message"] for r in records]
        assert "stop-soon ran" in messages
        assert any(r["record"]["extra"].get("service") == "host" for r in records)

    def test_log_level(self, app_dir: Path) -> None:
        """--log-level WARNING hides INFO lines."""
        result = hostkit("run", "apps:create_builder", "--log-level", "warning", cwd=app_dir)
        assert result.returncode == 0, result.stderr
        assert "Host started" not in result.stderr

    def test_journald_priority_prefix(self, app_dir: Path, tmp_path: Path) -> None:
        """When JOURNAL_STREAM names stderr, every line starts with a syslog <N> priority."""
        log = tmp_path / "journal.txt"
        with log.open("w") as stderr:
            st = os.fstat(stderr.fileno())
            env = clean_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
            code = subprocess.run(
                [sys.executable, "-m", "hostkit", "run", "apps:crashing"],
                cwd=app_dir,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                timeout=60,
            ).returncode
        text = log.read_text()
        assert code == 1, text
        lines = [line for line in text.splitlines() if line.startswith("<")]
        assert any(line.startswith("<6>INFO") and "Host starting" in line for line in lines), text
        assert any(line.startswith("<3>ERROR") and "Stopping the host because" in line for line in lines), text
        assert any(line.startswith("<2>CRITICAL") and "worker exploded" in line for line in lines), text
        assert not any(line[:4].isdigit() for line in text.splitlines())  # no timestamp: journald adds its own

    def test_help_teaches(self, app_dir: Path) -> None:
        """`hostkit run --help` explains targets, systemd, probes and exit codes."""
        result = hostkit("run", "--help", cwd=app_dir)
        assert result.returncode == 0
        for fragment in ("MODULE:ATTR", "a callable returning one", "NOTIFY_SOCKET", "--probe-port", "exit codes:"):
            assert fragment in result.stdout

    def test_no_command_prints_help_and_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`hostkit` alone lists the subcommands."""
        assert main([]) == 2
        out = capsys.readouterr().out
        assert "run" in out and "probe" in out and "new" in out


class TestRunBadInput:
    def test_unknown_module(self, app_dir: Path) -> None:
        """A module that does not exist: one line naming it and where it was looked for; exit 2."""
        result = hostkit("run", "nosuch:host", cwd=app_dir)
        assert result.returncode == 2
        assert one_error_line(result) == (
            f"hostkit run: error: no module named 'nosuch' (looked in the current directory {app_dir} and on sys.path)"
        )

    def test_module_whose_import_fails(self, app_dir: Path) -> None:
        """A module that exists but fails to import says so, with the inner error."""
        result = hostkit("run", "broken:host", cwd=app_dir)
        assert result.returncode == 2
        assert one_error_line(result) == (
            "hostkit run: error: importing 'broken' failed: "
            "ModuleNotFoundError: No module named 'no_such_dependency_xyz'"
        )

    def test_unknown_attribute(self, app_dir: Path) -> None:
        """A missing attribute: one line listing what the module has."""
        result = hostkit("run", "apps:nope", cwd=app_dir)
        assert result.returncode == 2
        line = one_error_line(result)
        assert line.startswith("hostkit run: error: module 'apps' has no attribute 'nope'; it has: ")
        assert "create_builder" in line

    def test_misspelt_attribute_gets_a_did_you_mean(self, app_dir: Path) -> None:
        """A typo of a name the module has: the one line suggests it (and still lists the rest)."""
        result = hostkit("run", "apps:create_buildr", cwd=app_dir)
        assert result.returncode == 2
        line = one_error_line(result)
        assert line.startswith(
            "hostkit run: error: module 'apps' has no attribute 'create_buildr'; did you mean 'create_builder'? "
            "It has: "
        )
        assert "create_host" in line

    def test_misspelt_nested_attribute_names_its_owner(self, app_dir: Path) -> None:
        """In MODULE:A.B, a typo of B is looked up among A's attributes and named with A."""
        result = hostkit("run", "apps:StopSoon.exceute", cwd=app_dir)
        assert result.returncode == 2
        line = one_error_line(result)
        assert line.startswith(
            "hostkit run: error: 'apps:StopSoon' has no attribute 'exceute'; did you mean 'execute'?"
        )

    def test_attribute_not_a_host(self, app_dir: Path) -> None:
        """An attribute that is not a host says what it is and what it must be."""
        result = hostkit("run", "apps:not_a_host", cwd=app_dir)
        assert result.returncode == 2
        assert one_error_line(result) == (
            "hostkit run: error: apps:not_a_host is 42 (int), not a hostkit.Host, a hostkit.HostBuilder, "
            "or a callable returning one"
        )

    def test_callable_returning_something_else(self, app_dir: Path) -> None:
        """A callable that returns something else is named with what it returned."""
        result = hostkit("run", "apps:create_bad", cwd=app_dir)
        assert result.returncode == 2
        assert one_error_line(result) == (
            "hostkit run: error: apps:create_bad() returned 42 (int); "
            "it must return a hostkit.Host or a hostkit.HostBuilder"
        )

    def test_malformed_target(self, app_dir: Path) -> None:
        """A target without ':' shows the expected form; a file path gets the module name to use."""
        result = hostkit("run", "apps", cwd=app_dir)
        assert result.returncode == 2
        assert "expected MODULE:ATTR (like 'myworker.app:create_builder'), not: 'apps'" in one_error_line(result)
        result = hostkit("run", "apps.py:host", cwd=app_dir)
        assert "use apps:host from the directory that holds it" in one_error_line(result)

    def test_debug_shows_the_traceback(self, app_dir: Path) -> None:
        """--debug adds the traceback (with the original error) before the one-line error."""
        result = hostkit("run", "apps:create_raises", "--debug", cwd=app_dir)
        assert result.returncode == 2
        assert "Traceback (most recent call last)" in result.stderr
        assert "KeyError: 'missing setting'" in result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            "hostkit run: error: calling apps:create_raises() failed: KeyError: 'missing setting'"
        )
        result = hostkit("--debug", "run", "nosuch:host", cwd=app_dir)
        assert "Traceback" in result.stderr

    def test_probe_port_in_use(self, app_dir: Path) -> None:
        """A probe port in use: one line naming it, exit 2, and no service was started."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = hostkit("run", "apps:create_builder", "--probe-port", str(port), cwd=app_dir)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1] == (
            f"hostkit run: error: probe port 127.0.0.1:{port} is already in use (another process listens there); "
            f"choose another port, or 0 for any free port (--probe-port)"
        )
        assert "stop-soon ran" not in result.stderr and "Traceback" not in result.stderr

    def test_unreadable_notify_socket(self, app_dir: Path, tmp_path: Path) -> None:
        """A NOTIFY_SOCKET that cannot be reached: one line naming it, exit 2."""
        missing = str(tmp_path / "gone.sock")
        result = hostkit("run", "apps:create_builder", cwd=app_dir, env=clean_env(NOTIFY_SOCKET=missing))
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1] == (
            f"hostkit run: error: NOTIFY_SOCKET={missing!r} cannot be used: No such file or directory. "
            f"Unset NOTIFY_SOCKET when not running under systemd (or pass --no-systemd)"
        )
        assert "stop-soon ran" not in result.stderr
        result = hostkit(
            "run", "apps:create_builder", "--no-systemd", cwd=app_dir, env=clean_env(NOTIFY_SOCKET=missing)
        )
        assert result.returncode == 0, result.stderr

    def test_notify_socket_that_is_not_a_socket(self, app_dir: Path, tmp_path: Path) -> None:
        """A NOTIFY_SOCKET naming a plain file, or a relative path, is one line naming it, exit 2."""
        plain = tmp_path / "plain.txt"
        plain.write_text("not a socket")
        result = hostkit("run", "apps:create_builder", cwd=app_dir, env=clean_env(NOTIFY_SOCKET=str(plain)))
        assert result.returncode == 2
        assert f"hostkit run: error: NOTIFY_SOCKET={str(plain)!r} cannot be used: Connection refused" in result.stderr
        result = hostkit("run", "apps:create_builder", cwd=app_dir, env=clean_env(NOTIFY_SOCKET="run/notify"))
        assert result.returncode == 2
        assert one_error_line(result) == (
            "hostkit run: error: NOTIFY_SOCKET must be an absolute socket path or an abstract name "
            "starting with '@', not: 'run/notify'"
        )

    def test_negative_shutdown_timeout(self, app_dir: Path) -> None:
        """A negative --shutdown-timeout is refused before anything runs."""
        result = hostkit("run", "apps:create_builder", "--shutdown-timeout", "-1", cwd=app_dir)
        assert result.returncode == 2
        assert (
            one_error_line(result) == "hostkit run: error: --shutdown-timeout must be >= 0 seconds, not: -1.0 (float)"
        )

    @pytest.mark.parametrize("value", ["inf", "nan", "1e12"])
    def test_infinite_or_absurd_shutdown_timeout(self, app_dir: Path, value: str) -> None:
        """inf, NaN or a budget past a year is refused before anything runs (inf used to break the stop)."""
        result = hostkit("run", "apps:create_builder", "--shutdown-timeout", value, cwd=app_dir)
        assert result.returncode == 2
        shown = repr(float(value))
        expected = (
            f"--shutdown-timeout must be >= 0 seconds, not: {shown} (float)"
            if value == "nan"
            else f"--shutdown-timeout must be a finite number of seconds, at most 31536000 (365 days), "
            f"not: {shown} (float)"
        )
        assert one_error_line(result) == f"hostkit run: error: {expected}"


class TestProbeCommand:
    def test_exit_codes_follow_health(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`hostkit probe` exits 0 on 200, 1 on 503 (saying which check failed) and when nothing listens."""
        ready = {"ok": True}
        checks = HealthChecks()
        checks.add(
            "db",
            lambda: HealthCheckResult.healthy() if ready["ok"] else HealthCheckResult.unhealthy("db down"),
            tags=("ready",),
        )
        with ProbeListener(checks, port=0) as listener:
            url = f"http://127.0.0.1:{listener.port}/health/ready"
            assert main(["probe", url]) == 0
            assert capsys.readouterr().out.strip() == "healthy: 200 healthy"
            ready["ok"] = False
            assert main(["probe", url]) == 1
            assert capsys.readouterr().err.strip() == "unhealthy: 503 unhealthy (db: db down)"
            port = listener.port
        assert main(["probe", f"http://127.0.0.1:{port}/health/live", "--timeout", "5"]) == 1
        assert "unhealthy: http://127.0.0.1:" in capsys.readouterr().err

    def test_tcp_probe(self, capsys: pytest.CaptureFixture[str]) -> None:
        """tcp://HOST:PORT is healthy when the port accepts."""
        with ProbeListener(HealthChecks(), port=0, mode="tcp", tcp_interval=0.05) as listener:
            assert main(["probe", f"tcp://127.0.0.1:{listener.port}"]) == 0
            assert "healthy: 127.0.0.1:" in capsys.readouterr().out

    def test_bad_url(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A URL that is not http:// or tcp:// with a port is a usage error (exit 2)."""
        assert main(["probe", "ftp://x"]) == 2
        assert capsys.readouterr().err.strip() == (
            "hostkit probe: error: URL must be http://HOST:PORT/PATH or tcp://HOST:PORT, not: 'ftp://x'"
        )


class TestNewCommand:
    def test_generates_a_project(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`hostkit new worker NAME` writes the project with the names filled in."""
        target = tmp_path / "billing-sync"
        assert main(["new", "worker", "billing-sync", "--directory", str(target)]) == 0
        files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
        assert files == [
            ".dockerignore",
            "Dockerfile",
            "README.md",
            "billing_sync/__init__.py",
            "billing_sync/app.py",
            "billing_sync/worker.py",
            "deploy/billing-sync.service",
            "deploy/grafana-dashboard.json",
            "deploy/hpa.yaml",
            "deploy/keda-scaledobject.yaml",
            "deploy/kubernetes.yaml",
            "deploy/prometheus-alerts.test.yaml",
            "deploy/prometheus-alerts.yaml",
            "pyproject.toml",
            "setup.cfg",
            "tests/test_worker.py",
            "wheels/README.md",
        ]
        assert "class BillingSyncWorker(BackgroundService)" in (target / "billing_sync/worker.py").read_text()
        unit = (target / "deploy/billing-sync.service").read_text()
        assert "Type=notify" in unit and "WatchdogSec=" in unit
        assert "hostkit run billing_sync.app:create_builder --probe-port 8081" in unit
        # No placeholder of the template left (Prometheus and Grafana templates keep theirs:
        # {{ $labels.service }} in alert annotations, {{queue}} in dashboard legends).
        text = "".join(p.read_text() for p in target.rglob("*") if p.is_file())
        assert not re.findall(r"\{\{(?:project|package|class_name|probe_port|hostkit_version)\}\}", text)
        assert "hostkit run billing_sync.app:create_builder" in capsys.readouterr().out

    def test_refuses_bad_names_and_non_empty_directories(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A name that is not a valid project name, or a non-empty target, is a usage error."""
        assert main(["new", "worker", "9lives", "--directory", str(tmp_path / "x")]) == 2
        assert "NAME must start with a letter" in capsys.readouterr().err
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "keep.txt").write_text("mine")
        assert main(["new", "worker", "full", "--directory", str(tmp_path / "full")]) == 2
        assert "is not empty; choose another --directory or pass --force" in capsys.readouterr().err
        assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
