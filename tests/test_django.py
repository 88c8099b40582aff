"""The Django app and command, on the example project: runserver + reload, hostkit_run, gunicorn, settings."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import psutil
import pytest

from hostkit.exceptions import ConfigurationError
from tests.conftest import PROJECT_ROOT, fetch_json, wait_until
from tests.subproc import Program

pytest.importorskip("django")

EXAMPLE = Path(PROJECT_ROOT) / "examples" / "django_project"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Project:
    """A copy of examples/django_project in a temp dir, with its own SQLite database, migrated."""

    def __init__(self, tmp: Path, spawn: Callable[..., Program]) -> None:
        self._spawn = spawn
        self.dir = tmp / "django_project"
        shutil.copytree(EXAMPLE, self.dir, ignore=shutil.ignore_patterns("*.sqlite3", "__pycache__"))
        self.env = dict(
            os.environ,
            HOSTKIT_EXAMPLE_DB=str(tmp / "db.sqlite3"),
            PYTHONPATH=os.pathsep.join([str(self.dir), PROJECT_ROOT]),
            PYTHONUNBUFFERED="1",
        )
        out = self.manage("migrate", "--noinput")
        assert out.returncode == 0, out.stdout

    def manage(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=self.dir,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def spawn(self, *cmd: str, **env: str) -> Program:
        """A program in the project directory, in its own session; the spawn fixture ends it."""
        return self._spawn(list(cmd), cwd=self.dir, env={**self.env, **env})


@pytest.fixture
def project(tmp_path: Path, spawn: Callable[..., Program]) -> Project:
    return Project(tmp_path, spawn)


@pytest.mark.timeout(120)
class TestRunserver:
    def test_autoreload_runs_one_host_in_the_serving_child_and_none_after_reload(self, project: Project) -> None:
        """`runserver` with autoreload: only the serving child runs the host, its service writes through a DB
        scope; after a code change the old child is gone and the new one runs exactly one copy."""
        port = free_port()
        proc = project.spawn(sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}")
        parent = psutil.Process(proc.pid)
        base = f"http://127.0.0.1:{port}"

        def view() -> dict | None:
            """The serving process's threads, once no reload is under way."""
            seen = fetch_json(f"{base}/threads")
            if seen is None or [c.pid for c in parent.children()] != [seen["pid"]]:
                return None
            return seen

        assert wait_until(view, timeout=60, interval=0.1)
        first = view()
        assert first is not None and first["pid"] != proc.pid
        assert first["threads"].count("hostkit-TickRecorder") == 1
        assert parent.num_threads() == 1  # the autoreloader parent runs no host
        # The service's units of work reach the database (one scope each), from the serving process.
        assert wait_until(lambda: (t := fetch_json(f"{base}/ticks")) and t["ticks"] >= 2, timeout=30)
        assert first["pid"] in fetch_json(f"{base}/ticks")["pids"]  # type: ignore[index]
        old_family = {p.pid for p in parent.children(recursive=True)}

        views = project.dir / "jobs" / "views.py"
        before = views.stat()
        views.write_text(views.read_text() + "\n# changed\n")
        # The stat reloader reloads on a newer mtime; on a coarse clock the write may keep the old one.
        os.utime(views, ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))
        assert wait_until(lambda: (v := view()) and v["pid"] != first["pid"], timeout=60)
        second = view()
        assert second is not None and second["threads"].count("hostkit-TickRecorder") == 1
        assert wait_until(lambda: not any(psutil.pid_exists(pid) for pid in old_family), timeout=30)
        assert parent.num_threads() == 1

    def test_start_ready_starts_without_a_request_but_not_in_other_commands(self, project: Project) -> None:
        """START='ready' starts the host in `runserver --noreload` at once, and never in `manage.py check`."""
        out = project.manage("check", HOSTKIT_EXAMPLE_START="ready")
        assert out.returncode == 0, out.stderr
        assert "TickRecorder running" not in out.stdout + out.stderr
        port = free_port()
        proc = project.spawn(
            sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}", HOSTKIT_EXAMPLE_START="ready"
        )
        proc.wait_for_output("TickRecorder running", timeout=60)
        assert f"TickRecorder running in pid {proc.pid}" in proc.output

    def test_embedded_host_logs_through_django_logging(self, project: Project) -> None:
        """The serving process's host logs its start to stderr (Django's LOGGING has no root handler);
        with HOSTKIT['EMBEDDED_LOGGING'] False it does not."""
        port = free_port()
        proc = project.spawn(
            sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}", HOSTKIT_EXAMPLE_START="ready"
        )
        proc.wait_for_output("django: host started", timeout=60)
        text = proc.output
        assert f"| INFO     | hostkit | host | {proc.pid} | Host starting 1 service(s)" in text, text
        assert f"| INFO     | hostkit | host | {proc.pid} | django: host started in process {proc.pid}" in text, text

        settings = project.dir / "project" / "settings.py"
        settings.write_text(settings.read_text() + '\nHOSTKIT["EMBEDDED_LOGGING"] = False\n')
        start = "from hostkit.django.apps import embedded_host; print('state=' + embedded_host().start().state.value)"
        out = project.manage("shell", "-c", start)
        assert out.returncode == 0, out.stderr
        assert "state=running" in out.stdout  # the host ran (and stopped at exit), silently
        assert "hostkit" not in out.stderr


