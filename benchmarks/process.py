"""Process placement speed: start latency, SIGTERM to exit, RSS per child, beside bare multiprocess.

For each start method (forkserver and spawn by default), beside a baseline of bare
``multiprocess`` processes from the same context, stopped by an ``Event``:

* start: from ``host.start()`` to the child's ``execute`` running (the child writes
  ``time.time()`` to a file as its first act; baseline: from ``Process.start()`` to
  the bare target's first act). The fork server is warmed up before round 1, so
  every figure is a warm start;
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

    python benchmarks/process.py            # about a minute and a half
    python benchmarks/process.py --quick    # forkserver only, 2 rounds: ~15 s

Results: a table on stdout and ``benchmarks/results/process.json``.

Targets (2-core machine): start within 1.5x of the bare baseline; SIGTERM to exit
under 500 ms for 16 cooperative children.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common
import psutil
from _common import calibrate, ready_child, write_json

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SIZES = (1, 4, 16)


# -- what runs in the children -------------------------------------------------------------


def mark(folder: str) -> None:
    """A child's first act: a file named by its pid, holding the time it began."""
    path = Path(folder, str(os.getpid()))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(repr(time.time()))
    tmp.rename(path)


def bare_target(folder: str, stop: Any) -> None:
    mark(folder)
    stop.wait()


def make_service(folder: str) -> Any:
    from hostkit import BackgroundService, CancellationToken

    class Marker(BackgroundService):
        def execute(self, stopping: CancellationToken) -> None:
            mark(folder)
            stopping.wait()

    return Marker()


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


# -- start latency (in this process) --------------------------------------------------------


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


def run(methods: list[str], rounds: int, starts: int) -> dict[str, Any]:
    import multiprocess

    compile_hostkit()
    calibration: list[float] = []
    rows: list[dict[str, Any]] = []
    for method in methods:
        # Warm-up: the fork server (and imports) start once, outside the figures.
        host_start(method)
        bare_start(method)
        start_host: list[float] = []
        start_bare: list[float] = []
        sig: dict[int, dict[str, list[float]]] = {n: {"host": [], "bare": [], "rss_h": [], "rss_b": []} for n in SIZES}
        for r in range(rounds):
            calibration.append(calibrate())
            order = ("host", "bare") if r % 2 == 0 else ("bare", "host")
            runs: dict[str, list[float]] = {"host": [], "bare": []}
            for _ in range(starts):
                for kind in order:
                    runs[kind].append(host_start(method) if kind == "host" else bare_start(method))
            start_host.append(statistics.median(runs["host"]))
            start_bare.append(statistics.median(runs["bare"]))
            for n in SIZES:
                for kind in order:
                    took, rss = sigterm_to_exit(kind, n, method)
                    sig[n][kind].append(took)
                    sig[n]["rss_h" if kind == "host" else "rss_b"].append(rss)
        rows.append(
            {
                "method": method,
                "what": "start to execute",
                "n": 1,
                "host_ms": ms(statistics.median(start_host)),
                "bare_ms": ms(statistics.median(start_bare)),
                "ratio": median_ratio(start_host, start_bare),
                "host_runs_ms": [ms(x) for x in start_host],
                "bare_runs_ms": [ms(x) for x in start_bare],
            }
        )
        for n in SIZES:
            rows.append(
                {
                    "method": method,
                    "what": "SIGTERM to exit",
                    "n": n,
                    "host_ms": ms(statistics.median(sig[n]["host"])),
                    "bare_ms": ms(statistics.median(sig[n]["bare"])),
                    "ratio": median_ratio(sig[n]["host"], sig[n]["bare"]),
                    "host_runs_ms": [ms(x) for x in sig[n]["host"]],
                    "bare_runs_ms": [ms(x) for x in sig[n]["bare"]],
                    "host_rss_mb": round(statistics.median(sig[n]["rss_h"]) / 1e6, 1),
                    "bare_rss_mb": round(statistics.median(sig[n]["rss_b"]) / 1e6, 1),
                }
            )
    targets = {
        "start_within_1_5x": all(r["ratio"] <= 1.5 for r in rows if r["what"] == "start to execute"),
        "sigterm_16_under_500ms": all(
            r["host_ms"] < 500 for r in rows if r["what"] == "SIGTERM to exit" and r["n"] == 16
        ),
    }
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
        "targets_met": targets,
    }


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
    for name, ok in result["targets_met"].items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="forkserver only, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--methods", default=None, help="comma-separated start methods (default forkserver,spawn)")
    parser.add_argument("--output", type=Path, default=RESULTS / "process.json", help="where to write the JSON")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "N", "METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, n, method, folder = args.child
        return child_host(int(n), method, folder) if kind == "host" else child_bare(int(n), method, folder)
    methods = (args.methods or ("forkserver" if args.quick else "forkserver,spawn")).split(",")
    rounds = args.rounds or (2 if args.quick else 5)
    result = run(methods, rounds, starts=3 if args.quick else 5)
    print_table(result)
    write_json(args.output, result)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
