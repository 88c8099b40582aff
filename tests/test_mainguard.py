"""A main module that runs its host when imported: the child's failure says "guard the host".

Under spawn and forkserver a child process imports the main module again. A script
without ``if __name__ == "__main__":`` then starts a second host in that process,
and multiprocessing refuses the second host's child with its own "bootstrapping
phase" message. hostkit puts one line next to it that names the fix.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.subproc import python

UNGUARDED = textwrap.dedent(
    """
    from loguru import logger

    from hostkit import BackgroundService, HostBuilder, HostOptions


    class Loop(BackgroundService):
        def execute(self, stopping):
            while not stopping.wait(0.2):
                logger.info("tick")


    builder = HostBuilder(options=HostOptions(start_method=START_METHOD))
    builder.services.add_hosted_service(Loop, placement="process")
    raise SystemExit(builder.build().run())
    """
)

HINT = (
    "guard the host with if __name__ == '__main__': this process is importing the main module again to start "
    "a child process (start method spawn or forkserver), and that module builds and runs a host when imported"
)
MULTIPROCESSING_SAYS = "An attempt has been made to start a new process before the"


class TestUnguardedMainModule:
    @pytest.mark.timeout(120)
    @pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
    def test_the_hint_stands_next_to_multiprocessings_message(self, spawn, start_method: str, tmp_path: Path) -> None:
        """The script fails (exit 1), and the line before multiprocessing's message says to guard the host."""
        script = tmp_path / "unguarded.py"
        script.write_text(UNGUARDED.replace("START_METHOD", repr(start_method)), encoding="utf-8")
        program = spawn(python(script.name), cwd=tmp_path)
        code = program.wait(timeout=60)
        output = program.output
        assert code == 1, output
        lines = output.splitlines()
        # One record: the failure of the second host's service, the hint first, then multiprocessing's text.
        failures = [i for i, line in enumerate(lines) if "Background service 'Loop' failed: RuntimeError: " in line]
        assert len(failures) == 1, output
        assert lines[failures[0]].endswith(f"failed: RuntimeError: {HINT}"), output
        assert MULTIPROCESSING_SAYS in lines[failures[0] + 1], output
        assert wait_until(lambda: not program.session_members(), timeout=10)

    def test_no_hint_outside_a_re_import(self) -> None:
        """Any other RuntimeError of a start, and any other error, gets no hint."""
        from hostkit._process.mainguard import explain_main_reimport

        assert explain_main_reimport(RuntimeError("something else")) is None
        assert explain_main_reimport(OSError("no more processes")) is None
