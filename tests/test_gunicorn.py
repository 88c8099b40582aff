"""A real gunicorn with 3 workers: once per worker, once per deployment, takeover, clean exit."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import PROJECT_ROOT, wait_until
from tests.subproc import Program, python

pytest.importorskip("gunicorn")
pytest.importorskip("flask")

CONF = os.path.join(PROJECT_ROOT, "examples", "gunicorn.conf.py")

APP = textwrap.dedent(
    """
    import os, sys, time
    from flask import Flask
    import hostkit
    from hostkit import BackgroundService, HostBuilder, OncePerDeployment
    from hostkit.flask import Hostkit

    EVENTS = os.environ["EVENTS_FILE"]
    LOGS = os.environ.get("LOGS", "configured")
    if LOGS == "configured":
        hostkit.configure_logging("INFO", stdlib=False)

    def note(text):
        # O_APPEND writes of one short line are atomic across processes.
        fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{text}\\n".encode())
        finally:
            os.close(fd)

    class PerWorker(BackgroundService):
        def execute(self, stopping):
            note(f"per-worker {os.getpid()}")
            stopping.wait()
            note(f"per-worker-stopped {os.getpid()}")

    class Deployment(BackgroundService):
        def execute(self, stopping):
            note(f"deployment {os.getpid()}")
            stopping.wait()

    class Failing(BackgroundService):
        def execute(self, stopping):
            raise RuntimeError("boom in a background service")

    class Stuck(BackgroundService):
        def execute(self, stopping):
            note(f"stuck {os.getpid()}")
            time.sleep(60)  # ignores its token on purpose

    def make_builder():
        b = HostBuilder()
        b.options.shutdown_timeout = float(os.environ.get("BUDGET", "5"))
        b.add_hosted_service(PerWorker())
        if os.environ.get("FAIL"):
            b.add_hosted_service(Failing())
        if os.environ.get("STUCK"):
            b.add_hosted_service(Stuck())
        b.add_hosted_service(
            OncePerDeployment(Deployment(), lock_path=os.environ["LOCK_FILE"], poll_interval=0.2),
            name="Deployment",
        )
        return b

    app = Flask(__name__)
    app.config["HOSTKIT_EMBEDDED_LOGGING"] = LOGS != "off"
    Hostkit(app, builder=make_builder)
    note(f"imported {os.getpid()}")
    """
)


# Records when each full garbage collection of the worker ended, when its host was built, and
# when it served its first request.
GC_APP = textwrap.dedent(
    """
    import gc, json, time
    from flask import Flask
    from hostkit import BackgroundService, HostBuilder
    from hostkit.flask import Hostkit

    MARKS = {"full": []}

    def on_gc(phase, info):
        if phase == "stop" and info["generation"] == 2:
            MARKS["full"].append(time.monotonic())

    gc.callbacks.append(on_gc)

    class Idle(BackgroundService):
        def execute(self, stopping):
            stopping.wait()

    def make_builder():
        MARKS["built"] = time.monotonic()
        return HostBuilder().add_hosted_service(Idle(), placement="process")

    app = Flask(__name__)
    Hostkit(app, builder=make_builder)

    @app.get("/")
    def index():
        MARKS.setdefault("first_request", time.monotonic())
        return json.dumps(MARKS)
    """
)


def get_over_unix(path: Path, url: str) -> object:
    """GET ``url`` from an HTTP server on the unix socket ``path``; the JSON it answers."""
    conn = http.client.HTTPConnection("localhost", timeout=10)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # closed by conn.close()
    try:
        conn.sock.settimeout(10)
        conn.sock.connect(str(path))
        conn.request("GET", url)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


class Gunicorn:
    """A gunicorn master in its own session (a tests.subproc.Program), stopped by pid."""

    def __init__(
        self, spawn: Callable[..., Program], tmp: Path, *extra: str, workers: int = 3, app: str = APP, **env: str
    ) -> None:
        self.socket = tmp / "g.sock"
        (tmp / "gapp.py").write_text(app)
        self.events = tmp / "events.txt"
        self.events.touch()
        argv = python("-m", "gunicorn", "-c", CONF, "--workers", str(workers), "--bind", f"unix:{tmp / 'g.sock'}")
        argv += ["--graceful-timeout", "20", *extra, "gapp:app"]
        self.program = spawn(
            argv,
            cwd=str(tmp),
            stdout=False,
            stderr="separate",
            EVENTS_FILE=str(self.events),
            LOCK_FILE=str(tmp / "deploy.lock"),
            PYTHONPATH=os.pathsep.join([str(tmp), PROJECT_ROOT]),
            **env,
        )
        self.proc = self.program.proc
        self.master = psutil.Process(self.program.pid)

    def lines(self, prefix: str) -> list[int]:
        out = []
        for line in self.events.read_text().splitlines():
            kind, _, pid = line.partition(" ")
            if kind == prefix:
                out.append(int(pid))
        return out

    def workers(self) -> list[int]:
        try:
            return [p.pid for p in self.master.children() if p.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            return []

    def stderr(self) -> str:
        return self.program.err

    def stop(self) -> int:
        if self.program.running():
            self.program.signal(signal.SIGTERM)
        return self.program.wait(40)


@pytest.fixture
def make_gunicorn(tmp_path: Path, spawn: Callable[..., Program]) -> Callable[..., Gunicorn]:
    """``make_gunicorn(*extra, workers=3, **env)``; the spawn fixture kills what is left at teardown."""

    def make(*extra: str, workers: int = 3, app: str = APP, **env: str) -> Gunicorn:
        return Gunicorn(spawn, tmp_path, *extra, workers=workers, app=app, **env)

    return make


@pytest.mark.timeout(120)
class TestGunicornWorkers:
    def test_once_per_worker_and_once_per_deployment_with_takeover(self, make_gunicorn) -> None:
        """With 3 workers a per-worker service runs 3 times, a per-deployment one once; after kill -9 of
        its holder it runs again in another worker within a few seconds; SIGTERM stops all cleanly."""
        g = make_gunicorn()
        assert wait_until(lambda: len(g.lines("per-worker")) == 3, timeout=60), g.stderr()
        assert wait_until(lambda: len(g.lines("deployment")) == 1, timeout=20), g.stderr()
        per_worker = g.lines("per-worker")
        assert len(set(per_worker)) == 3
        assert set(per_worker) == set(g.workers())
        # The lock is held: the others keep waiting, nobody else runs it.
        assert not wait_until(lambda: len(g.lines("deployment")) > 1, timeout=1.0)
        holder = g.lines("deployment")[0]
        assert holder in per_worker

        os.kill(holder, signal.SIGKILL)
        killed_at = time.monotonic()
        assert wait_until(lambda: len(g.lines("deployment")) == 2, timeout=30), g.stderr()
        takeover = time.monotonic() - killed_at
        new_holder = g.lines("deployment")[1]
        assert new_holder != holder
        assert takeover < 10, f"takeover took {takeover:.1f} s"
        # gunicorn replaced the killed worker: its host runs a per-worker copy too.
        assert wait_until(lambda: len(g.lines("per-worker")) == 4, timeout=30)
        assert not wait_until(lambda: len(g.lines("deployment")) > 2, timeout=1.0)

        assert g.stop() == 0
        stderr = g.stderr()
        alive = sorted(set(g.lines("per-worker")) - {holder})
        assert sorted(g.lines("per-worker-stopped")) == alive
        assert "Traceback" not in stderr
        assert stderr.count("Host stopped in") == 3
        # The master never ran a host: only workers (and never twice in one worker) did.
        assert g.proc.pid not in g.lines("per-worker")

    def test_preload_starts_no_thread_before_fork(self, make_gunicorn) -> None:
        """With --preload the app is imported in the master, yet no host (no thread) starts there;
        each worker starts its own after the fork."""
        g = make_gunicorn("--preload")
        assert wait_until(lambda: len(g.lines("per-worker")) == 3, timeout=60), g.stderr()
        assert g.lines("imported") == [g.proc.pid]  # imported once, in the master
        assert g.master.num_threads() == 1
        assert set(g.lines("per-worker")) == set(g.workers())
        assert wait_until(lambda: len(g.lines("deployment")) == 1, timeout=20)
        assert g.stop() == 0
        assert "Traceback" not in g.stderr()

    def test_no_signal_handler_is_replaced_in_the_worker(self, make_gunicorn) -> None:
        """The worker's hosts leave gunicorn's signal handling alone: SIGTERM to one worker makes it exit
        gracefully (its host stops), and gunicorn replaces it."""
        g = make_gunicorn(workers=1)
        assert wait_until(lambda: len(g.lines("per-worker")) == 1, timeout=60), g.stderr()
        (worker,) = g.lines("per-worker")
        os.kill(worker, signal.SIGTERM)
        assert wait_until(lambda: g.lines("per-worker-stopped") == [worker], timeout=30), g.stderr()
        assert wait_until(lambda: len(g.lines("per-worker")) == 2, timeout=60)
        assert f"[{worker}] [INFO] Worker exiting" in g.stderr()
        assert g.stop() == 0
        assert "Traceback" not in g.stderr()


@pytest.mark.timeout(120)
class TestGarbageCollection:
    def test_worker_pays_its_first_full_collection_before_serving(self, make_gunicorn) -> None:
        """The worker's host, started by post_worker_init, ends its start with a full collection: it runs after
        the host was built and before the worker serves its first request, so no request waits for it."""
        g = make_gunicorn(workers=1, app=GC_APP)
        marks: dict = {}

        def served() -> bool:
            try:
                marks.update(get_over_unix(g.socket, "/"))  # type: ignore[arg-type]
            except (OSError, http.client.HTTPException, ValueError):
                return False
            return True

        assert wait_until(served, timeout=60, interval=0.1), g.stderr()
        during_start = [t for t in marks["full"] if marks["built"] < t < marks["first_request"]]
        assert len(during_start) == 1, marks
        assert g.stop() == 0
        assert "Traceback" not in g.stderr()


@pytest.mark.timeout(120)
class TestMisbehavingServices:
    def test_failing_service_stops_the_host_but_not_the_worker(self, make_gunicorn) -> None:
        """A service that raises stops the worker's host (logged once, with its traceback); the worker
        process stays up and serving, and exits cleanly later."""
        g = make_gunicorn(workers=1, FAIL="1")
        assert wait_until(lambda: len(g.lines("per-worker-stopped")) == 1, timeout=60), g.stderr()
        (worker,) = g.lines("per-worker")
        assert wait_until(lambda: "Host stopped in" in g.stderr(), timeout=30)
        assert g.workers() == [worker]  # gunicorn did not lose its worker
        stderr = g.stderr()
        assert "Background service 'Failing' failed: RuntimeError: boom in a background service" in stderr
        assert stderr.count("Traceback") == 1
        assert stderr.count("Stopping the host because background service 'Failing' failed") == 1
        assert g.stop() == 0

    def test_stuck_service_does_not_hold_the_worker_past_the_budget(self, make_gunicorn) -> None:
        """At worker exit a service that ignores its token is reported with where it is stuck and abandoned
        when the budget (1 s) runs out; the worker exits long before gunicorn's graceful timeout (20 s)."""
        g = make_gunicorn(workers=1, STUCK="1", BUDGET="1")
        assert wait_until(lambda: len(g.lines("stuck")) == 1, timeout=60), g.stderr()
        began = time.monotonic()
        assert g.stop() == 0
        took = time.monotonic() - began
        stderr = g.stderr()
        assert "Background service 'Stuck' did not stop within the shutdown budget (1.0 s)" in stderr
        assert "time.sleep(60)" in stderr
        assert took < 15, f"the worker took {took:.1f} s to exit"
        assert "Traceback" not in stderr