@pytest.mark.timeout(120)
class TestWorkerCommand:
    def test_hostkit_run_is_a_standalone_worker(self, project: Project) -> None:
        """`manage.py hostkit_run` runs the same host; SIGTERM stops it gracefully with exit code 0."""
        proc = project.spawn(sys.executable, "manage.py", "hostkit_run")
        proc.wait_for_output("Host started", "TickRecorder running", timeout=60)
        assert f"TickRecorder running in pid {proc.pid}" in proc.output, proc.output
        mark = proc.mark()
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.output
        rest = proc.output_since(mark)
        assert "Received SIGTERM" in rest and "stopping the host" in rest
        assert "Background service 'TickRecorder' stopped" in rest
        assert "Host stopped in" in rest and "(exit code 0)" in rest
        assert "Traceback" not in rest

    def test_hostkit_run_honours_the_shutdown_timeout_setting(self, project: Project) -> None:
        """settings.HOSTKIT['SHUTDOWN_TIMEOUT'] is the worker's stop budget too (the builder says 10 s)."""
        settings = project.dir / "project" / "settings.py"
        settings.write_text(settings.read_text() + '\nHOSTKIT["SHUTDOWN_TIMEOUT"] = 2.5\n')
        proc = project.spawn(sys.executable, "manage.py", "hostkit_run")
        proc.wait_for_output("TickRecorder running", timeout=60)
        mark = proc.mark()
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.output
        rest = proc.output_since(mark)
        assert "Received SIGTERM; stopping the host (budget 2.5 s)" in rest
        assert "budget 10.0 s" not in rest

    def test_hostkit_run_refuses_a_bad_shutdown_timeout(self, project: Project) -> None:
        """A negative setting, or a negative --shutdown-timeout, is refused before any host runs, naming it."""
        out = project.manage("hostkit_run", "--shutdown-timeout", "-1")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "CommandError: --shutdown-timeout must be >= 0 seconds, not: -1.0 (float)" in out.stderr
        assert "TickRecorder running" not in out.stdout
        settings = project.dir / "project" / "settings.py"
        settings.write_text(settings.read_text() + '\nHOSTKIT["SHUTDOWN_TIMEOUT"] = -3\n')
        out = project.manage("hostkit_run")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "settings.HOSTKIT['SHUTDOWN_TIMEOUT'] must be >= 0 seconds, not: -3 (int)" in out.stderr
        assert "TickRecorder running" not in out.stdout

    def test_gunicorn_workers_each_run_the_host(self, project: Project) -> None:
        """Under gunicorn with the example's conf, each of 2 workers runs its host and writes ticks."""
        pytest.importorskip("gunicorn")
        sock = project.dir / "g.sock"
        proc = project.spawn(
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(Path(PROJECT_ROOT) / "examples" / "gunicorn.conf.py"),
            "--bind",
            f"unix:{sock}",
            "--workers",
            "2",
            "project.wsgi:application",
        )

        def worker_pids() -> set[int]:
            with closing(sqlite3.connect(project.env["HOSTKIT_EXAMPLE_DB"])) as db:
                return {row[0] for row in db.execute("SELECT DISTINCT pid FROM jobs_tick")}

        master = psutil.Process(proc.pid)
        assert wait_until(lambda: len(master.children()) == 2, timeout=60)
        workers = {c.pid for c in master.children()}
        assert wait_until(lambda: worker_pids() == workers, timeout=60, interval=0.5)
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, proc.output
        out = proc.output
        assert out.count("Worker exiting") == 2
        assert "Traceback" not in out


