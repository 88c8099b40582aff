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
from tests.subproc import python

flask = pytest.importorskip("flask")
EXAMPLES = Path(PROJECT_ROOT) / "examples"
from hostkit.flask import Hostkit  # noqa: E402


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

        ext = Hostkit()
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
        ext = Hostkit(app)
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
        ext = Hostkit(app, builder=_factory)
        app.test_client().get("/")
        assert ext.host(app) is None
        with pytest.raises(ConfigurationError, match="HOSTKIT_ENABLED is False"):
            ext.start(app)

    def test_server_hook_starts_enabled_hosts_only(self) -> None:
        """The post-fork hook (start_all) starts every enabled app's host once, skips a disabled one,
        and stop_all stops them."""
        from hostkit import _embed

        on, off = make_app(), make_app(HOSTKIT_ENABLED=False)
        ext_on, ext_off = Hostkit(on, builder=_factory), Hostkit(off, builder=_factory)
        try:
            started = _embed.start_all()
            host = ext_on.host(on)
            assert host is not None
            assert host in started
            assert ext_off.host(off) is None
            assert _embed.start_all() == started  # idempotent per process
        finally:
            _embed.stop_all()
        assert host.state is HostState.STOPPED

    def test_embed_registry_keeps_no_embedded_host_alive(self) -> None:
        """An embedded host nobody keeps leaves the server hooks' registry when it is collected."""
        import gc
        import weakref

        app = make_app()
        Hostkit(app, builder=_factory)
        gone = weakref.ref(app.extensions["hostkit"].embedded)
        del app
        gc.collect()
        assert gone() is None  # the registry held it strongly: nothing could ever collect it

    def test_configuration_errors(self) -> None:
        """Missing builder, a wrong HOSTKIT_START, a bad import string and a second init_app are refused clearly."""
        with pytest.raises(ConfigurationError, match=r"has no builder: pass builder= .*HOSTKIT_BUILDER"):
            Hostkit(make_app())
        with pytest.raises(ConfigurationError, match=r"HOSTKIT_START must be one of 'request', 'manual', not: 'now'"):
            Hostkit(make_app(HOSTKIT_START="now"), builder=_factory)
        with pytest.raises(ConfigurationError, match=r"must look like 'package.module:attr', not: 'nope'"):
            Hostkit(make_app(HOSTKIT_BUILDER="nope"))
        with pytest.raises(ConfigurationError, match=r"'tests.test_flask:missing' could not be loaded"):
            Hostkit(make_app(HOSTKIT_BUILDER="tests.test_flask:missing"))
        with pytest.raises(ConfigurationError, match=r"could not be loaded: .*; did you mean '_factory'\?"):
            Hostkit(make_app(HOSTKIT_BUILDER="tests.test_flask:_factroy"))
        with pytest.raises(ConfigurationError, match=r"HOSTKIT_SHUTDOWN_TIMEOUT must be >= 0 seconds, not: -1 \(int\)"):
            Hostkit(make_app(HOSTKIT_SHUTDOWN_TIMEOUT=-1), builder=_factory)
        with pytest.raises(ConfigurationError, match=r"unknown contention monitor option\(s\) \['intervall'\]"):
            Hostkit(make_app(HOSTKIT_CONTENTION={"intervall": 1}), builder=_factory)
        app = make_app()
        Hostkit(app, builder=_factory)
        with pytest.raises(ConfigurationError, match="init_app\\(\\) was called twice for app 'testapp'"):
            Hostkit(app, builder=_factory)
        with pytest.raises(ConfigurationError, match="Hostkit is not attached to app 'other'"):
            Hostkit.state(flask.Flask("other"))

    def test_factory_receives_the_app(self) -> None:
        """A one-argument builder factory is called with the app (for its config)."""
        seen: list[object] = []

        def builder(app: flask.Flask) -> HostBuilder:
            seen.append(app)
            return _factory()

        app = make_app()
        ext = Hostkit(app, builder=builder)
        app.test_client().get("/")
        ext.stop(app)
        assert seen == [app]

    def test_latency_and_contention(self) -> None:
        """HOSTKIT_LATENCY records each request; HOSTKIT_CONTENTION attaches a monitor that sees them."""
        app = make_app(HOSTKIT_LATENCY=True, HOSTKIT_CONTENTION={"interval": 0.05, "probe": False})
        ext = Hostkit(app, builder=_factory)
        client = app.test_client()
        for _ in range(5):
            client.get("/").close()  # a WSGI server closes the body: that ends the request
        state = Hostkit.state(app)
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
        ext = Hostkit(app, builder=_factory)
        embedded = Hostkit.state(app).embedded
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
        ext = Hostkit(app, builder=_factory)
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
        ext = Hostkit(app, builder=_factory)
        app.test_client().get("/").close()
        assert ext.host(app) is not None
        assert {sig: signal.getsignal(sig) for sig in watched} == before
        ext.stop(app)
        assert {sig: signal.getsignal(sig) for sig in watched} == before


