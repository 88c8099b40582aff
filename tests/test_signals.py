"""Signals and exit codes end to end: real host scripts in child processes, real SIGTERM and SIGINT."""

from __future__ import annotations

import concurrent.futures
import random
import re
import signal
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hostkit import BackgroundService, CancellationToken, HostBuilder, HostOptions
from tests.conftest import wait_until
from tests.subproc import Program, mask_pids, python

HEADER = """
import sys, threading, time
import hostkit
from hostkit import BackgroundService, HostedService, HostBuilder, HostOptions

def say(word):
    print(word, flush=True)
"""

# A host with one looping service; prints READY once started.
LOOP = """
class Loop(BackgroundService):
    def execute(self, stopping):
        while not stopping.wait(0.05):
            pass
        say("LOOP-ENDED")

builder = HostBuilder(options=HostOptions(shutdown_timeout=20))
builder.services.add_hosted_service(Loop, name="loop")
host = builder.build()
host.lifetime.started.register(lambda: say("READY"))
sys.exit(host.run())
"""

# A service that needs a long time to wind down: the stop is slow.
SLOW_STOP = """
class Slow(BackgroundService):
    def execute(self, stopping):
        stopping.wait()
        say("WINDING-DOWN")
        time.sleep(60)

builder = HostBuilder(options=HostOptions(shutdown_timeout=60))
builder.services.add_hosted_service(Slow, name="slow")
host = builder.build()
host.lifetime.started.register(lambda: say("READY"))
sys.exit(host.run())
"""

# A start() that waits for a dependency, cooperatively (it watches its token).
SLOW_START = """
class WaitForDatabase(HostedService):
    def start(self, token):
        say("STARTING")
        if not token.wait(60):
            say("DATABASE-UP")

    def stop(self, token):
        say("FIRST-STOPPED")

class Second(HostedService):
    def start(self, token):
        say("SECOND-STARTED")

builder = HostBuilder(options=HostOptions(shutdown_timeout=20))
builder.services.add_hosted_service(WaitForDatabase, name="db-wait")
builder.services.add_hosted_service(Second, name="second")
sys.exit(builder.build().run())
"""

# Twenty thread-placed loops; the first one sends SIGTERM to the process as soon as its thread
# runs, while the host is most likely still starting the others. Every thread start is recorded.
QUICK_START = """
import os, signal
started_threads = []
_start = threading.Thread.start

def recording_start(self):
    started_threads.append(self.name)
    _start(self)

threading.Thread.start = recording_start

class Loop(BackgroundService):
    def __init__(self, first):
        self.first = first

    def execute(self, stopping):
        if self.first:
            os.kill(os.getpid(), signal.SIGTERM)
        while not stopping.wait(0.05):
            pass
        say("LOOP-ENDED")

builder = HostBuilder(options=HostOptions(shutdown_timeout=20))
for i in range(20):
    builder.services.add_hosted_service(Loop(i == 0), name=f"loop-{i}")
code = builder.build().run()
say("THREADS:" + ",".join(started_threads))
sys.exit(code)
"""

CRASH = """
class Crash(BackgroundService):
    def execute(self, stopping):
        raise RuntimeError("disk full")

builder = HostBuilder(options=HostOptions(shutdown_timeout=20))
builder.services.add_hosted_service(Crash, name="crash")
sys.exit(builder.build().run())
"""

START_FAILS = """
class Broken(HostedService):
    def start(self, token):
        raise ConnectionRefusedError("broker down")

builder = HostBuilder(options=HostOptions(shutdown_timeout=20))
builder.services.add_hosted_service(Broken, name="broker")
sys.exit(builder.build().run())
"""


@pytest.fixture
def child(tmp_path: Path, spawn: Callable[..., Program]) -> Callable[[str], Program]:
    """``child(body)`` runs HEADER + body as a host script in its own session, stderr kept apart."""

    def make(body: str) -> Program:
        script = tmp_path / "host_script.py"
        script.write_text(textwrap.dedent(HEADER) + textwrap.dedent(body), encoding="utf-8")
        return spawn(python(script), cwd=tmp_path, stderr="separate")

    return make