@pytest.mark.timeout(120)
class TestEmbeddedLogging:
    """Without configure_logging(), as a Flask app under gunicorn usually is: hostkit's lines on gunicorn's stderr."""

    def test_lifecycle_and_failure_reach_the_servers_stderr(self, make_gunicorn) -> None:
        """The worker's host logs its start, the failure with its traceback and its stop to the server's stderr
        (stdlib logging has no handler there), once each, tagged with the worker's pid."""
        g = make_gunicorn(workers=1, FAIL="1", LOGS="embedded")
        assert wait_until(lambda: len(g.lines("per-worker-stopped")) == 1, timeout=60), g.stderr()
        (worker,) = g.lines("per-worker")
        assert wait_until(lambda: "Host stopped in" in g.stderr(), timeout=30), g.stderr()
        assert g.stop() == 0
        stderr = g.stderr()
        head = f"| hostkit | host | {worker} | "
        assert stderr.count(f"| INFO     {head}Host starting 3 service(s)") == 1, stderr
        assert stderr.count(f"| INFO     {head}flask:gapp: host started in process {worker}") == 1, stderr
        assert stderr.count(f"| INFO     {head}gunicorn worker {worker} started 1 host(s)") == 1, stderr
        failure = f"| CRITICAL | hostkit | Failing | {worker} | Background service 'Failing' failed: RuntimeError: boom"
        assert stderr.count(failure) == 1, stderr
        assert stderr.count("Traceback (most recent call last)") == 1
        assert stderr.count(f"| INFO     {head}Host stopped in") == 1, stderr
        assert stderr.count(f"| WARNING  {head}flask:gapp: host stopped with exit code 1") == 1, stderr
        assert f"[{worker}] [INFO] Worker exiting" in stderr  # gunicorn's own lines are untouched

    def test_embedded_logging_off(self, make_gunicorn) -> None:
        """HOSTKIT_EMBEDDED_LOGGING=False: the same failing host prints none of hostkit's lines."""
        g = make_gunicorn(workers=1, FAIL="1", LOGS="off")
        assert wait_until(lambda: len(g.lines("per-worker-stopped")) == 1, timeout=60), g.stderr()
        (worker,) = g.lines("per-worker")
        assert g.stop() == 0
        stderr = g.stderr()
        assert f"[{worker}] [INFO] Worker exiting" in stderr
        assert "hostkit" not in stderr and "Traceback" not in stderr and "boom" not in stderr