EMBEDDED_APP = textwrap.dedent(
    """
    import json, logging, os, sys, time
    from loguru import logger
    from flask import Flask
    from hostkit import BackgroundService, HostBuilder, HostOptions
    from hostkit.flask import Hostkit

    READY = os.environ["READY_FILE"]
    MODE = os.environ["MODE"]


    class Resource:
        \"\"\"A singleton of the child process that fails to close.\"\"\"

        def close(self):
            raise OSError("the resource would not close")


    class ChildWorker(BackgroundService):
        def __init__(self, resource: Resource):
            self.resource = resource

        def execute(self, stopping):
            open(READY, "w").close()
            stopping.wait()


    class Failing(BackgroundService):
        def execute(self, stopping):
            while not os.path.exists(READY):  # the child is up: its own logs are on their way
                if stopping.wait(0.02):
                    return
            raise RuntimeError("boom in a background service")


    def make_builder():
        b = HostBuilder(options=HostOptions(shutdown_timeout=10))
        b.services.add_singleton(Resource)
        b.add_hosted_service(ChildWorker, placement="process")
        b.add_hosted_service(Failing)
        return b


    if __name__ == "__main__":
        records = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append({
                    "logger": record.name,
                    "level": record.levelname,
                    "message": record.getMessage(),
                    "exc_text": self.format(record) if record.exc_info else "",
                    "pid": record.process,
                    "service": getattr(record, "hostkit_service", None),
                })

        # The application's logging: stdlib, one handler on the root (as dictConfig would make).
        logging.basicConfig(level=logging.INFO, handlers=[Keep()])
        app_sink = []
        if MODE == "loguru":  # an application that configured loguru itself
            logger.remove()
            logger.add(lambda m: app_sink.append(m.record["name"]), level="DEBUG")
        app = Flask("shop")
        app.config.update(json.loads(os.environ["CONFIG"]))

        @app.get("/")
        def index():
            return "ok"

        kit = Hostkit(app, builder=make_builder)
        before = repr(logger)
        assert app.test_client().get("/").status_code == 200
        during = repr(logger)
        host = kit.host(app)
        assert host.lifetime.stopped.wait(30), "the failure did not stop the host"
        kit.stop(app)
        print(json.dumps({
            "records": records, "pid": os.getpid(), "exit_code": host.exit_code,
            "loguru": [before, during, repr(logger)], "app_sink": app_sink,
        }))
    """
)


