"""The Flask extension: init_app, lazy start per process, config, dev-server reloader, waitress."""

from __future__ import annotations

import gc
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest

from hostkit import BackgroundService, CancellationToken, HostBuilder, HostState
from hostkit.exceptions import ConfigurationError
from tests.conftest import PROJECT_ROOT, fetch_json, wait_until

flask = pytest.importorskip("flask")
EXAMPLES = Path(PROJECT_ROOT) / "examples"
from hostkit.flask import HostKit  # noqa: E402


class Ticker(BackgroundService):
    def __init__(self) -> None:
        self.ran = threading.Event()

    def execute(self, stopping: CancellationToken) -> None:
        self.ran.set()
        stopping.wait()


def make_app(**config: object) -> flask.Flask:
    app = flask.Flask("testapp")
    app.config.update(config)

    @app.get("/")
    def index() -> str:
        return "ok"

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestExtension:
    def test_starts_at_first_request_not_at_init(self) -> None:
        """init_app starts nothing; the first request starts the host once; state is in app.extensions."""
        services: list[Ticker] = []

        def builder() -> HostBuilder:
            t = Ticker()
            services.append(t)
            return HostBuilder().add_hosted_service(t)

        ext = HostKit()
        app = make_app()
        before = set(threading.enumerate())
        ext.init_app(app, builder=builder)
        assert set(threading.enumerate()) == before
        state = app.extensions["hostkit"]
        assert ext.host(app) is None and not state.embedded.started
        assert not hasattr(ext, "app")
        client = app.test_client()
        try:
            assert client.get("/").data == b"ok"
            assert client.get("/").data == b"ok"
            assert len(services) == 1 and services[0].ran.wait(10)
            host = ext.host(app)
            assert host is not None and host.state is HostState.RUNNING
        finally:
            ext.stop(app)
        assert host.state is HostState.STOPPED

    def test_builder_from_config_string(self) -> None:
        """HOSTKIT_BUILDER='module:attr' names the factory; HOSTKIT_START='manual' waits for start()."""
        app = make_app(HOSTKIT_BUILDER="tests.test_flask:_factory", HOSTKIT_START="manual")
        ext = HostKit(app)
        app.test_client().get("/")
        assert ext.host(app) is None
        with app.app_context():
            host = ext.start()
            assert ext.start() is host
        ext.stop(app)
        assert host.status()["Ticker"].state.value == "stopped"

    def test_disabled_never_starts(self) -> None:
        """HOSTKIT_ENABLED=False: requests run, no host starts, start() says why."""
        app = make_app(HOSTKIT_ENABLED=False)
        ext = HostKit(app, builder=_factory)
        app.test_client().get("/")
        assert ext.host(app) is None
        with pytest.raises(ConfigurationError, match="HOSTKIT_ENABLED is False"):
            ext.start(app)

    def test_server_hook_starts_enabled_hosts_only(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The post-fork hook (start_all) starts every enabled app's host once, skips a disabled one,
        and stop_all stops them."""
        from hostkit import _embed

        monkeypatch.setattr(_embed, "_registry", [])
        on, off = make_app(), make_app(HOSTKIT_ENABLED=False)
        ext_on, ext_off = HostKit(on, builder=_factory), HostKit(off, builder=_factory)
        try:
            started = _embed.start_all()
            assert started == [ext_on.host(on)]
            assert ext_off.host(off) is None
            assert _embed.start_all() == started  # idempotent per process
        finally:
            _embed.stop_all()
        assert started[0].state is HostState.STOPPED

    def test_configuration_errors(self) -> None:
        """Missing builder, a wrong HOSTKIT_START, a bad import string and a second init_app are refused clearly."""
        with pytest.raises(ConfigurationError, match=r"has no builder: pass builder= .*HOSTKIT_BUILDER"):
            HostKit(make_app())
        with pytest.raises(ConfigurationError, match=r"HOSTKIT_START must be one of 'request', 'manual', not: 'now'"):
            HostKit(make_app(HOSTKIT_START="now"), builder=_factory)
        with pytest.raises(ConfigurationError, match=r"must look like 'package.module:attr', not: 'nope'"):
            HostKit(make_app(HOSTKIT_BUILDER="nope"))
        with pytest.raises(ConfigurationError, match=r"'tests.test_flask:missing' could not be loaded"):
            HostKit(make_app(HOSTKIT_BUILDER="tests.test_flask:missing"))
        with pytest.raises(ConfigurationError, match=r"unknown contention monitor option\(s\) \['intervall'\]"):
            HostKit(make_app(HOSTKIT_CONTENTION={"intervall": 1}), builder=_factory)
        app = make_app()
        HostKit(app, builder=_factory)
        with pytest.raises(ConfigurationError, match="init_app\\(\\) was called twice for app 'testapp'"):
            HostKit(app, builder=_factory)
        with pytest.raises(ConfigurationError, match="HostKit is not attached to app 'other'"):
            HostKit.state(flask.Flask("other"))

    def test_factory_receives_the_app(self) -> None:
        """A one-argument builder factory is called with the app (for its config)."""
        seen: list[object] = []

        def builder(app: flask.Flask) -> HostBuilder:
            seen.append(app)
            return _factory()

        app = make_app()
        ext = HostKit(app, builder=builder)
        app.test_client().get("/")
        ext.stop(app)
        assert seen == [app]

    def test_latency_and_contention(self) -> None:
        """HOSTKIT_LATENCY records each request; HOSTKIT_CONTENTION attaches a monitor that sees them."""
        app = make_app(HOSTKIT_LATENCY=True, HOSTKIT_CONTENTION={"interval": 0.05, "probe": False})
        ext = HostKit(app, builder=_factory)
        client = app.test_client()
        for _ in range(5):
            client.get("/").close()  # a WSGI server closes the body: that ends the request
        state = HostKit.state(app)
        try:
            assert state.latency.summary()["count"] == 5
            monitor = state.embedded.monitor
            assert monitor is not None
            assert wait_until(lambda: monitor.latest is not None and monitor.latest.requests["count"] == 5)
        finally:
            ext.stop(app)

    def test_start_ends_with_a_full_collection(self) -> None:
        """The host's start ends with a full garbage collection, made once its services run: the first full
        collection that start-up made due is paid during the start, not later by a request."""
        app = make_app(HOSTKIT_START="manual")
        ext = HostKit(app, builder=_factory)
        embedded = HostKit.state(app).embedded
        full: list[HostState | None] = []

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "stop" and info["generation"] == 2:
                host = embedded.host
                full.append(None if host is None else host.state)

        gc.callbacks.append(on_gc)
        try:
            ext.start(app)
        finally:
            gc.callbacks.remove(on_gc)
        try:
            assert full, "no full collection ran during the start"
            assert full[-1] is HostState.RUNNING
        finally:
            ext.stop(app)

    def test_start_leaves_a_disabled_collector_alone(self) -> None:
        """A process that turned the garbage collector off manages it itself: the start runs no collection
        and leaves the collector off."""
        app = make_app(HOSTKIT_START="manual")
        ext = HostKit(app, builder=_factory)
        collections: list[int] = []

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                collections.append(info["generation"])

        gc.disable()
        gc.callbacks.append(on_gc)
        try:
            host = ext.start(app)
            assert host.state is HostState.RUNNING
            assert collections == []
            assert not gc.isenabled()
        finally:
            gc.callbacks.remove(on_gc)
            gc.enable()
            ext.stop(app)

    def test_no_signal_handler_is_installed(self) -> None:
        """Starting and stopping the embedded host leaves every signal handler as the server set it."""
        watched = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)
        before = {sig: signal.getsignal(sig) for sig in watched}
        app = make_app()
        ext = HostKit(app, builder=_factory)
        app.test_client().get("/").close()
        assert ext.host(app) is not None
        assert {sig: signal.getsignal(sig) for sig in watched} == before
        ext.stop(app)
        assert {sig: signal.getsignal(sig) for sig in watched} == before


class TestFlaskExample:
    def test_requests_enqueue_without_blocking_and_jobs_are_handled(self, capsys: pytest.CaptureFixture[str]) -> None:
        """examples/flask_app.py: POST /jobs answers 202 at once and the background consumers handle every
        job; a burst larger than the channel gets 503 (refused, not blocked); the stop drains the channel."""
        spec = importlib.util.spec_from_file_location("flask_app_example", EXAMPLES / "flask_app.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        client = module.app.test_client()
        out: list[str] = []

        def handled() -> int:
            out.append(capsys.readouterr().out)
            return "".join(out).count("Handled job")

        try:
            resp = client.post("/jobs?n=3")
            assert resp.status_code == 202 and resp.json == {"accepted": 3}
            assert wait_until(lambda: handled() == 3, timeout=20)
            stats = client.get("/stats").json
            assert stats["services"] == {
                "QueuedWorkService": "running",
                "WorkerHeartbeat": "running",
                "NightlyReport": "running",
            }
            # 150 puts take microseconds; 2 consumers at ~10 ms per job cannot keep up: the 100-item channel
            # fills and the request is answered 503 at once.
            resp = client.post("/jobs?n=150")
            assert resp.status_code == 503
            assert "channel 'jobs' is full (100 items" in resp.json["error"]
            accepted = resp.json["accepted"]
            assert 100 <= accepted < 150
        finally:
            module.hostkit.stop(module.app)
        final = module.jobs.stats()
        assert final.closed
        assert final.accepted == 3 + accepted
        assert handled() + final.dropped == final.accepted  # every accepted job was handled or counted


def _factory() -> HostBuilder:
    return HostBuilder().add_hosted_service(Ticker())


DEV_APP = textwrap.dedent(
    """
    import os, threading
    from flask import Flask, jsonify
    from hostkit import BackgroundService, HostBuilder
    from hostkit.flask import HostKit

    class Ticker(BackgroundService):
        def execute(self, stopping):
            stopping.wait()

    class Worker(BackgroundService):
        def execute(self, stopping):
            stopping.wait()

    def make_builder():
        builder = HostBuilder().add_hosted_service(Ticker())
        if os.environ.get("WITH_PROCESS"):
            builder.add_hosted_service(Worker(), placement="process")
        return builder

    app = Flask(__name__)
    ext = HostKit(app, builder=make_builder)

    @app.get("/threads")
    def threads():
        status = ext.host(app).status()
        children = [s.pid for s in status.services if s.placement == "process" and s.state.value == "running"]
        return jsonify(pid=os.getpid(), threads=sorted(t.name for t in threading.enumerate()), children=children)

    VERSION = 1
    """
)


class TestServers:
    @pytest.mark.timeout(90)
    @pytest.mark.parametrize("with_process", [False, True], ids=["thread", "thread+process"])
    def test_dev_server_reloader_runs_one_host_and_leaves_nothing_behind(
        self, tmp_path: Path, with_process: bool
    ) -> None:
        """Under `flask run --reload`, only the serving child runs the host; after a reload the old child and
        everything it started are gone, and the new one has exactly one copy of each service (thread or child
        process)."""
        (tmp_path / "devapp.py").write_text(DEV_APP)
        port = free_port()
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(tmp_path), PROJECT_ROOT]),
            FLASK_APP="devapp",
            WITH_PROCESS="1" if with_process else "",
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flask",
                "run",
                "--reload",
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                # Only the app's own file triggers reloads, not the hostkit checkout it imports.
                "--exclude-patterns",
                f"{PROJECT_ROOT}{os.sep}*",
            ],
            cwd=str(tmp_path),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        parent = psutil.Process(proc.pid)
        url = f"http://127.0.0.1:{port}/threads"

        def view() -> dict | None:
            """What the serving process reports, once it is settled: its host's threads and children."""
            seen = fetch_json(url)
            if seen is None:
                return None
            serving = seen["pid"]
            if [c.pid for c in parent.children()] != [serving]:
                return None  # a reload is under way
            if with_process and (len(seen["children"]) != 1 or seen["children"][0] == serving):
                return None  # the service's child is still starting
            return seen  # type: ignore[no-any-return]

        def gone(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        try:
            assert wait_until(view, timeout=60, interval=0.1)
            first = view()
            assert first is not None and first["pid"] != proc.pid
            assert first["threads"].count("hostkit-Ticker") == 1
            assert len(first["children"]) == (1 if with_process else 0)
            assert parent.num_threads() == 1  # the reloader parent runs no host
            old_family = {p.pid for p in parent.children(recursive=True)}
            assert set(first["children"]) <= old_family

            # Change the source: the reloader replaces the serving child.
            source = tmp_path / "devapp.py"
            before = source.stat()
            source.write_text(DEV_APP.replace("VERSION = 1", "VERSION = 2"))
            # The stat reloader reloads on a newer mtime; on a coarse clock the write may keep the old one.
            os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))
            assert wait_until(lambda: (v := view()) is not None and v["pid"] != first["pid"], timeout=60)
            second = view()
            assert second is not None
            assert second["threads"].count("hostkit-Ticker") == 1
            assert len(second["children"]) == (1 if with_process else 0)
            assert set(second["children"]) <= {p.pid for p in psutil.Process(second["pid"]).children(recursive=True)}
            # Nothing of the old serving process is left: not it, not its service's child, not its helpers.
            assert wait_until(lambda: all(gone(pid) for pid in old_family), timeout=30)
            assert parent.num_threads() == 1
        finally:
            # Ctrl+C in a terminal signals the whole process group; then make sure.
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything of the session that outlived its parent
            except ProcessLookupError:
                pass

    @pytest.mark.timeout(90)
    def test_waitress_starts_on_first_request_and_stops_at_exit(self, tmp_path: Path) -> None:
        """Under waitress the host starts at the first request and stops at interpreter exit (atexit)."""
        pytest.importorskip("waitress")
        port = free_port()
        script = tmp_path / "serve.py"
        script.write_text(
            DEV_APP
            + textwrap.dedent(
                f"""
                import signal, sys, hostkit, waitress
                hostkit.configure_logging("INFO", stdlib=False)
                # waitress leaves SIGTERM to the default (die at once): exit normally so atexit runs.
                signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
                waitress.serve(app, host="127.0.0.1", port={port})
                """
            )
        )
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            env=dict(os.environ, PYTHONPATH=PROJECT_ROOT),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            url = f"http://127.0.0.1:{port}/threads"

            assert wait_until(lambda: fetch_json(url), timeout=60, interval=0.1)
            assert fetch_json(url)["threads"].count("hostkit-Ticker") == 1  # type: ignore[index]
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0
            assert "Host stopped in" in err
            assert "Background service 'Ticker' stopped" in err
            assert "Traceback" not in err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
