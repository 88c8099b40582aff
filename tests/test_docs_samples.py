"""The ```python samples in docs/ that are marked runnable run as typed.

A sample is marked runnable by an HTML comment on the line just before its fence
(invisible on GitHub and in the Sphinx build, whose ``-W`` accepts it)::

    <!-- runnable -->
    <!-- runnable file="sharing.py" stop-after="Report 1: 250 prices" expect="..." forbid="..." -->

* ``file``: blocks of one page with the same file name are one program, joined in
  page order, as a reader typing them into that file would; a block without it is a
  program on its own.
* ``stop-after``: the program runs a host until it is stopped; once its output shows
  this text, the test sends SIGTERM (as ``kill`` or systemd would), and the program
  must then exit with code 0. Without it, the program must exit with 0 by itself.
* ``expect`` / ``forbid``: text its output must / must not contain (repeatable).
  Tracebacks and ERROR or CRITICAL lines are always forbidden.

Each program is written to a temporary directory and run there as a real script
(``sys.executable program.py``, so it is ``__main__`` and process placement
re-imports it as a child would), in its own session, within a time limit; nothing
of its session may outlive it. Before it runs, every name it uses (also inside
functions that a short run may never reach) must be defined or imported in it.

Unmarked blocks are fragments: they may use names from the text around them. Every
block still has to be valid Python, and none may build or run a host at import
time: process placement re-imports the main module, so that belongs under
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import ast
import builtins
import re
import signal
import subprocess
import symtable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import subproc
from tests.conftest import PROJECT_ROOT, wait_until

DOCS = Path(PROJECT_ROOT) / "docs"

#: Pages that show whole programs: each must keep at least one runnable sample, so
#: that removing the markers cannot quietly turn the test into a no-op.
PAGES_WITH_PROGRAMS = ("getting-started.md", "process-placement.md")

MARKER = re.compile(r"^\s*<!--\s*runnable\b(?P<attrs>.*?)-->\s*$")
ATTR = re.compile(r'\s*(?P<key>[a-z][a-z-]*)="(?P<value>[^"]*)"')
KEYS = ("file", "stop-after", "expect", "forbid")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[^\s`]*)")
ALWAYS_FORBIDDEN = ("Traceback", "| ERROR ", "| CRITICAL ")
#: Seconds a program may take to show its stop-after text (or to end by itself), and to
#: exit after SIGTERM: generous, for a loaded 2-core machine.
READY_TIMEOUT = 60.0
EXIT_TIMEOUT = 30.0


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: dict[str, list[str]] | None  # None: not marked runnable

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


@dataclass
class Program:
    page: str
    name: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def source(self) -> str:
        return "\n\n".join(b.code for b in self.blocks)

    def values(self, key: str) -> list[str]:
        return [v for b in self.blocks for v in (b.marker or {}).get(key, [])]

    @property
    def where(self) -> str:
        return f"docs/{self.page} ({self.name}, blocks at lines {', '.join(str(b.line) for b in self.blocks)})"


class MarkerError(ValueError):
    pass


def parse_marker(text: str, where: str) -> dict[str, list[str]]:
    attrs = MARKER.match(text)
    assert attrs is not None
    rest = attrs.group("attrs")
    found: dict[str, list[str]] = {}
    pos = 0
    for m in ATTR.finditer(rest):
        if rest[pos : m.start()].strip():
            break
        if m.group("key") not in KEYS:
            msg = f"{where}: unknown key {m.group('key')!r} in a runnable marker; known: {', '.join(KEYS)}"
            raise MarkerError(msg)
        found.setdefault(m.group("key"), []).append(m.group("value"))
        pos = m.end()
    if rest[pos:].strip():
        msg = f'{where}: cannot read {rest[pos:].strip()!r} in a runnable marker; write key="value" pairs'
        raise MarkerError(msg)
    if len(found.get("file", [])) > 1 or len(found.get("stop-after", [])) > 1:
        msg = f"{where}: file= and stop-after= may be given once per marker"
        raise MarkerError(msg)
    return found


def page_blocks(path: Path) -> list[Block]:
    """Every fenced block of a page, with the runnable marker just before it, if any."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            if MARKER.match(lines[i]) and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
                msg = f"docs/{path.name}:{i + 1}: a runnable marker must be the line just before a ```python fence"
                raise MarkerError(msg)
            i += 1
            continue
        indent = opening.group("indent")
        end = i + 1
        while end < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[end]):
            end += 1
        body = [line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : end]]
        marker = None
        where = f"docs/{path.name}:{i + 1}"
        if i > 0 and MARKER.match(lines[i - 1]):
            if opening.group("lang") != "python":
                msg = f"{where}: a runnable marker stands before a ```{opening.group('lang')} block; only python runs"
                raise MarkerError(msg)
            marker = parse_marker(lines[i - 1], where)
        blocks.append(Block(path.name, i + 1, opening.group("lang"), "\n".join(body) + "\n", marker))
        i = end + 1
    return blocks


def all_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def programs() -> list[Program]:
    found: dict[tuple[str, str], Program] = {}
    for path in all_pages():
        for block in page_blocks(path):
            if block.marker is None:
                continue
            name = (block.marker.get("file") or [f"{path.stem}_line{block.line}.py"])[0]
            found.setdefault((path.name, name), Program(path.name, name)).blocks.append(block)
    return list(found.values())