class TestSignalsStopTheHost:
    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
    def test_signal_stops_the_host_with_exit_code_zero(self, child, signum: int) -> None:
        """SIGTERM or SIGINT to a host in run() stops every service and exits 0, logging each step."""
        c = child(LOOP)
        c.wait_for_output("READY")
        c.signal_group(signum)
        assert c.wait() == 0, c.err
        assert "LOOP-ENDED" in c.output
        err = mask_pids(c.err)
        name = signal.Signals(signum).name
        assert f"INFO     | host | PID | Received {name}; stopping the host (budget 20.0 s)" in err
        assert "INFO     | loop | PID | Background service 'loop' stopped" in err
        assert re.search(r"INFO     \| host \| PID \| Host stopped in [0-9.]+ s \(exit code 0\)", err)
        assert "Traceback" not in err

    def test_second_sigint_during_a_slow_stop_exits_at_once(self, child) -> None:
        """A second Ctrl+C while the stop waits for a slow service ends the process at once with 130."""
        c = child(SLOW_STOP)
        c.wait_for_output("READY")
        c.signal_group(signal.SIGINT)
        c.wait_for_output("WINDING-DOWN")
        c.signal_group(signal.SIGINT)
        # The slow service would hold the stop for 60 s: exiting within the wait below proves "at once".
        assert c.wait(timeout=20) == 130
        assert "hostkit: second SIGINT during the stop; exiting at once (exit code 130)" in c.err

    def test_sigterm_during_the_stop_does_not_interrupt_it(self, child) -> None:
        """A SIGTERM repeated during the stop (systemd does not, but people do) is ignored: the stop goes on."""
        c = child(LOOP.replace('say("LOOP-ENDED")', 'say("LOOP-ENDED"); time.sleep(1)'))
        c.wait_for_output("READY")
        c.signal_group(signal.SIGTERM)
        c.wait_for_output("LOOP-ENDED")
        c.signal_group(signal.SIGTERM)
        assert c.wait() == 0, c.err


class TestSignalsDuringStartUp:
    def test_sigterm_during_a_slow_start_cancels_start_up(self, child) -> None:
        """SIGTERM while a start() waits cancels its token, skips the remaining starts, and exits 0."""
        c = child(SLOW_START)
        c.wait_for_output("STARTING")
        c.signal_group(signal.SIGTERM)
        # The start() would wait 60 s for its dependency; the signal ends it far sooner.
        assert c.wait(timeout=30) == 0, c.err
        assert "DATABASE-UP" not in c.output
        assert "SECOND-STARTED" not in c.output
        assert "FIRST-STOPPED" in c.output
        err = mask_pids(c.err)
        assert "INFO     | host | PID | Received SIGTERM during start-up; stopping the host" in err
        assert "Start-up ended early: a stop was requested" in err

    def test_signal_during_a_quick_start_up_waits_in_the_pipe_and_stops_the_host(self, child) -> None:
        """With only thread-placed background services, start-up runs no user code and needs no
        signal-reading helper thread: a SIGTERM sent while it runs is read once it is over."""
        c = child(QUICK_START)
        assert c.wait() == 0, c.err
        assert c.output.count("LOOP-ENDED") == 20
        threads = c.output.split("THREADS:", 1)[1]
        assert "hostkit-loop-0" in threads  # the recording works...
        assert "hostkit-host-signals" not in threads  # ...and no helper thread was started
        assert "Received SIGTERM; stopping the host" in c.err

    def test_start_up_with_user_code_reads_signals_on_a_helper_thread(self, child) -> None:
        """A host whose start-up runs user code keeps a helper thread reading signals meanwhile."""
        c = child(
            QUICK_START.replace(
                "class Loop(BackgroundService):",
                "class Loop(BackgroundService):\n    def starting(self, token):\n        pass\n",
            )
        )
        assert c.wait() == 0, c.err
        assert "hostkit-host-signals" in c.output.split("THREADS:", 1)[1]

    def test_second_sigint_during_start_up_exits_at_once(self, child) -> None:
        """Two Ctrl+C during a start() that ignores its token end the process with 130."""
        c = child(SLOW_START.replace("if not token.wait(60):", "if not time.sleep(60):"))
        c.wait_for_output("STARTING")
        c.signal_group(signal.SIGINT)
        assert wait_until(lambda: "Received SIGINT during start-up" in c.err, timeout=20), c.err
        c.signal_group(signal.SIGINT)
        assert c.wait(timeout=20) == 130
        assert "second SIGINT during the stop; exiting at once" in c.err


class TestExitCodes:
    def test_crashed_service_exits_one(self, child) -> None:
        """A background service failing under stop_host makes the process exit 1 (restartable by systemd)."""
        c = child(CRASH)
        assert c.wait() == 1
        err = mask_pids(c.err)
        assert "CRITICAL | crash | PID | Background service 'crash' failed: RuntimeError: disk full" in err
        assert "(exit code 1)" in err

    def test_failed_start_exits_three(self, child) -> None:
        """A start() that raises makes the process exit 3 and names the service."""
        c = child(START_FAILS)
        assert c.wait() == 3
        assert "Hosted service 'broker' failed to start: ConnectionRefusedError: broker down" in c.err


