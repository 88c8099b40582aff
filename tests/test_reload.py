"""Reload: SIGHUP to a real host process, ``hostkit run`` and systemd, and ``Host.reload()`` in process."""

from __future__ import annotations

import re
import signal
import socket
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hostkit import (
    BackgroundService,
    CancellationToken,
    HostBuilder,
    HostedService,
    HostOptions,
    OncePerDeployment,
    ReloadReport,
)
from hostkit.exceptions import ConfigurationError, ConfigurationTypeError, HostStateError
from tests.conftest import wait_until
from tests.subproc import Program, mask_pids, python

# One module for both ways of running it: `python reload_app.py` (Host.run()) and
# `hostkit run reload_app:create_builder`. Each service notes what it does in files
# under RELOAD_TEST_DIR; "ready" appears once every service is running (a child counts
# once its execute() began), so a SIGHUP after it reaches every service.
APP = """
import os, sys, threading, time
from pathlib import Path
from hostkit import BackgroundService, HostedService, HostBuilder, HostOptions

OUT = Path(os.environ["RELOAD_TEST_DIR"])
RELOAD_TIMEOUT = float(os.environ.get("RELOAD_TIMEOUT", "3"))


def note(name, text):
    with open(OUT / name, "a", encoding="utf-8") as f:
        f.write(text + "\\n")


class Ticker(BackgroundService):
    \"\"\"Appends "pid native-thread-id n" to <tag>.ticks every 20 ms.\"\"\"

    tag = "ticker"

    def execute(self, stopping):
        n = 0
        while not stopping.wait(0.02):
            n += 1
            note(self.tag + ".ticks", f"{os.getpid()} {threading.get_native_id()} {n}")


class ThreadWorker(Ticker):
    tag = "thread-worker"

    def reload(self, token):
        note("thread-worker.reloads", f"{os.getpid()} {threading.current_thread().name}")


class ProcessWorker(Ticker):
    tag = "process-worker"

    def reload(self, token):
        note("process-worker.reloads", f"{os.getpid()} {threading.current_thread().name}")


class Plain(Ticker):
    tag = "plain"


class PlainProcess(Ticker):
    tag = "plain-process"


class Raising(HostedService):
    def reload(self, token):
        raise ValueError("bad setting on line 3")


class Overrunning(BackgroundService):
    def execute(self, stopping):
        stopping.wait()

    def reload(self, token):
        note("overrunning.reloads", "began")
        threading.Event().wait(60)  # ignores its token: it overruns every deadline


class AllRunning(BackgroundService):
    def attach_host(self, host):
        self.host = host

    def execute(self, stopping):
        while not stopping.wait(0.02):
            if all(s.state.value == "running" for s in self.host.status().services):
                note("ready", "")
                break
        stopping.wait()


def create_builder():
    builder = HostBuilder(options=HostOptions(shutdown_timeout=20, reload_timeout=RELOAD_TIMEOUT))
    services = builder.services
    services.add_hosted_service(ThreadWorker, name="thread-worker")
    services.add_hosted_service(ProcessWorker, name="process-worker", placement="process")
    services.add_hosted_service(Plain, name="plain")
    services.add_hosted_service(PlainProcess, name="plain-process", placement="process")
    services.add_hosted_service(Raising, name="raising")
    services.add_hosted_service(Overrunning, name="overrunning")
    services.add_hosted_service(AllRunning, name="all-running")
    return builder


if __name__ == "__main__":
    sys.exit(create_builder().build().run())
"""


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def last_tick(path: Path) -> tuple[int, int, int]:
    pid, tid, n = lines(path)[-1].split()
    return int(pid), int(tid), int(n)


class App:
    """The app module in ``folder``, run in its own session; what its services noted."""

    def __init__(self, folder: Path, spawn: Callable[..., Program], argv: list[str], **env: str) -> None:
        self.folder = folder
        (folder / "reload_app.py").write_text(textwrap.dedent(APP), encoding="utf-8")
        # Only JOURNAL_STREAM is taken away: a test may hand the program a NOTIFY_SOCKET of its own.
        self.program: Program = spawn(
            argv, cwd=folder, stderr="separate", unset=("JOURNAL_STREAM",), RELOAD_TEST_DIR=str(folder), **env
        )

    def file(self, name: str) -> Path:
        return self.folder / name

    def wait_ready(self) -> None:
        ticking = [self.file(f"{name}.ticks") for name in ("thread-worker", "process-worker", "plain", "plain-process")]
        self.program.wait_for(
            lambda: self.file("ready").exists() and all(t.exists() for t in ticking), what="every service running"
        )

    def wait_log(self, *fragments: str, count: int = 1) -> None:
        self.program.wait_for(
            lambda: all(self.program.err.count(f) >= count for f in fragments), what=f"logging {fragments!r}"
        )


