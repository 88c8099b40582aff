"""Every ``examples/*.py`` runs as a real program: started, stopped by a signal, checked.

Each example is run as its own process (``sys.executable``, its own session, cwd
the repository root), exactly as the README tells a user to run it. The test waits
until the example has printed every line of its ``ready`` list (so its services
really ran), sends the signal, and checks the exit code, the lines printed after
the signal, and that nothing of the example's session is left running.

Add an entry to :data:`EXAMPLES` for every new example: a test fails while an
example file has none.
"""

from __future__ import annotations

import importlib.util
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostkit import ExitCode
from tests.conftest import PROJECT_ROOT, wait_until
from tests.subproc import Program, python

EXAMPLES_DIR = Path(PROJECT_ROOT) / "examples"


@dataclass(frozen=True)
class Expect:
    """What one example must print and how it must end.

    Attributes:
        ready: fragments that must all appear before the signal is sent; they
            show the example's services really ran.
        after_stop: fragments that must all appear after the signal; ``{signal}``
            is replaced by the signal's name (``SIGTERM``).
        signals: the signals the example is stopped with, one run each, sent to its pid.
        group_signals: signals sent to the example's whole process group instead, one
            run each: Ctrl+C in a terminal (SIGINT) and systemd's default
            ``KillMode=control-group`` (SIGTERM) reach every process, children too.
        exit_code: the exit code expected after the stop.
        forbid: fragments that must appear nowhere in the output.
        requires: modules the example imports; it is skipped when one is missing.
        ready_timeout: seconds allowed to become ready (generous: a loaded 2-core machine).
    """

    ready: tuple[str, ...]
    after_stop: tuple[str, ...]
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)
    group_signals: tuple[signal.Signals, ...] = ()
    exit_code: int = 0
    forbid: tuple[str, ...] = ("Traceback", "| ERROR ", "| CRITICAL ")
    requires: tuple[str, ...] = ()
    ready_timeout: float = 30.0


EXAMPLES: dict[str, Expect] = {
    "worker.py": Expect(
        ready=(
            "Cache warmed: 250 prices loaded",
            "Host started",
            "Report 1: 250 prices cached",
            "Handled job 1",
        ),
        after_stop=(
            "Received {signal}; stopping the host",
            "Background service 'Reporter' stopped",
            "Background service 'InboxPoller' stopped",
            "Cache cleared",
            "Host stopped in",
            "(exit code 0)",
        ),
        # The README promises both: Ctrl+C (SIGINT) and `kill -TERM <pid>`.
        signals=(signal.SIGTERM, signal.SIGINT),
        group_signals=(signal.SIGINT,),
    ),
    "cpu_heavy.py": Expect(
        ready=("Host started", "PrimeCounter: 2262 primes below 20,000", "primes below 120,000"),
        after_stop=(
            "Received {signal}; stopping the host",
            "PrimeCounter: stopping after",
            "Background service 'PrimeCounter' stopped",
            "(exit code 0)",
        ),
        # Its service runs in a child process: a signal to the whole group (Ctrl+C,
        # systemd's stop) reaches the child too, and must still be a clean stop.
        signals=(signal.SIGTERM, signal.SIGINT),
        group_signals=(signal.SIGINT, signal.SIGTERM),
    ),
    "flask_app.py": Expect(
        ready=(
            "Serving on http://127.0.0.1:",
            "is serving",
            "(once per deployment)",
            "POST /jobs?n=3 -> 202",
            "Handled job 3 in worker",
        ),
        after_stop=("Stopping: server first, then the host", "Stopped; channel:", "'closed': True"),
        requires=("flask",),
    ),
    "gunicorn.conf.py": Expect(
        ready=(
            "Listening at: http://127.0.0.1:",
            "Booting worker with pid",
            "is serving",
            "(once per deployment)",
        ),
        after_stop=("Handling signal: term", "Worker exiting", "Shutting down: Master"),
        forbid=("Traceback", "[ERROR]", "[CRITICAL]", "| ERROR ", "| CRITICAL "),
        requires=("flask", "gunicorn"),
    ),
    "probe_worker.py": Expect(
        ready=("Health probe listening on http://127.0.0.1:", "Host started", "Ticker: tick 3"),
        after_stop=(
            "Received {signal}; stopping the host",
            "Background service 'Ticker' stopped",
            "Host stopped in",
            "(exit code 0)",
        ),
    ),
    "sqlalchemy_scope.py": Expect(
        ready=("Database: ", "Host started", "Unit of work 4 failed", "rolled back", "Unit of work 5: wrote 3 orders"),
        after_stop=(
            "Received {signal}; stopping the host",
            "Background service 'OrderWriter' stopped",
            "Summary: ",
            "Engine disposed",
            "(exit code 0)",
        ),
        requires=("sqlalchemy",),
    ),
}


