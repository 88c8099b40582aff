"""Process placement speed: start latency (warm and cold), SIGTERM to exit, RSS per child, beside bare multiprocess.

Every figure for hostkit sits beside a baseline of bare ``multiprocess`` processes
from the same context, running a module-level function (``_bare_work.bare_target``)
and stopped by an ``Event``. The service (``_host_work.Marker``) lives in an
importable module, as an application's does, so both are pickled by reference.

* start, warm: from ``host.start()`` to the child's ``execute`` running (the child
  writes ``time.time()`` to a file as its first act; baseline: from
  ``Process.start()`` to the bare target's first act), in this process, after a
  warm-up start (the fork server, when there is one, is running). With ``fork``
  this is the whole cost of a start: nothing else is started;
* start, cold (the default start method, forkserver): a fresh interpreter each
  time (this script, ``--cold``) that has imported hostkit (baseline: multiprocess)
  and builds and starts a host with 1 or 8 process-placed services (baseline:
  starts 1 or 8 bare processes), timed from before the build until every child
  has marked its start. It includes starting the fork server, which is most of it.
  A second baseline, shown beside it and kept in the JSON (``bare_loguru_ms``), has
  its fork server import loguru too: the floor for a child that logs through
  loguru. hostkit's fork server imports loguru only when the main module refers to
  it (this script does not), and its children only when their service logs;
* SIGTERM to exit, with 1, 4 and 16 process-placed services that honour their
  token: a real host process (this script, ``--child``) is started, says ``READY``
  once every child runs, gets SIGTERM, and the time until it has exited (every
  child reaped) is taken with a pidfd (baseline: bare processes, ``sigwait``,
  ``Event.set()``, ``join()``);
* RSS per child: the median resident set size of the children in that run.

hostkit's bytecode is compiled first (``compileall``, as pip does when it installs
a package): with ``PYTHONDONTWRITEBYTECODE`` set and a stale ``__pycache__`` (an
edited checkout), every spawned child would otherwise compile hostkit's sources
again, a cost no installed hostkit has and the baseline's libraries never pay.

Each figure is the median of ``--rounds`` rounds (5 by default, 2 with ``--quick``);
a ratio is the median of the per-round ratios (host / bare), host and baseline
back to back in alternating order. A calibration loop is timed every round.

Run from the repository root::

    python benchmarks/process.py            # about two minutes
    python benchmarks/process.py --quick    # forkserver's SIGTERM rows only, 2 rounds: ~30 s

Results: a table on stdout, the targets with met / NOT met, and
``benchmarks/results/process.json`` (the targets under ``"targets"``).

Targets (2-core machine): with fork, start within 2x of a bare fork child; with
the default method (forkserver), a cold start of one service within 1.3x of a bare
forkserver child started cold; a warm start within 1.5x with forkserver and spawn;
SIGTERM to exit under 500 ms for 16 cooperative children.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common
import psutil
from _bare_work import bare_target
from _common import Target, calibrate, ready_child, report_targets, write_json

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SIZES = (1, 4, 16)
COLD_SIZES = (1, 8)
#: The start method a service gets when none is named.
DEFAULT_METHOD = "forkserver"


def make_service(folder: str) -> Any:
    from _host_work import Marker

    return Marker(folder)


def marks(folder: str) -> dict[int, float]:
    found = {}
    for p in Path(folder).iterdir():
        if p.suffix != ".tmp":
            found[int(p.name)] = float(p.read_text())
    return found


def wait_marks(folder: str, n: int, timeout: float = 60.0) -> dict[int, float]:
    deadline = time.monotonic() + timeout
    while True:
        found = marks(folder)
        if len(found) >= n:
            return found
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(found)} of {n} children started within {timeout} s")
        time.sleep(0.0005)


# -- start latency, warm (in this process) ---------------------------------------------------


def host_start(method: str) -> float:
    from hostkit import HostBuilder, HostOptions

    with tempfile.TemporaryDirectory() as folder:
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10, configure_logging=False))
        builder.services.add_hosted_service(make_service(folder), placement="process", start_method=method)
        host = builder.build()
        began = time.time()
        host.start()
        try:
            (ran_at,) = wait_marks(folder, 1).values()
        finally:
            host.stop()
        return ran_at - began


def bare_start(method: str) -> float:
    import multiprocess

    ctx = multiprocess.get_context(method)
    with tempfile.TemporaryDirectory() as folder:
        stop = ctx.Event()
        proc = ctx.Process(target=bare_target, args=(folder, stop), name="bare")
        began = time.time()
        proc.start()
        try:
            (ran_at,) = wait_marks(folder, 1).values()
        finally:
            stop.set()
            proc.join()
        return ran_at - began


# -- start latency, cold (a fresh interpreter each time) -------------------------------------


def cold_child(kind: str, n: int, method: str, folder: str) -> int:
    """In a fresh interpreter: start ``n`` children the ``kind`` way; print ``COLD <seconds>``.

    Both have imported multiprocess before the clock starts; the host program has also
    imported hostkit, as an application has by the time it builds its host.
    """
    import multiprocess

    if kind == "host":
        from hostkit import HostBuilder, HostOptions

        began = time.time()
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10, configure_logging=False))
        for i in range(n):
            builder.services.add_hosted_service(
                make_service(folder), placement="process", start_method=method, name=f"marker-{i}"
            )
        host = builder.build()
        host.start()
        try:
            last = max(wait_marks(folder, n).values())
        finally:
            host.stop()
    else:
        began = time.time()
        ctx = multiprocess.get_context(method)
        if kind == "bare-loguru":
            # The floor for any child that logs through loguru: its fork server imports it too.
            ctx.set_forkserver_preload(["__main__", "loguru"])
        stop = ctx.Event()
        procs = [ctx.Process(target=bare_target, args=(folder, stop), name=f"bare-{i}") for i in range(n)]
        for p in procs:
            p.start()
        try:
            last = max(wait_marks(folder, n).values())
        finally:
            stop.set()
            for p in procs:
                p.join()
    print(f"COLD {last - began!r}", flush=True)
    return 0


def cold_start(kind: str, n: int, method: str, timeout: float = 120.0) -> float:
    with tempfile.TemporaryDirectory() as folder:
        argv = [sys.executable, str(Path(__file__).resolve()), "--cold", kind, str(n), method, folder]
        done = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=timeout
        )
        for line in done.stdout.decode().splitlines():
            if line.startswith("COLD ") and done.returncode == 0:
                return float(line.split()[1])
        raise SystemExit(f"the cold {kind} start of {n} ({method}) failed with exit code {done.returncode}")


# -- SIGTERM to exit (a real process) -------------------------------------------------------


def child_host(n: int, method: str, folder: str) -> int:
    from hostkit import HostBuilder, HostOptions

    builder = HostBuilder(options=HostOptions(shutdown_timeout=10, start_method=method))
    for i in range(n):
        builder.services.add_hosted_service(make_service(folder), placement="process", name=f"marker-{i}")
    host = builder.build()

    def ready() -> None:
        wait_marks(folder, n)
        print("READY", flush=True)

    threading.Thread(target=ready, name="bench-ready", daemon=True).start()
    code: int = host.run()
    return code


def child_bare(n: int, method: str, folder: str) -> int:
    import multiprocess

    ctx = multiprocess.get_context(method)
    stop = ctx.Event()
    procs = [ctx.Process(target=bare_target, args=(folder, stop), name=f"bare-{i}") for i in range(n)]
    for p in procs:
        p.start()
    # Blocked only now: starting the resource tracker unblocks SIGTERM again on its way out.
    # No thread exists here, so the main thread takes it in sigwait().
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    wait_marks(folder, n)
    print("READY", flush=True)
    signal.sigwait({signal.SIGTERM})
    stop.set()
    for p in procs:
        p.join()
    return 0


def sigterm_to_exit(kind: str, n: int, method: str, timeout: float = 90.0) -> tuple[float, float]:
    """(seconds from SIGTERM to exit, median RSS of the children in bytes)."""
    what = f"the {kind} child with {n} services"
    with tempfile.TemporaryDirectory() as folder:
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(n), method, folder]
        with ready_child(argv, what, timeout) as proc:
            rss = []
            for pid in marks(folder):
                try:
                    rss.append(psutil.Process(pid).memory_info().rss)
                except psutil.Error:
                    pass
            took = _common.sigterm_to_exit(proc, what, timeout)
            return took, statistics.median(rss) if rss else 0.0


# -- statistics -----------------------------------------------------------------------------


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


def median_ratio(host: list[float], base: list[float]) -> float:
    return round(statistics.median(h / b for h, b in zip(host, base, strict=True) if b > 0), 3)


def compile_hostkit() -> None:
    """Write current bytecode for the hostkit being measured (its children import it)."""
    import compileall

    import hostkit

    compileall.compile_dir(str(Path(hostkit.__file__).parent), quiet=1)


def start_row(method: str, what: str, n: int, host: list[float], bare: list[float]) -> dict[str, Any]:
    return {
        "method": method,
        "what": what,
        "n": n,
        "host_ms": ms(statistics.median(host)),
        "bare_ms": ms(statistics.median(bare)),
        "ratio": median_ratio(host, bare),
        "host_runs_ms": [ms(x) for x in host],
        "bare_runs_ms": [ms(x) for x in bare],
    }


def run(methods: list[str], rounds: int, starts: int) -> dict[str, Any]:
    import multiprocess

    compile_hostkit()
    calibration: list[float] = []
    rows: list[dict[str, Any]] = []
    # Warm starts: fork always (its whole cost is the start), then each method measured.
    for method in ["fork", *(m for m in methods if m != "fork")]:
        # Warm-up: the fork server (and imports) start once, outside the figures.
        host_start(method)
        bare_start(method)
        start_host: list[float] = []
        start_bare: list[float] = []
        for r in range(rounds):
            calibration.append(calibrate())
            order = ("host", "bare") if r % 2 == 0 else ("bare", "host")
            runs: dict[str, list[float]] = {"host": [], "bare": []}
            for _ in range(starts):
                for kind in order:
                    runs[kind].append(host_start(method) if kind == "host" else bare_start(method))
            start_host.append(statistics.median(runs["host"]))
            start_bare.append(statistics.median(runs["bare"]))
        rows.append(start_row(method, "start, warm", 1, start_host, start_bare))
    # Cold starts with the default method: a fresh interpreter each.
    for n in COLD_SIZES:
        cold: dict[str, list[float]] = {"host": [], "bare": [], "bare-loguru": []}
        for r in range(rounds):
            calibration.append(calibrate())
            order = ("host", "bare", "bare-loguru") if r % 2 == 0 else ("bare-loguru", "bare", "host")
            runs = {kind: [] for kind in order}
            for _ in range(starts):
                for kind in order:
                    runs[kind].append(cold_start(kind, n, DEFAULT_METHOD))
            for kind in order:
                cold[kind].append(statistics.median(runs[kind]))
        row = start_row(DEFAULT_METHOD, "start, cold", n, cold["host"], cold["bare"])
        row["bare_loguru_ms"] = ms(statistics.median(cold["bare-loguru"]))
        row["bare_loguru_runs_ms"] = [ms(x) for x in cold["bare-loguru"]]
        row["ratio_to_bare_loguru"] = median_ratio(cold["host"], cold["bare-loguru"])
        rows.append(row)
    for method in methods:
        sig: dict[int, dict[str, list[float]]] = {n: {"host": [], "bare": [], "rss_h": [], "rss_b": []} for n in SIZES}
        for r in range(rounds):
            calibration.append(calibrate())
            order = ("host", "bare") if r % 2 == 0 else ("bare", "host")
            for n in SIZES:
                for kind in order:
                    took, rss = sigterm_to_exit(kind, n, method)
                    sig[n][kind].append(took)
                    sig[n]["rss_h" if kind == "host" else "rss_b"].append(rss)
        for n in SIZES:
            row = start_row(method, "SIGTERM to exit", n, sig[n]["host"], sig[n]["bare"])
            row["host_rss_mb"] = round(statistics.median(sig[n]["rss_h"]) / 1e6, 1)
            row["bare_rss_mb"] = round(statistics.median(sig[n]["rss_b"]) / 1e6, 1)
            rows.append(row)
    return {
        "benchmark": "process",
        "python": platform.python_version(),
        "multiprocess": multiprocess.__version__,
        "cpus": os.cpu_count(),
        "rounds": rounds,
        "starts_per_round": starts,
        "calibration_ms": ms(statistics.median(calibration)),
        "calibration_runs_ms": [ms(x) for x in calibration],
        "rows": rows,
    }


def _find(result: dict[str, Any], method: str, what: str, n: int) -> dict[str, Any] | None:
    for row in result["rows"]:
        if (row["method"], row["what"], row["n"]) == (method, what, n):
            return row
    return None


def targets(result: dict[str, Any]) -> list[Target]:
    """The targets of this benchmark; a case this run did not measure is "not measured"."""

    def value(method: str, what: str, n: int, key: str) -> float | None:
        row = _find(result, method, what, n)
        return None if row is None else float(row[key])

    found = [
        Target("fork: start within 2x of a bare fork child", value("fork", "start, warm", 1, "ratio"), 2.0, unit="x"),
        Target(
            "forkserver: cold start of 1 service within 1.3x of a bare forkserver child started cold",
            value(DEFAULT_METHOD, "start, cold", 1, "ratio"),
            1.3,
            unit="x",
        ),
    ]
    for method in ("forkserver", "spawn"):
        found.append(
            Target(f"{method}: warm start within 1.5x of bare", value(method, "start, warm", 1, "ratio"), 1.5, unit="x")
        )
    for method in ("forkserver", "spawn"):
        found.append(
            Target(
                f"{method}: SIGTERM to exit with 16 children",
                value(method, "SIGTERM to exit", 16, "host_ms"),
                500.0,
                unit=" ms",
            )
        )
    return found


def print_table(result: dict[str, Any]) -> None:
    print(
        f"process placement: Python {result['python']}, multiprocess {result['multiprocess']}, "
        f"{result['cpus']} CPUs, {result['rounds']} rounds, calibration {result['calibration_ms']} ms"
    )
    head = (
        f"{'method':<11} {'measure':<17} {'n':>3} {'host ms':>9} {'bare ms':>9} {'ratio':>6} "
        f"{'RSS/child host':>15} {'bare':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        rss = f"{r['host_rss_mb']:>12.1f} MB {r['bare_rss_mb']:>6.1f}" if "host_rss_mb" in r else ""
        print(
            f"{r['method']:<11} {r['what']:<17} {r['n']:>3} {r['host_ms']:>9.2f} {r['bare_ms']:>9.2f} "
            f"{r['ratio']:>6.2f} {rss}"
        )
    for r in result["rows"]:
        if "bare_loguru_ms" in r:
            print(
                f"cold, {r['n']} service(s): a bare child whose fork server also imports loguru takes "
                f"{r['bare_loguru_ms']:.2f} ms; hostkit / that: {r['ratio_to_bare_loguru']:.2f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2 rounds, fewer starts, SIGTERM rows for forkserver only")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--methods", default=None, help="comma-separated start methods (default forkserver,spawn)")
    parser.add_argument("--output", type=Path, default=RESULTS / "process.json", help="where to write the JSON")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "N", "METHOD", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--cold", nargs=4, metavar=("KIND", "N", "METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, n, method, folder = args.child
        return child_host(int(n), method, folder) if kind == "host" else child_bare(int(n), method, folder)
    if args.cold:
        kind, n, method, folder = args.cold
        return cold_child(kind, int(n), method, folder)
    # hostkit's own lines (an embedded host's start and stop) would drown the table: the
    # stdlib logger they go to is given a handler that drops them (the route is still paid).
    quiet = logging.getLogger("hostkit")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    methods = (args.methods or ("forkserver" if args.quick else "forkserver,spawn")).split(",")
    rounds = args.rounds or (2 if args.quick else 5)
    if rounds < 1:
        parser.error(f"--rounds must be >= 1, not: {rounds}")
    result = run(methods, rounds, starts=3 if args.quick else 5)
    print_table(result)
    result["targets"] = report_targets(targets(result))
    write_json(args.output, result)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