@pytest.fixture
def app(tmp_path: Path, spawn: Callable[..., Program]) -> Callable[..., App]:
    def make(*, cli: bool = False, **env: str) -> App:
        env.setdefault("NOTIFY_SOCKET", "")  # not under systemd, unless the test says so
        argv = python("-m", "hostkit", "run", "reload_app:create_builder") if cli else python("reload_app.py")
        return App(tmp_path, spawn, argv, **env)

    return make


def check_one_reload(a: App, host_pid: int) -> None:
    """After one SIGHUP: each reload() ran where it should; the host and every service run on."""
    program = a.program
    plain_before = last_tick(a.file("plain.ticks"))
    plain_process_before = last_tick(a.file("plain-process.ticks"))
    program.signal(signal.SIGHUP)
    # The reload ends once the overrunning reload() is cut at its deadline (3 s).
    a.wait_log("Reload done in")
    assert program.running(), program.describe()

    # The thread-placed service's reload() ran in the host, on a thread of its own.
    assert lines(a.file("thread-worker.reloads")) == [f"{host_pid} hostkit-thread-worker-reload"]
    # The process-placed one's ran in its child, on a thread of its own there.
    child_pid = last_tick(a.file("process-worker.ticks"))[0]
    assert child_pid != host_pid
    assert lines(a.file("process-worker.reloads")) == [f"{child_pid} hostkit-process-worker-reload"]
    err = mask_pids(program.err)
    assert "INFO     | thread-worker | PID | Service 'thread-worker' reloaded in" in err
    assert "INFO     | process-worker | PID | Service 'process-worker' reloaded in" in err

    # The raising reload() is logged at ERROR with the service's name and its traceback.
    assert (
        "ERROR    | raising | PID | reload() of 'raising' failed: ValueError: bad setting on line 3; "
        "the service runs on\nTraceback (most recent call last):" in err
    )
    assert 'raise ValueError("bad setting on line 3")' in err
    # The overrunning one is cut at the deadline: an ERROR naming it, and where it is stuck.
    assert lines(a.file("overrunning.reloads")) == ["began"]
    assert re.search(
        r"ERROR    \| overrunning \| PID \| reload\(\) of 'overrunning' did not return within 3 s "
        r"\(reload_timeout\); left running on hostkit-overrunning-reload, at:\n.*threading.Event\(\).wait\(60\)",
        err,
        re.S,
    ), err
    assert "ERROR    | host | PID | Reload done in" in err
    assert "failed: raising, overrunning" in err

    # Services without reload() run on untouched: same process, same thread, still ticking.
    for name, before in (("plain", plain_before), ("plain-process", plain_process_before)):
        path = a.file(f"{name}.ticks")
        program.wait_for(lambda path=path, before=before: last_tick(path)[2] > before[2] + 5, what=f"{name} ticking")
        assert last_tick(path)[:2] == before[:2]
    assert not a.file("plain.reloads").exists()
    assert "Received SIGTERM" not in program.err and "stopping the host" not in program.err


def check_clean_stop(program: Program) -> None:
    program.signal(signal.SIGTERM)
    assert program.wait() == 0, program.describe()
    err = mask_pids(program.err)
    assert re.search(r"INFO     \| host \| PID \| Host stopped in [0-9.]+ s \(exit code 0\)", err), err
    assert "CRITICAL" not in err