# -- names: a small, static "is every name defined?" ---------------------------------

_ALWAYS_THERE = set(dir(builtins)) | {"__name__", "__file__", "__doc__", "__builtins__", "__spec__"}


def undefined_names(source: str, filename: str) -> list[str]:
    """Names the program reads but never defines or imports (at any depth of functions and classes)."""
    top = symtable.symtable(source, filename, "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()} | _ALWAYS_THERE
    missing: set[str] = set()

    def visit(table: symtable.SymbolTable) -> None:
        for symbol in table.get_symbols():
            at_module = table is top and not symbol.is_assigned() and not symbol.is_imported()
            global_read = table is not top and symbol.is_global()
            if symbol.is_referenced() and (at_module or global_read) and symbol.get_name() not in defined:
                missing.add(symbol.get_name())
        for child in table.get_children():
            visit(child)

    visit(top)
    return sorted(missing)


# -- the host guard --------------------------------------------------------------------


def _is_main_guard(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators)
    )


def unguarded_host_calls(source: str) -> list[str]:
    """``.build()`` / ``.run()`` calls that run when the module is imported (outside the ``__main__`` guard)."""
    found = []
    for statement in ast.parse(source).body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or _is_main_guard(statement):
            continue
        for node in ast.walk(statement):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("build", "run")
            ):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


# -- running -------------------------------------------------------------------------


def run_program(program: Program, directory: Path) -> None:
    script = directory / program.name
    script.write_text(program.source, encoding="utf-8")
    stop_after = program.values("stop-after")
    unset = ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")
    with subproc.Program(subproc.python(script.name), cwd=directory, folder=directory, unset=unset) as running:
        if stop_after:
            running.wait_for_output(stop_after[0], timeout=READY_TIMEOUT)
            assert running.running(), f"{program.where} exited before it was stopped; {running.describe()}"
            running.signal(signal.SIGTERM)
            limit = EXIT_TIMEOUT
        else:
            limit = READY_TIMEOUT
        try:
            code = running.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            hint = "" if stop_after else ' (if it runs a host until stopped, give its marker stop-after="...")'
            pytest.fail(f"{program.where} did not exit within {limit:g} s{hint}. Output:\n{running.output}")
        output = running.output
        assert code == 0, f"{program.where} exited with {code}. Output:\n{output}"
        missing = [text for text in program.values("expect") if text not in output]
        assert not missing, f"{program.where} did not print {missing}. Output:\n{output}"
        forbidden = [t for t in (*ALWAYS_FORBIDDEN, *program.values("forbid")) if t in output]
        assert not forbidden, f"{program.where} printed {forbidden}. Output:\n{output}"
        assert wait_until(lambda: not running.session_members(), timeout=10), (
            f"{program.where} left processes running after it exited: {running.session_members()}"
        )


# -- the tests -----------------------------------------------------------------------


def _program_params() -> list[object]:
    try:
        return [pytest.param(p, id=f"{p.page}:{p.name}") for p in programs()]
    except MarkerError as err:  # reported by TestMarkers; collection itself must not break
        return [pytest.param(None, id="markers-unreadable", marks=pytest.mark.skip(reason=str(err)))]


class TestMarkers:
    def test_markers_are_readable(self) -> None:
        """Every runnable marker stands just before a ```python fence and has only known keys."""
        for path in all_pages():
            page_blocks(path)  # raises MarkerError naming the page and line

    @pytest.mark.parametrize("page", PAGES_WITH_PROGRAMS)
    def test_pages_with_programs_keep_runnable_samples(self, page: str) -> None:
        """A page that shows whole programs has at least one marked runnable (so this test runs them)."""
        count = sum(block.marker is not None for block in page_blocks(DOCS / page))
        assert count >= 1, f"docs/{page} shows whole programs but none is marked <!-- runnable -->"


class TestEveryPythonBlock:
    @pytest.mark.parametrize("path", all_pages(), ids=lambda p: p.name)
    def test_blocks_parse_and_guard_the_host(self, path: Path) -> None:
        """Each ```python block is valid Python, and none builds or runs a host when imported."""
        for block in page_blocks(path):
            if block.lang != "python":
                continue
            try:
                calls = unguarded_host_calls(block.code)
            except SyntaxError as err:
                pytest.fail(f"{block.where}: not valid Python: {err}")
            assert not calls, (
                f"{block.where}: builds or runs a host at import time ({'; '.join(calls)}); put it under "
                f'`if __name__ == "__main__":` (process placement imports the main module again)'
            )


class TestRunnableSamples:
    @pytest.mark.parametrize("program", _program_params())
    def test_every_name_is_defined(self, program: Program) -> None:
        """A runnable program defines or imports every name it uses, also in code a short run never reaches."""
        missing = undefined_names(program.source, program.name)
        assert not missing, f"{program.where} uses names it never defines or imports: {missing}"

    @pytest.mark.timeout(150)
    @pytest.mark.parametrize("program", _program_params())
    def test_runs_as_typed(self, program: Program, tmp_path: Path) -> None:
        """The program runs as a script (as __main__); a host it runs stops on SIGTERM with exit code 0."""
        run_program(program, tmp_path)