#: Examples that are whole projects (a directory, not one script) are run by the
#: test file of their integration; each must be named there.
PROJECT_EXAMPLES: dict[str, str] = {
    "django_project": "tests/test_django.py",
    "hybrid": "tests/test_queue_hybrid.py",
}


def example_dirs() -> list[str]:
    return sorted(p.name for p in EXAMPLES_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def example_files() -> list[str]:
    return sorted(p.name for p in EXAMPLES_DIR.glob("*.py") if not p.name.startswith("_"))


def _cases() -> list[object]:
    cases = []
    for name in example_files():
        expect = EXAMPLES.get(name)
        for sig in expect.signals if expect else (signal.SIGTERM,):
            cases.append(pytest.param(name, sig, False, id=f"{name}-{sig.name}"))
        for sig in expect.group_signals if expect else ():
            cases.append(pytest.param(name, sig, True, id=f"{name}-{sig.name}-group"))
    return cases


def run_and_stop(example: Program, expect: Expect, sig: signal.Signals, label: str, *, group: bool = False) -> None:
    """Wait for readiness, send ``sig`` (to the process group if ``group``), check exit code, output, leftovers."""
    example.wait_for_output(*expect.ready, timeout=expect.ready_timeout)
    assert example.running(), f"{label} exited before the signal; {example.describe()}"
    mark = example.mark()
    if group:
        example.signal_group(sig)
    else:
        example.signal(sig)
    code = example.wait(timeout=30)
    after = tuple(f.format(signal=sig.name) for f in expect.after_stop)
    output = example.output
    assert code == expect.exit_code, f"{label} exited with {code} after {sig.name}:\n{output}"
    absent = [f for f in after if f not in example.output_since(mark)]
    assert not absent, f"{label} did not print {absent} after {sig.name}. Output:\n{output}"
    found = [f for f in expect.forbid if f in output]
    assert not found, f"{label} printed {found}. Output:\n{output}"
    # Nothing of the example may outlive it: no orphaned child process.
    assert wait_until(lambda: not example.session_members(), timeout=10), (
        f"{label} left processes running after exit: {example.session_members()}"
    )


class TestEveryExampleIsExercised:
    def test_every_example_file_has_an_entry(self) -> None:
        """Each examples/*.py has an EXAMPLES entry, so none goes untested."""
        missing = [name for name in example_files() if name not in EXAMPLES]
        assert not missing, f"examples without an EXAMPLES entry in tests/test_examples.py: {missing}"

    def test_every_project_example_is_run_by_a_test(self) -> None:
        """Each project under examples/ is listed in PROJECT_EXAMPLES, and that test file runs it."""
        unlisted = [name for name in example_dirs() if name not in PROJECT_EXAMPLES]
        assert not unlisted, f"example projects without a PROJECT_EXAMPLES entry in tests/test_examples.py: {unlisted}"
        for name in example_dirs():
            test_file = Path(PROJECT_ROOT) / PROJECT_EXAMPLES[name]
            assert test_file.is_file(), f"examples/{name}/ is said to be run by {test_file}, which does not exist"
            assert f"examples/{name}" in test_file.read_text(encoding="utf-8").replace('" / "', "/"), (
                f"{PROJECT_EXAMPLES[name]} does not mention examples/{name}"
            )

    def test_every_entry_names_an_existing_example(self) -> None:
        """An EXAMPLES entry whose file was renamed or removed is reported, not silently skipped."""
        stale = sorted(set(EXAMPLES) - set(example_files()))
        assert not stale, f"EXAMPLES entries without a file in examples/: {stale}"


class TestExamplesRun:
    @pytest.mark.timeout(120)
    @pytest.mark.parametrize(("name", "sig", "group"), _cases())
    def test_example_stops_cleanly_on_signal(self, spawn, name: str, sig: signal.Signals, group: bool) -> None:
        """The example starts its services, and on the signal stops them, says so and exits with its code."""
        expect = EXAMPLES.get(name)
        if expect is None:
            pytest.fail(f"examples/{name} has no EXAMPLES entry in tests/test_examples.py")
        missing = [m for m in expect.requires if importlib.util.find_spec(m) is None]
        if missing:
            pytest.skip(f"examples/{name} needs {', '.join(missing)}")
        example = spawn(python(EXAMPLES_DIR / name))
        run_and_stop(example, expect, sig, f"examples/{name}", group=group)

    @pytest.mark.timeout(120)
    def test_worker_runs_under_hostkit_run(self, spawn) -> None:
        """The demo also runs as a worker service: `hostkit run examples.worker:create_builder`, stopped by SIGTERM."""
        expect = EXAMPLES["worker.py"]
        argv = [sys.executable, "-m", "hostkit", "run", "examples.worker:create_builder"]
        example = spawn(argv)
        run_and_stop(example, expect, signal.SIGTERM, "hostkit run examples.worker:create_builder")


README = Path(PROJECT_ROOT) / "README.md"
DEMO_COMMAND = "python3 -m pip install . && python3 examples/worker.py"
TEST_COMMAND = "python3 -m pip install tox && python3 -m tox"


def exit_code_table(path: Path) -> dict[int, str]:
    """``{code: name}`` from the rows of a Markdown table like ``| 0 | `OK` | ... |``."""
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*`(\w+)`\s*\|", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {int(code): name for code, name in rows}


class TestReadmePromises:
    def test_first_screen_gives_the_demo_and_test_commands(self) -> None:
        """The README's first screen has the two commands: install + demo, install + whole suite."""
        first_screen = "\n".join(README.read_text(encoding="utf-8").splitlines()[:25])
        assert DEMO_COMMAND in first_screen
        assert TEST_COMMAND in first_screen
        assert (EXAMPLES_DIR / "worker.py").is_file()
        assert "worker.py" in EXAMPLES, "the README's demo must be exercised by TestExamplesRun"

    def test_ci_runs_the_readme_test_command(self) -> None:
        """.ci/run runs exactly the test command the README gives users."""
        ci = (Path(PROJECT_ROOT) / ".ci" / "run").read_text(encoding="utf-8")
        commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        assert any(line.endswith(TEST_COMMAND.split("&&")[-1].strip()) for line in commands), commands
        assert any("pip install" in line and "tox" in line for line in commands), commands

    @pytest.mark.parametrize("page", ["README.md", "docs/lifecycle.md"])
    def test_exit_code_tables_match_exit_code(self, page: str) -> None:
        """The exit-code tables users read list exactly hostkit.ExitCode's codes and names."""
        assert exit_code_table(Path(PROJECT_ROOT) / page) == {int(m): m.name for m in ExitCode}

    @pytest.mark.timeout(120)
    def test_readme_code_example_runs_and_stops_on_ctrl_c(self, spawn, tmp_path: Path) -> None:
        """The README's Python example runs as written and exits 0 on Ctrl+C (SIGINT)."""
        blocks = re.findall(
            r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE
        )
        assert blocks, "the README has no ```python example"
        script = tmp_path / "readme_example.py"
        script.write_text(blocks[0], encoding="utf-8")
        expect = Expect(
            ready=("cache warmed", "Host started", "flushed"),
            after_stop=("Received SIGINT", "Background service 'Flush' stopped", "(exit code 0)"),
        )
        run_and_stop(spawn(python(script)), expect, signal.SIGINT, "the README's example")