class TestSighup:
    @pytest.mark.timeout(90)
    def test_sighup_reloads_a_running_host_which_then_stops_cleanly(self, app) -> None:
        """SIGHUP to Host.run(): every reload() runs (thread and child), failures are logged, the host runs on."""
        a = app()
        a.wait_ready()
        check_one_reload(a, a.program.pid)
        assert "INFO     | host | PID | Received SIGHUP: reloading 4 service(s) (reload_timeout 3 s)" in mask_pids(
            a.program.err
        )
        check_clean_stop(a.program)

    @pytest.mark.timeout(90)
    def test_sighups_during_a_reload_are_coalesced_into_one_more(self, app) -> None:
        """Reloads never overlap: SIGHUPs that arrive while one runs give exactly one follow-up reload."""
        a = app()
        a.wait_ready()
        program = a.program
        program.signal(signal.SIGHUP)
        # The first reload is running: the overrunning reload() holds it until its deadline.
        program.wait_for(lambda: lines(a.file("overrunning.reloads")) == ["began"], what="the first reload")
        # Each one waited for until it was read, so that the kernel cannot merge them into one.
        program.signal(signal.SIGHUP)
        a.wait_log("Received SIGHUP: a reload is running; one more reload follows when it ends")
        program.signal(signal.SIGHUP)
        a.wait_log("Received SIGHUP: a reload is running and another is already queued; this request joins it")
        a.wait_log("Follow-up reload: reloading 4 service(s)")
        a.wait_log("Reload done in", count=2)
        # Two reloads in all: the first and the follow-up, never two at once.
        assert len(lines(a.file("thread-worker.reloads"))) == 2
        assert len(lines(a.file("process-worker.reloads"))) == 2
        # The overrunning reload() from the first is still running: not called again beside it.
        assert lines(a.file("overrunning.reloads")) == ["began"]
        assert (
            "reload() of 'overrunning' failed: RuntimeError: its previous reload() has not returned yet "
            "(it overran its deadline); the service runs on" in program.err
        )
        check_clean_stop(program)

    @pytest.mark.timeout(90)
    def test_hostkit_run_treats_sighup_as_a_reload(self, app) -> None:
        """`hostkit run` reloads on SIGHUP and keeps running; SIGTERM then stops it with exit code 0."""
        a = app(cli=True)
        a.wait_ready()
        check_one_reload(a, a.program.pid)
        check_clean_stop(a.program)

    @pytest.mark.timeout(90)
    def test_hostkit_run_under_systemd_sends_reloading_then_ready(self, app, tmp_path: Path) -> None:
        """Under NOTIFY_SOCKET, a reload is RELOADING=1 with MONOTONIC_USEC, then READY=1 once it has ended."""
        address = str(tmp_path / "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(address)
        messages: list[str] = []

        def receive_until(fragment: str) -> None:
            deadline = time.monotonic() + 30
            while not any(fragment in m for m in messages):
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    messages.append(sock.recv(4096).decode())
                except TimeoutError:
                    pytest.fail(f"systemd never got {fragment!r}; got: {messages}")

        try:
            a = app(cli=True, NOTIFY_SOCKET=address, RELOAD_TIMEOUT="1")
            receive_until("READY=1")
            a.wait_ready()
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            del messages[:]
            a.program.signal(signal.SIGHUP)
            receive_until("READY=1")
            # Logged once the datagram was sent: it may reach the file a moment after the socket.
            a.wait_log("Notified systemd: READY=1 (reload done, with failures)")
            reloading = [m for m in messages if "RELOADING=1" in m]
            assert len(reloading) == 1, messages
            usec = int(re.search(r"^MONOTONIC_USEC=(\d+)$", reloading[0], re.M)[1])  # type: ignore[index]
            # The host's CLOCK_MONOTONIC when the reload began: after the SIGHUP was sent, before now.
            assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
            assert messages.index(reloading[0]) < ready
            # READY=1 only once every reload() had ended: the overrunning one was cut at its 1 s deadline.
            assert "reload() of 'overrunning' did not return within 1 s" in a.program.err
            assert "Notified systemd: RELOADING=1" in a.program.err
            check_clean_stop(a.program)
        finally:
            sock.close()


# A start() that waits for a file (a dependency coming up), and a reload() that says so.
GATED = """
import os, sys
from hostkit import HostedService, HostBuilder, HostOptions


class Gate(HostedService):
    def start(self, token):
        print("STARTING", flush=True)
        while not os.path.exists("go") and not token.wait(0.02):
            pass

    def reload(self, token):
        print("RELOADED", flush=True)


if __name__ == "__main__":
    builder = HostBuilder(options=HostOptions(shutdown_timeout=20))
    builder.services.add_hosted_service(Gate, name="gate")
    sys.exit(builder.build().run())
"""


class TestSighupDuringStartUp:
    def test_sighup_during_start_up_reloads_once_every_service_started(self, tmp_path: Path, spawn) -> None:
        """A SIGHUP while start() runs neither stops nor kills the host: one reload follows the start-up."""
        (tmp_path / "gated.py").write_text(textwrap.dedent(GATED), encoding="utf-8")
        program = spawn(python("gated.py"), cwd=tmp_path, stderr="separate", NOTIFY_SOCKET="")
        program.wait_for_output("STARTING")
        program.signal(signal.SIGHUP)
        program.wait_for_output(
            "Received SIGHUP during start-up; reloading once every service has started", stream="err"
        )
        assert "RELOADED" not in program.output
        (tmp_path / "go").touch()
        program.wait_for_output("RELOADED")
        program.wait_for_output("SIGHUP during start-up: reloading 1 service(s)", stream="err")
        assert program.output.count("RELOADED") == 1
        check_clean_stop(program)


class Recorder(BackgroundService):
    def __init__(self) -> None:
        self.reloads: list[str] = []

    def execute(self, stopping: CancellationToken) -> None:
        stopping.wait()

    def reload(self, token: CancellationToken) -> None:
        self.reloads.append(threading.current_thread().name)


class Untouched(BackgroundService):
    def execute(self, stopping: CancellationToken) -> None:
        stopping.wait()


class Failing(HostedService):
    def reload(self, token: CancellationToken) -> None:
        raise KeyError("missing: DATABASE_URL")


class ChildFailing(BackgroundService):
    def execute(self, stopping: CancellationToken) -> None:
        stopping.wait()

    def reload(self, token: CancellationToken) -> None:
        raise ValueError("the child cannot read its settings")


class Cooperative(BackgroundService):
    """Its reload() waits for its token: it returns at the deadline, and is reported as timed out."""

    def __init__(self) -> None:
        self.cut = threading.Event()

    def execute(self, stopping: CancellationToken) -> None:
        stopping.wait()

    def reload(self, token: CancellationToken) -> None:
        token.wait()
        self.cut.set()


class TestHostReload:
    def test_reload_reports_what_reloaded_and_what_failed(self, logs) -> None:
        """Host.reload() calls each reload() on a thread of its own and returns who reloaded and who failed."""
        recorder = Recorder()
        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(recorder, name="recorder")
        builder.services.add_hosted_service(Untouched, name="untouched")
        builder.services.add_hosted_service(Failing, name="failing")
        with builder.build() as host:
            report = host.reload()
            assert isinstance(report, ReloadReport)
            assert report.reloaded == ("recorder",)
            assert report.failed == ("failing",)
            assert not report.ok
            assert report["failing"].result == "failed"
            assert report["failing"].error == "KeyError: 'missing: DATABASE_URL'"
            assert report.skipped == ()
            assert [s.name for s in report.services] == ["recorder", "failing"]  # untouched has no reload()
            assert recorder.reloads == ["hostkit-recorder-reload"]
            status = host.status()
            assert status["failing"].reload_error == "KeyError: 'missing: DATABASE_URL'"
            assert status["failing"].state.value == "running"
            assert status["recorder"].reload_error is None
            assert status["recorder"].last_reload_at is not None
            assert status["untouched"].last_reload_at is None
            assert status["failing"].to_dict()["last_reload_at"].endswith("+00:00")
        failed = logs.find("reload() of 'failing' failed: KeyError: 'missing: DATABASE_URL'", level="ERROR")
        assert failed and failed[0]["service"] == "failing"
        assert "Traceback" in failed[0]["message"]

    @pytest.mark.timeout(60)
    def test_process_placed_reload_runs_in_the_child_and_its_error_comes_back(self, logs) -> None:
        """A child's reload() error comes back with its type and the child's traceback, and the child runs on."""
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_hosted_service(ChildFailing, name="child-failing", placement="process")
        with builder.build() as host:
            assert wait_until(lambda: host.status()["child-failing"].state.value == "running", timeout=30)
            pid = host.status()["child-failing"].pid
            report = host.reload()
            assert report["child-failing"].error == "ValueError: the child cannot read its settings"
            assert host.status()["child-failing"].pid == pid
            assert host.status()["child-failing"].state.value == "running"
        record = logs.find("reload() of 'child-failing' failed: ValueError", level="ERROR")[0]
        assert 'raise ValueError("the child cannot read its settings")' in record["message"]

    def test_a_cooperative_reload_gets_its_token_at_the_deadline(self, logs) -> None:
        """reload()'s token is set at reload_timeout; the call is reported as timed out, the service runs on."""
        service = Cooperative()
        builder = HostBuilder(options=HostOptions(shutdown_timeout=5, reload_timeout=0.3))
        builder.services.add_hosted_service(service, name="cooperative")
        with builder.build() as host:
            began = time.monotonic()
            report = host.reload()
            assert service.cut.is_set()
            assert time.monotonic() - began >= 0.3
            # It returned when its token was set: that counts as returned, as a stop() does.
            assert report["cooperative"].result == "reloaded"
            assert host.status()["cooperative"].state.value == "running"

    def test_a_service_that_is_not_running_is_skipped(self) -> None:
        """A service with reload() that is not running (here: its execute returned) is listed as skipped."""

        class Done(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                return

            def reload(self, token: CancellationToken) -> None:
                raise AssertionError("not running: must not be called")

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(Recorder(), name="recorder")
        builder.services.add_hosted_service(Done, name="done")
        with builder.build() as host:
            assert wait_until(lambda: host.status()["done"].state.value == "completed")
            report = host.reload()
            assert report.skipped == ("done",)
            assert report.reloaded == ("recorder",)
            assert host.status()["done"].last_reload_at is None

    def test_a_service_run_once_per_deployment_gets_the_reload_where_it_holds_the_lock(self, tmp_path: Path) -> None:
        """OncePerDeployment passes reload() on to the service it runs; a standby has nothing to reload."""
        holder, standby = Recorder(), Recorder()
        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        lock = tmp_path / "recorder.lock"
        builder.services.add_hosted_service(OncePerDeployment(holder, lock_path=lock, poll_interval=0.05), name="a")
        builder.services.add_hosted_service(OncePerDeployment(standby, lock_path=lock, poll_interval=0.05), name="b")
        builder.services.add_hosted_service(OncePerDeployment(Untouched(), lock_path=tmp_path / "u.lock"), name="u")
        with builder.build() as host:
            assert wait_until(lambda: host.status()["a"].lock is not None and host.status()["b"].lock is not None)
            report = host.reload()
            # Both wrappers are called (their service has a hook); only the holder's service reloads.
            assert sorted(report.reloaded) == ["a", "b"]
            assert "u" not in [s.name for s in report.services]  # its service has no reload()
            ran = [r for r in (holder, standby) if r.reloads]
            assert len(ran) == 1
            assert ran[0].reloads[0].endswith("-reload")

    def test_reload_needs_a_running_host(self) -> None:
        """Before start and after stop, Host.reload() raises HostStateError naming the state."""
        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(Recorder(), name="recorder")
        host = builder.build()
        with pytest.raises(HostStateError, match=r"^Host.reload\(\) needs a running host; this one is created$"):
            host.reload()
        host.start()
        host.stop()
        with pytest.raises(HostStateError, match=r"this one is stopped$"):
            host.reload()

    def test_reload_from_a_reload_is_refused(self) -> None:
        """Host.reload() inside a service's reload() would wait for itself: it raises instead."""
        errors: list[BaseException] = []

        class Nested(HostedService):
            def attach_host(self, host) -> None:  # type: ignore[no-untyped-def]
                self.host = host

            def reload(self, token: CancellationToken) -> None:
                try:
                    self.host.reload()
                except RuntimeError as err:
                    errors.append(err)

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(Nested, name="nested")
        with builder.build() as host:
            assert host.reload().reloaded == ("nested",)
        assert [str(e) for e in errors] == [
            "Host.reload() was called from a service's reload(): it would wait for the reload it is part of "
            "(deadlock avoided)"
        ]


class TestReloadTimeoutOption:
    @pytest.mark.parametrize("value", [0, -1, float("nan")])
    def test_reload_timeout_must_be_positive(self, value: float) -> None:
        with pytest.raises(ConfigurationError, match=r"^HostOptions.reload_timeout must be > 0 seconds, not: "):
            HostOptions(reload_timeout=value)

    def test_reload_timeout_must_be_a_duration(self) -> None:
        with pytest.raises(
            ConfigurationTypeError,
            match=r"^HostOptions.reload_timeout must be a number of seconds or a timedelta, not: '5s' \(str\)$",
        ):
            HostOptions(reload_timeout="5s")  # type: ignore[arg-type]


class TestEmbeddedHostsInstallNoHandler:
    def test_start_leaves_sighup_alone(self) -> None:
        """An embedded host (start()/with, as Flask, Django and gunicorn use) leaves SIGHUP's disposition as it was."""
        before = signal.getsignal(signal.SIGHUP)
        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(Recorder(), name="recorder")
        with builder.build():
            assert signal.getsignal(signal.SIGHUP) is before
        assert signal.getsignal(signal.SIGHUP) is before

    def test_run_on_the_main_thread_handles_sighup_and_restores_it(self) -> None:
        """run() on the main thread handles SIGHUP while it runs and puts the old disposition back."""
        before = signal.getsignal(signal.SIGHUP)
        seen: list[object] = []

        class Quit(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                assert host.lifetime.started.wait(10)
                seen.append(signal.getsignal(signal.SIGHUP))
                host.lifetime.stop_application()

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(Quit)
        host = builder.build()
        assert host.run() == 0
        assert seen and seen[0] is not before and seen[0] not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGHUP) is before