class TestSettings:
    @pytest.fixture(autouse=True)
    def _configured(self) -> None:
        from django.conf import settings

        if not settings.configured:
            settings.configure()

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            (None, r"settings.HOSTKIT is missing: set HOSTKIT = \{'BUILDER'"),
            ([], r"settings.HOSTKIT must be a dict, not: \[\] \(list\)"),
            ({"BUILDER": "a:b", "STRAT": "x"}, r"unknown key\(s\) \['STRAT'\]"),
            ({}, r"settings.HOSTKIT\['BUILDER'\] is missing"),
            (
                {"BUILDER": "a:b", "START": "now"},
                r"\['START'\] must be one of 'request', 'ready', 'manual', not: 'now'",
            ),
            (
                {"BUILDER": "a:b", "EMBEDDED_LOGGING": "no"},
                r"settings.HOSTKIT\['EMBEDDED_LOGGING'\] must be True or False, not: 'no' \(str\)",
            ),
            (
                {"BUILDER": "a:b", "SHUTDOWN_TIMEOUT": "10"},
                r"settings.HOSTKIT\['SHUTDOWN_TIMEOUT'\] must be a number of seconds or a timedelta, not: '10' \(str\)",
            ),
            (
                {"BUILDER": "a:b", "SHUTDOWN_TIMEOUT": float("nan")},
                r"settings.HOSTKIT\['SHUTDOWN_TIMEOUT'\] must be >= 0 seconds, not: nan \(float\)",
            ),
        ],
    )
    def test_bad_settings_are_refused_with_the_fix(self, value: object, message: str) -> None:
        """Each wrong settings.HOSTKIT is refused at ready() with a message naming it and the fix."""
        from django.test import override_settings

        from hostkit.django.apps import host_settings

        with override_settings(HOSTKIT=value), pytest.raises(ConfigurationError, match=message):
            host_settings()

    def test_defaults(self) -> None:
        """Only BUILDER is required; START defaults to 'request'."""
        from django.test import override_settings

        from hostkit.django.apps import host_settings

        with override_settings(HOSTKIT={"BUILDER": "a:b", "CONTENTION": True}):
            conf = host_settings()
        assert conf["START"] == "request" and conf["ENABLED"] is True and conf["CONTENTION"] == {}


class TestLatencyMiddleware:
    @pytest.fixture(autouse=True)
    def _configured(self) -> None:
        from django.conf import settings

        if not settings.configured:
            settings.configure()

    def test_records_each_request_including_failures(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With LATENCY on, the middleware records every request, also one whose view raises."""
        from hostkit import HostBuilder, _embed
        from hostkit.contention import LatencyRecorder
        from hostkit.django.apps import HostkitConfig
        from hostkit.django.middleware import RequestLatencyMiddleware

        recorder = LatencyRecorder()
        monkeypatch.setattr(HostkitConfig, "embedded", _embed.EmbeddedHost(HostBuilder, latency=recorder))
        middleware = RequestLatencyMiddleware(lambda request: f"response to {request}")
        assert middleware("r1") == "response to r1"

        def failing(request: object) -> object:
            raise ValueError("view failed")

        with pytest.raises(ValueError, match="view failed"):
            RequestLatencyMiddleware(failing)("r2")
        assert recorder.summary()["count"] == 2

    def test_refused_without_latency_setting(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The middleware without HOSTKIT['LATENCY'] fails at start-up, saying which setting to change."""
        from hostkit import HostBuilder, _embed
        from hostkit.django.apps import HostkitConfig
        from hostkit.django.middleware import RequestLatencyMiddleware

        monkeypatch.setattr(HostkitConfig, "embedded", _embed.EmbeddedHost(HostBuilder))
        with pytest.raises(ConfigurationError, match=r"settings.HOSTKIT\['LATENCY'\] is not True"):
            RequestLatencyMiddleware(lambda request: None)
