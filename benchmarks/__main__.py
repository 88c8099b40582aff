"""Run every benchmark and print one table of all their targets: ``python -m benchmarks``.

Every ``*.py`` file of this folder whose name does not start with ``_`` is a
benchmark script; a new one joins without an edit here. Each runs as a subprocess
(``python benchmarks/<name>.py``, from the repository root, so that this folder is
its ``sys.path[0]`` as when it is run by hand), with ``--quick`` when this command
has it, one after another so that they do not compete for the machine. Their own
output streams through.

A script stores its targets under ``"targets"`` in the JSON result it writes to
``benchmarks/results/`` (``_common.report_targets``). The result files a script
wrote are found by what changed in that folder while it ran, so a script may name
its file as it likes. The table lists every target of every script (script,
target, value, limit, met / NOT met / not measured), and is written with the
scripts' exit codes and run times to ``benchmarks/results/summary.json`` and, as
markdown, ``summary.md``.

The exit code is 1 if a script failed to run (a non-zero exit, or no result file
written), and 0 otherwise: a missed target is a finding, shown in the table, not a
failure of the run.

    python -m benchmarks              # every script's full run (about 15 minutes)
    python -m benchmarks --quick      # every script with --quick
    python -m benchmarks --list       # the scripts and the commands, nothing run
    python -m benchmarks --only process,di --quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


def discover(folder: Path) -> list[Path]:
    """The benchmark scripts of ``folder``: every ``*.py`` not starting with ``_``, by name."""
    return sorted(p for p in folder.glob("*.py") if not p.name.startswith("_"))


def command(script: Path, quick: bool) -> list[str]:
    return [sys.executable, str(script), *(["--quick"] if quick else [])]


def _snapshot(results: Path) -> dict[Path, int]:
    if not results.is_dir():
        return {}
    return {p: p.stat().st_mtime_ns for p in results.glob("*.json") if p.name != SUMMARY_JSON}


def run_one(script: Path, quick: bool, results: Path, cwd: Path) -> dict[str, Any]:
    """Run one script; what it wrote to ``results`` and the targets stored there."""
    before = _snapshot(results)
    print(f"\n=== {script.name} {'--quick ' if quick else ''}===", flush=True)
    began = time.monotonic()
    try:
        code = subprocess.run(command(script, quick), cwd=cwd, check=False).returncode
    except OSError as err:  # could not even be started
        print(f"{script.name} could not be started: {err}", file=sys.stderr)
        code = None
    took = time.monotonic() - began
    written = sorted(p for p, mtime in _snapshot(results).items() if before.get(p) != mtime)
    targets: list[dict[str, Any]] = []
    unreadable: list[str] = []
    for path in written:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            unreadable.append(f"{path.name}: {err}")
            continue
        stored = data.get("targets") if isinstance(data, dict) else None
        if isinstance(stored, list):
            targets.extend(t for t in stored if isinstance(t, dict))
    if code != 0:
        status = "failed" if code is not None else "not started"
    elif not written:
        status = "no result file"
    elif unreadable:
        status = "unreadable result"
    else:
        status = "ran"
    return {
        "script": script.name,
        "command": command(script, quick)[1:],
        "exit_code": code,
        "seconds": round(took, 1),
        "status": status,
        "result_files": [p.name for p in written],
        "unreadable": unreadable,
        "targets": targets,
    }


def verdict(target: dict[str, Any]) -> str:
    return {True: "met", False: "NOT met"}.get(target.get("met"), "not measured")


def _number(value: Any, unit: str = "") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return shown + unit


def table_rows(runs: list[dict[str, Any]]) -> list[tuple[str, str, str, str, str]]:
    """(script, target, value, limit, verdict) for every target; one row for a script that failed or stored none."""
    rows = []
    for run in runs:
        if run["status"] != "ran":
            what = f"exit code {run['exit_code']}" if run["exit_code"] not in (0, None) else run["status"]
            rows.append((run["script"], f"(did not run to the end: {what})", "-", "-", "FAILED"))
            continue
        if not run["targets"]:
            rows.append((run["script"], "(no targets stored)", "-", "-", "not measured"))
        for t in run["targets"]:
            unit = str(t.get("unit", ""))
            limit = f"{t.get('op', '<=')} {_number(t.get('limit'), unit)}"
            rows.append((run["script"], str(t.get("name", "?")), _number(t.get("value"), unit), limit, verdict(t)))
    return rows


HEAD = ("script", "target", "value", "limit", "verdict")


def print_table(rows: list[tuple[str, str, str, str, str]]) -> None:
    widths = [max(len(str(r[i])) for r in [HEAD, *rows]) for i in range(len(HEAD))]
    line = "  ".join(h.ljust(w) for h, w in zip(HEAD, widths, strict=True))
    print(f"\n{line.rstrip()}\n{'-' * len(line)}")
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def markdown(rows: list[tuple[str, str, str, str, str]], runs: list[dict[str, Any]], quick: bool) -> str:
    out = [
        f"# Benchmark summary ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}{', --quick' if quick else ''})",
        "",
        "| " + " | ".join(HEAD) + " |",
        "|" + "---|" * len(HEAD),
    ]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    out += ["", "| script | status | exit code | seconds |", "|---|---|---|---|"]
    out += [f"| {r['script']} | {r['status']} | {r['exit_code']} | {r['seconds']} |" for r in runs]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="run every script with --quick")
    parser.add_argument("--list", action="store_true", help="list the scripts and their commands; run nothing")
    parser.add_argument("--only", default=None, help="comma-separated script names (without .py) to run")
    parser.add_argument("--dir", type=Path, default=HERE, help=argparse.SUPPRESS)  # the tests' own scripts
    args = parser.parse_args(argv)
    folder = args.dir.resolve()
    results = folder / "results"
    scripts = discover(folder)
    if args.only:
        wanted = {name.strip().removesuffix(".py") for name in args.only.split(",") if name.strip()}
        unknown = wanted - {p.stem for p in scripts}
        if unknown:
            known = ", ".join(p.stem for p in scripts)
            parser.error(f"--only names no benchmark script {', '.join(sorted(unknown))}; the scripts are: {known}")
        scripts = [p for p in scripts if p.stem in wanted]
    if args.list:
        for script in scripts:
            shown = [str(script.relative_to(folder.parent)), *command(script, args.quick)[2:]]
            print(f"{script.stem:<12} python {' '.join(shown)}")
        return 0
    # From the repository root (this folder's parent), as the scripts' docstrings say to run them.
    runs = [run_one(script, args.quick, results, folder.parent) for script in scripts]
    rows = table_rows(runs)
    print_table(rows)
    results.mkdir(parents=True, exist_ok=True)
    summary = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
        "python": sys.version.split()[0],
        "scripts": runs,
        "counts": {v: sum(1 for r in rows if r[4] == v) for v in ("met", "NOT met", "not measured", "FAILED")},
    }
    (results / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (results / SUMMARY_MD).write_text(markdown(rows, runs, args.quick), encoding="utf-8")
    failed = [r["script"] for r in runs if r["status"] != "ran"]
    print(f"\nwritten to {results / SUMMARY_JSON} and {SUMMARY_MD}")
    if failed:
        print(f"failed to run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
