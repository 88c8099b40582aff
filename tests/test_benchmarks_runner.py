"""``python -m benchmarks``: finds the scripts, runs each, gathers every target into one summary.

The runner is pointed at a folder of tiny stand-in scripts (its hidden ``--dir``), so
no real benchmark runs here: one stores targets (met, missed, not measured), one
fails, and one starting with ``_`` is a helper that must never run.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

from tests.conftest import PROJECT_ROOT
from tests.subproc import python

GOOD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from _shared import TARGETS  # a helper beside it, imported by plain name as benchmarks/_common.py is

    out = Path(__file__).resolve().parent / "results" / "good-result.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"benchmark": "good", "argv": sys.argv[1:], "targets": TARGETS}))
    print("good ran")
    """
)

SHARED = textwrap.dedent(
    """
    from pathlib import Path

    Path(__file__).with_name("helper-was-imported").touch()
    TARGETS = [
        {"name": "start ratio", "value": 1.2, "op": "<=", "limit": 2.0, "unit": "x", "met": True},
        {"name": "rate", "value": 900.0, "op": ">=", "limit": 1000.0, "unit": " msg/s", "met": False},
        {"name": "spawn case", "value": None, "op": "<=", "limit": 1.5, "unit": "x", "met": None},
    ]
    if __name__ == "__main__":
        Path(__file__).with_name("helper-was-run").touch()
    """
)

BROKEN = "raise SystemExit(3)\n"


def make_scripts(folder: Path) -> None:
    (folder / "good.py").write_text(GOOD, encoding="utf-8")
    (folder / "_shared.py").write_text(SHARED, encoding="utf-8")
    (folder / "broken.py").write_text(BROKEN, encoding="utf-8")


def test_list_names_every_script_but_the_helpers(spawn, tmp_path) -> None:
    make_scripts(tmp_path)
    program = spawn(python("-m", "benchmarks", "--dir", tmp_path, "--list", "--quick"), cwd=PROJECT_ROOT)
    assert program.wait() == 0, program.output
    lines = program.output.splitlines()
    assert [line.split()[0] for line in lines] == ["broken", "good"]
    assert lines[1].endswith("good.py --quick")
    assert not (tmp_path / "helper-was-imported").exists()


def test_the_real_scripts_are_found_without_running_them(spawn, tmp_path) -> None:
    program = spawn(python("-m", "benchmarks", "--list"), cwd=PROJECT_ROOT)
    assert program.wait() == 0, program.output
    listed = {line.split()[0] for line in program.output.splitlines()}
    expected = {p.stem for p in (Path(PROJECT_ROOT) / "benchmarks").glob("*.py") if not p.name.startswith("_")}
    assert listed == expected
    assert {"process", "lifecycle", "di", "probe", "gc_pause"} <= listed


def test_a_run_tables_every_target_writes_the_summary_and_fails_for_a_script_that_failed(spawn, tmp_path) -> None:
    make_scripts(tmp_path)
    program = spawn(python("-m", "benchmarks", "--dir", tmp_path, "--quick"), cwd=PROJECT_ROOT)
    assert program.wait(60) == 1, program.output
    out = program.output
    assert "good ran" in out
    assert not (tmp_path / "helper-was-run").exists()
    table = out[out.index("script  ") :]
    rows = [re.split(r"\s{2,}", line) for line in table.splitlines()[2:] if line.startswith(("good.py", "broken.py"))]
    verdicts = {(cells[0], cells[1]): cells[-1] for cells in rows}
    assert verdicts == {
        ("broken.py", "(did not run to the end: exit code 3)"): "FAILED",
        ("good.py", "start ratio"): "met",
        ("good.py", "rate"): "NOT met",
        ("good.py", "spawn case"): "not measured",
    }
    assert "1.2x" in table and ">= 1,000 msg/s" in table
    summary = json.loads((tmp_path / "results" / "summary.json").read_text(encoding="utf-8"))
    assert summary["quick"] is True
    by_script = {s["script"]: s for s in summary["scripts"]}
    assert by_script["broken.py"]["status"] == "failed" and by_script["broken.py"]["exit_code"] == 3
    good = by_script["good.py"]
    assert (good["status"], good["result_files"]) == ("ran", ["good-result.json"])
    assert [t["name"] for t in good["targets"]] == ["start ratio", "rate", "spawn case"]
    assert summary["counts"] == {"met": 1, "NOT met": 1, "not measured": 1, "FAILED": 1}
    assert json.loads((tmp_path / "results" / "good-result.json").read_text())["argv"] == ["--quick"]
    markdown = (tmp_path / "results" / "summary.md").read_text(encoding="utf-8")
    assert "| good.py | rate | 900 msg/s | >= 1,000 msg/s | NOT met |" in markdown


def test_a_missed_target_alone_is_no_failure(spawn, tmp_path) -> None:
    make_scripts(tmp_path)
    (tmp_path / "broken.py").unlink()
    program = spawn(python("-m", "benchmarks", "--dir", tmp_path), cwd=PROJECT_ROOT)
    assert program.wait(60) == 0, program.output
    assert "NOT met" in program.output