class TestOffMainThread:
    def test_run_in_a_worker_thread_installs_no_handler_and_stops_on_request(self) -> None:
        """run() off the main thread leaves signal handlers alone and returns 0 after stop_application()."""
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        during: dict[int, object] = {}

        class Watch(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                stopping.wait()

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(Watch)
        host = builder.build()
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(host.run()), name="app-runner")
        thread.start()
        assert host.lifetime.started.wait(10)
        during.update({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})
        host.lifetime.stop_application()
        thread.join(10)
        assert not thread.is_alive()
        assert result == [0]
        assert during == before
        assert signal.set_wakeup_fd(-1) == -1  # nobody left a wake-up fd behind

    def test_run_on_the_main_thread_restores_the_handlers(self) -> None:
        """run() on the main thread puts the previous SIGINT/SIGTERM handlers back when it returns."""
        assert threading.current_thread() is threading.main_thread()
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        seen: list[object] = []

        class Quit(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                assert host.lifetime.started.wait(10)
                seen.append(signal.getsignal(signal.SIGTERM))
                host.lifetime.stop_application()

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(Quit)
        host = builder.build()
        assert host.run() == 0
        assert seen and seen[0] is not before[signal.SIGTERM]  # hostkit's handler was in place while running
        assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == before


# Three process-placed services that keep a CPU busy, as real workers do: a busy child's
# main thread is the slowest to run its SIGTERM handler, which is where the races were.
BUSY_GROUP = """
import sys
from hostkit import BackgroundService, HostBuilder, HostOptions

class Busy(BackgroundService):
    def execute(self, stopping):
        n = 0
        while not stopping.is_set():
            for i in range(2000):
                n ^= i

if __name__ == "__main__":
    builder = HostBuilder(options=HostOptions(shutdown_timeout=20))
    for i in range(3):
        builder.services.add_hosted_service(Busy(), placement="process", name=f"busy{i}")
    sys.exit(builder.build().run())
"""


class GroupSigtermTrial:
    """One host in its own session, its whole process group SIGTERMed ``delay`` s after it starts."""

    def __init__(self, script: Path, folder: Path, delay: float) -> None:
        self.delay = delay
        self.program = Program(python(script), folder=folder, stdout=False, stderr="separate")

    def run(self) -> tuple[int | None, list[int], str]:
        """(exit code, processes of its session still running afterwards, stderr)."""
        program = self.program
        try:
            # "Started" = the host logged that it is starting its services: run() has its
            # signal handlers in place (before that, Python's default action ends it). The
            # log line is the only sign of that a separate process gives.
            program.wait_for_output("Host starting", stream="err", timeout=60)
            time.sleep(self.delay)  # the moment under test, not a synchronisation
            program.signal_group(signal.SIGTERM)
            code = program.wait(60)
            wait_until(lambda: not program.session_members(), timeout=5)
            return code, program.session_members(), program.err
        finally:
            program.close()


class TestGroupSigterm:
    @pytest.mark.timeout(300)
    def test_group_sigterm_at_any_moment_is_a_graceful_stop(self, tmp_path) -> None:
        """SIGTERM to the whole process group (systemd's KillMode=control-group, `timeout`, `kill -TERM -PGID`)
        0 to 2 s after the host starts, 30 times: each run exits 0, and nothing of it is left running."""
        script = tmp_path / "busy_group.py"
        script.write_text(textwrap.dedent(BUSY_GROUP), encoding="utf-8")
        rng = random.Random(11)
        # One moment in each 1/30 of the two seconds, in a random order: start-up, running, and
        # the children's own start-up are all hit.
        delays = [2.0 * (i + rng.random()) / 30 for i in range(30)]
        rng.shuffle(delays)

        def trial(index: int) -> tuple[float, int | None, list[int], str]:
            folder = tmp_path / f"trial-{index}"
            folder.mkdir()
            code, left, err = GroupSigtermTrial(script, folder, delays[index]).run()
            return delays[index], code, left, err

        # Three hosts at a time keep the wall time down (and the machine busy, which is the point).
        with concurrent.futures.ThreadPoolExecutor(max_workers=3, thread_name_prefix="trial") as pool:
            results = list(pool.map(trial, range(len(delays))))
        failed = [
            f"SIGTERM at {delay:.2f} s: exit code {code}, still running {left}\n{err[-3000:]}"
            for delay, code, left, err in results
            if code != 0 or left
        ]
        assert not failed, f"{len(results) - len(failed)}/{len(results)} runs exited 0 with nothing left:\n" + (
            "\n".join(failed)
        )
