"""One harness for the tests that run a real program: a host script, an example, gunicorn, `hostkit run`.

The program runs in its own session (``start_new_session=True``), as a service manager
would start it: signals sent to its process group reach it and its children only, and
whatever it leaves behind is found by session id and killed by pid. Its output goes to
files, not pipes, so no reader thread can leak and a program that prints a lot never
blocks on a full pipe; the files are read again on every look.

Typical use, through the ``spawn`` fixture of ``tests/conftest.py`` (which closes every
program it started at teardown)::

    program = spawn(python(script), cwd=tmp_path)
    program.wait_for_output("READY")
    program.signal_group(signal.SIGINT)
    assert program.wait() == 0, program.output
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import psutil
import pytest

from tests.conftest import PROJECT_ROOT, wait_until

# A parent's systemd or journald variables would make the program talk to the real ones.
SERVICE_MANAGER_VARIABLES = ("NOTIFY_SOCKET", "JOURNAL_STREAM")

_numbers = itertools.count(1)


def python(*args: str | os.PathLike[str]) -> list[str]:
    """The argv that runs ``args`` with the interpreter running the tests."""
    return [sys.executable, *(str(a) for a in args)]


def mask_pids(text: str) -> str:
    """Log lines with ``| PID |`` in place of the process id, so they can be compared as text."""
    return re.sub(r"\| \d+ \|", "| PID |", text)


def session_members(sid: int) -> list[int]:
    """Every live (non-zombie) process of session ``sid``: the program, its children, a fork server..."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return members


class Program:
    """A program started in its own session, its stdout and stderr in files under ``folder``.

    ``stderr="merge"`` puts both streams in one file (``output``), ``"separate"`` keeps
    stderr apart (``err``), ``"devnull"`` drops it; ``stdout=False`` drops stdout. ``env``
    replaces the environment (default: this process's), ``unset`` removes names from it
    (by default the service manager's, so the program never talks to a real systemd),
    ``extra_env`` adds some. ``PYTHONUNBUFFERED=1`` is always set: a line printed is a
    line in the file at once.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str] = PROJECT_ROOT,
        folder: str | os.PathLike[str],
        stderr: str = "merge",
        stdout: bool = True,
        env: dict[str, str] | None = None,
        unset: Sequence[str] = SERVICE_MANAGER_VARIABLES,
        **extra_env: str,
    ) -> None:
        if stderr not in ("merge", "separate", "devnull"):
            raise ValueError(f"stderr must be 'merge', 'separate' or 'devnull', not {stderr!r}")
        if not stdout and stderr == "merge":
            raise ValueError("stdout=False needs stderr='separate' or 'devnull': nothing would be kept")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        environment = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1", **extra_env)
        for name in unset:
            environment.pop(name, None)
        stem = f"program-{next(_numbers)}"  # unique: several programs may share a folder
        self.out_path = self.folder / f"{stem}.out"
        self.err_path = self.folder / f"{stem}.err"
        # Closed in close(), once the program has ended.
        out = open(self.out_path, "wb")
        self._files: list[IO[bytes]] = [out]
        err: IO[bytes] | int
        if stderr == "separate":
            err = open(self.err_path, "wb")
            self._files.append(err)
        else:
            err = subprocess.STDOUT if stderr == "merge" else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=out if stdout else subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        except BaseException:
            self._close_files()
            raise
        self.pid = self.proc.pid  # also its session id and process group id

    # -- what it printed --------------------------------------------------------------------

    @property
    def output(self) -> str:
        """Everything printed to stdout so far (stderr too with ``stderr="merge"``)."""
        return self.out_path.read_text(encoding="utf-8", errors="replace")

    @property
    def err(self) -> str:
        """Everything printed to stderr so far (``stderr="separate"`` only)."""
        return self.err_path.read_text(encoding="utf-8", errors="replace") if self.err_path.exists() else ""

    def mark(self) -> int:
        """A position in ``output``: ``output_since(mark)`` is what was printed after it."""
        return len(self.output)

    def output_since(self, mark: int) -> str:
        return self.output[mark:]

    def describe(self) -> str:
        """Exit code and output, for assertion messages."""
        text = f"exit code {self.proc.poll()}; output:\n{self.output}"
        if self.err_path.exists():
            text += f"\nstderr:\n{self.err}"
        return text

    # -- waiting ------------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], object], timeout: float = 30, what: str = "the condition") -> None:
        """Wait until ``predicate()`` is true while the program runs; fail, with its output, if it
        exits first or ``timeout`` passes."""
        wait_until(lambda: predicate() or self.proc.poll() is not None, timeout=timeout, interval=0.02)
        if not predicate():
            when = "before the program exited" if self.proc.poll() is not None else f"within {timeout} s"
            pytest.fail(f"{what} did not happen {when}; {self.describe()}")

    def wait_for_output(self, *fragments: str, timeout: float = 30, stream: str = "output") -> None:
        """Wait until every fragment has been printed (to ``output``, or to ``err``)."""

        def printed() -> bool:
            text = self.err if stream == "err" else self.output
            return all(f in text for f in fragments)

        self.wait_for(printed, timeout, what=f"printing {list(fragments)!r}")

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 30) -> int:
        """The exit code; fail the test, with the output, if the program does not exit in time."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the program did not exit within {timeout} s; {self.describe()}")

    # -- signals ------------------------------------------------------------------------------

    def signal(self, signum: int) -> None:
        """Send to the program's own process only."""
        os.kill(self.pid, signum)

    def signal_group(self, signum: int) -> None:
        """Send to its whole process group, as a terminal's Ctrl+C or systemd's control-group kill does."""
        os.killpg(self.pid, signum)

    def session_members(self) -> list[int]:
        """Live processes of its session: after it exits, anything it forgot to stop."""
        return session_members(self.pid)

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Kill whatever is left of the session, by pid; reap the program; close the files."""
        for pid in self.session_members():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._close_files()

    def _close_files(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> Program:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