def run_embedded_app(tmp_path: Path, mode: str, **config: object) -> tuple[dict, str]:
    import json

    (tmp_path / "shop.py").write_text(EMBEDDED_APP)
    env = dict(
        os.environ,
        MODE=mode,
        CONFIG=json.dumps(config),
        READY_FILE=str(tmp_path / "ready"),
        PYTHONPATH=os.pathsep.join([str(tmp_path), PROJECT_ROOT]),
    )
    out = subprocess.run([sys.executable, "shop.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


class TestEmbeddedLogging:
    """hostkit's own lines reach a Flask app's stdlib logging, from the host and from its children."""

    def test_failure_with_traceback_and_lifecycle_reach_stdlib_logging(self, tmp_path: Path) -> None:
        """The app's stdlib handler gets the start, the failure with its traceback, a child's line and the stop;
        nothing goes to stderr twice, and the route is gone once the host stopped."""
        result, stderr = run_embedded_app(tmp_path, "stdlib")
        records = [r for r in result["records"] if r["logger"] == "hostkit"]
        text = "\n".join(r["message"] for r in records)
        assert result["exit_code"] == 1

        def one(needle: str) -> dict:
            found = [r for r in records if needle in r["message"]]
            assert len(found) == 1, (needle, text)
            return found[0]

        assert one("Host starting 2 service(s)")["level"] == "INFO"
        assert one("Host started in")["level"] == "INFO"
        assert one(f"flask:shop: host started in process {result['pid']}")["level"] == "INFO"
        failure = one("Background service 'Failing' failed: RuntimeError: boom in a background service")
        assert failure["level"] == "CRITICAL" and failure["service"] == "Failing"
        assert "Traceback (most recent call last)" in failure["message"]
        assert 'raise RuntimeError("boom in a background service")' in failure["message"]
        assert one("Host stopped in")["message"].endswith("(exit code 1)")
        assert one("flask:shop: host stopped with exit code 1")["level"] == "WARNING"
        # A record hostkit wrote in the process-placed child, with the child's pid and its traceback.
        child = one("Closing the singleton service Resource failed")
        assert child["pid"] != result["pid"] and child["service"] == "Resource"
        assert "OSError: the resource would not close" in child["message"]
        # stderr (loguru's default sink) did not print them as well.
        assert "Host started" not in stderr and "boom" not in stderr
        before, during, after = result["loguru"]
        assert before == "<loguru.logger handlers=[(id=0, level=10, sink=<stderr>)]>"
        assert during.count("(id=") == 2  # loguru's default stand-in, and the route
        assert after.count("(id=") == 1 and "id=0" not in after  # the route is gone, the stand-in stays

    def test_embedded_logging_can_be_turned_off(self, tmp_path: Path) -> None:
        """HOSTKIT_EMBEDDED_LOGGING=False: no hostkit record anywhere, loguru untouched."""
        result, stderr = run_embedded_app(tmp_path, "stdlib", HOSTKIT_EMBEDDED_LOGGING=False)
        assert [r for r in result["records"] if r["logger"] == "hostkit"] == []
        assert "Host started" not in stderr and "boom" not in stderr
        assert set(result["loguru"]) == {"<loguru.logger handlers=[(id=0, level=10, sink=<stderr>)]>"}

    def test_no_sink_is_added_when_the_app_configured_loguru(self, tmp_path: Path) -> None:
        """An app with its own loguru sinks keeps exactly those: nothing added, hostkit's logger stays off."""
        result, stderr = run_embedded_app(tmp_path, "loguru")
        assert [r for r in result["records"] if r["logger"] == "hostkit"] == []
        before, during, after = result["loguru"]
        assert before == during == after
        assert before.count("(id=") == 1 and "id=0" not in before
        assert not any(name.startswith("hostkit") for name in result["app_sink"])
        assert "Host st" not in stderr and "boom" not in stderr

    def test_bad_setting_is_refused(self) -> None:
        with pytest.raises(ConfigurationError, match=r"HOSTKIT_EMBEDDED_LOGGING must be True or False, not: 'no'"):
            Hostkit(make_app(HOSTKIT_EMBEDDED_LOGGING="no"), builder=_factory)


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
    from hostkit.flask import Hostkit

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
    ext = Hostkit(app, builder=make_builder)

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
        self, spawn, tmp_path: Path, with_process: bool
    ) -> None:
        """Under `flask run --reload`, only the serving child runs the host; after a reload the old child and
        everything it started are gone, and the new one has exactly one copy of each service (thread or child
        process)."""
        (tmp_path / "devapp.py").write_text(DEV_APP)
        port = free_port()
        argv = python("-m", "flask", "run", "--reload", "--port", str(port), "--host", "127.0.0.1")
        # Only the app's own file triggers reloads, not the hostkit checkout it imports.
        argv += ["--exclude-patterns", f"{PROJECT_ROOT}{os.sep}*"]
        proc = spawn(
            argv,
            cwd=str(tmp_path),
            PYTHONPATH=os.pathsep.join([str(tmp_path), PROJECT_ROOT]),
            FLASK_APP="devapp",
            WITH_PROCESS="1" if with_process else "",
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
        # Ctrl+C in a terminal signals the whole process group: the server stops.
        proc.signal_group(signal.SIGINT)
        proc.wait(20)

    @pytest.mark.timeout(90)
    def test_waitress_starts_on_first_request_and_stops_at_exit(self, spawn, tmp_path: Path) -> None:
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
        proc = spawn(python(script), stdout=False, stderr="separate", PYTHONPATH=PROJECT_ROOT)
        url = f"http://127.0.0.1:{port}/threads"

        proc.wait_for(lambda: fetch_json(url), timeout=60, what="the server answering")
        assert fetch_json(url)["threads"].count("hostkit-Ticker") == 1  # type: ignore[index]
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.err
        err = proc.err
        assert "Host stopped in" in err
        assert "Background service 'Ticker' stopped" in err
        assert "Traceback" not in err
