"""Lifecycle speed: what a host costs over bare threads, to start, to stop, and to exit on SIGTERM.

For hosts with 1, 10 and 100 thread-placed background services that honour
cancellation, beside a baseline of the same number of bare ``threading.Thread``
objects stopped by an ``Event``, it measures:

* start: from ``Host.run()`` to ``lifetime.started`` (baseline: what a program
  without a host does for the same behaviour: install SIGINT/SIGTERM handlers,
  create the threads and start them);
* stop: from ``stop_application()`` on another thread to ``run()`` returning, with
  every service inside its loop (baseline: the main thread waits for the same
  request, then ``Event.set()`` and ``join()`` of every thread; ``set()`` + ``join()``
  alone, with no hand-off, is in the JSON as ``baseline_direct_ms``);
* SIGTERM to exit: a real child process (this script, ``--child``) is started,
  says ``READY`` on stdout once running, gets SIGTERM, and the time until the
  parent sees it exit is taken (baseline child: bare threads, ``sigwait``, join).
  Most of it is the interpreter tearing down what the process imported, so two
  more bare-threads children separate that: one that only imports loguru (the
  logging library hostkit is built on), one that imports every module the host
  child had loaded; ``host/modules`` is then what the host's own stop adds;
* token wake-up: from ``CancellationToken.cancel()`` on one thread to
  ``token.wait()`` returning on another (baseline: ``threading.Event``).

Each figure is the median of ``--rounds`` rounds (5 by default); the ratio is the
median of per-round ratios, host and baseline measured back to back in the same
round, in alternating order. Within a round, the in-process start and stop figures
are themselves the median of 5 runs (3 with ``--quick``): they last well under a
millisecond for one service, where a single run is mostly scheduling noise. A
calibration loop (pure-Python work of a fixed size) is timed in every round and
reported, so a slowed-down machine shows in the JSON.

Run from the repository root::

    python benchmarks/lifecycle.py            # about a minute
    python benchmarks/lifecycle.py --quick    # a few seconds, 3 rounds

Results: a table on stdout, the targets with met / NOT met, and
``benchmarks/results/lifecycle.json`` (the targets under ``"targets"``).

Targets (2-core machine): start and stop within 2x of the bare-threads baseline,
SIGTERM to exit under 100 ms for 100 services (and, at 10 services, within 2x of
bare threads that import the same modules). At one service, stop and SIGTERM to
exit have no target (retired in issue #14): a fraction of a millisecond no user
notices, and a teardown set by the interpreter.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common
from _common import Target, calibrate, ready_child, report_targets, write_json

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SIZES = (1, 10, 100)
# The loops' own period: long, so that a stop is always the token waking them,
# never the loop happening to come round.
LOOP_PERIOD = 5.0


# -- what is measured: the same work, hosted and bare -------------------------------------


def make_host(n: int, entered: Callable[[], None], *, configure_logging: bool) -> Any:
    from hostkit import BackgroundService, CancellationToken, HostBuilder, HostOptions

    class Loop(BackgroundService):
        def execute(self, stopping: CancellationToken) -> None:
            entered()
            while not stopping.wait(LOOP_PERIOD):
                pass

    builder = HostBuilder(options=HostOptions(shutdown_timeout=30, configure_logging=configure_logging))
    for i in range(n):
        builder.services.add_hosted_service(Loop(), name=f"loop-{i}")
    return builder.build()


class Counter:
    """Counts services that entered their loop; ``all_in`` is set at ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.lock = threading.Lock()
        self.all_in = threading.Event()

    def __call__(self) -> None:
        with self.lock:
            self.count += 1
            if self.count == self.n:
                self.all_in.set()


def host_round(n: int) -> tuple[float, float]:
    """(start seconds, stop seconds) of one hosted run, in this process, on the main thread."""
    counter = Counter(n)
    host = make_host(n, counter, configure_logging=False)
    marks: dict[str, float] = {}
    host.lifetime.started.register(lambda: marks.__setitem__("started", time.perf_counter()))

    def stopper() -> None:
        # Stop only once every service is inside its loop, as the baseline does.
        host.lifetime.started.wait()
        counter.all_in.wait()
        marks["stop"] = time.perf_counter()
        host.lifetime.stop_application()

    helper = threading.Thread(target=stopper, name="bench-stopper")
    helper.start()
    began = time.perf_counter()
    code = host.run()
    ended = time.perf_counter()
    helper.join()
    if code != 0:
        raise SystemExit(f"the benchmark host exited with {code}")
    return marks["started"] - began, ended - marks["stop"]


def threads_round(n: int) -> tuple[float, float, float]:
    """(start, stop, direct stop) seconds of ``n`` bare threads stopped by an Event.

    The start is what a program without a host does to get the same behaviour:
    install SIGINT/SIGTERM handlers that request the stop, create the threads and
    start them, timed until the last ``start()`` returned.
    The stop is what a program without a host does: its main thread waits for a
    stop request, another thread (here, as for the host) makes it, and the main
    thread sets the Event and joins every thread. Timed from the request to the
    last join, like the host's. ``direct stop`` is ``set()`` + ``join()`` alone, on
    the thread that already holds control: no hand-off, kept for reference.
    """
    counter = Counter(n)
    stop = threading.Event()
    requested = threading.Event()
    marks: dict[str, float] = {}

    def loop() -> None:
        counter()
        while not stop.wait(LOOP_PERIOD):
            pass

    def stopper() -> None:
        counter.all_in.wait()
        marks["stop"] = time.perf_counter()
        requested.set()

    def on_signal(signum: int, frame: object) -> None:
        requested.set()

    helper = threading.Thread(target=stopper, name="bench-stopper")
    helper.start()
    began = time.perf_counter()
    # What run() does too: make SIGINT and SIGTERM request the stop, create the threads, start them.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = [threading.Thread(target=loop, name=f"bare-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    started = time.perf_counter()
    requested.wait()
    stop.set()
    for t in threads:
        t.join()
    stopped = time.perf_counter()
    helper.join()
    for signum, handler in previous.items():
        signal.signal(signum, handler)

    # The same threads once more, stopped directly, for the reference figure.
    stop = threading.Event()
    counter = Counter(n)
    threads = [threading.Thread(target=loop, name=f"bare-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    counter.all_in.wait()
    direct_at = time.perf_counter()
    stop.set()
    for t in threads:
        t.join()
    return started - began, stopped - marks["stop"], time.perf_counter() - direct_at


# -- children for SIGTERM-to-exit ---------------------------------------------------------


def child_host(n: int, listing: str = "") -> int:
    counter = Counter(n)
    # Default logging (Host.run() configures it): what a user's worker does.
    host = make_host(n, counter, configure_logging=True)

    def ready() -> None:
        counter.all_in.wait()
        print("READY", flush=True)

    announcer = threading.Thread(target=ready, name="bench-ready", daemon=True)
    announcer.start()
    code: int = host.run()
    if listing:
        # Every module this host process has loaded, by the time it exits: the
        # "threads+modules" child imports the same set.
        Path(listing).write_text("\n".join(sorted(sys.modules)), encoding="utf-8")
    return code


def import_modules(listing: str) -> None:
    """Import every module named in the file ``listing`` (one per line) that imports cleanly."""
    import importlib

    for name in Path(listing).read_text(encoding="utf-8").split():
        if name in sys.modules or name in ("__main__", "__mp_main__", "lifecycle"):
            continue
        try:
            importlib.import_module(name)
        except Exception:  # private or platform modules that only their parent can load
            continue


def child_threads(n: int, *, imports: str = "") -> int:
    if imports == "loguru":
        # Only loguru, a core dependency fixed by hostkit's users: the floor of any
        # program that logs through it.
        import loguru  # noqa: F401
    elif imports:
        # Same bare threads, with every module the host child had loaded imported too:
        # separates what interpreter teardown of those modules costs from the host's stop.
        import_modules(imports)
    # Block SIGTERM before any thread exists (threads inherit the mask), so the
    # main thread alone receives it, synchronously, in sigwait().
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    counter = Counter(n)
    stop = threading.Event()

    def loop() -> None:
        counter()
        while not stop.wait(LOOP_PERIOD):
            pass

    threads = [threading.Thread(target=loop, name=f"bare-{i}") for i in range(n)]
    for t in threads:
        t.start()
    counter.all_in.wait()
    print("READY", flush=True)
    signal.sigwait({signal.SIGTERM})
    stop.set()
    for t in threads:
        t.join()
    return 0


def sigterm_to_exit(kind: str, n: int, timeout: float = 60.0, *extra: str) -> float:
    """Start a child, wait for READY, SIGTERM it; seconds from the signal to its exit."""
    what = f"the {kind} child with {n} services"
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(n), *extra]
    with ready_child(argv, what, timeout) as proc:
        return _common.sigterm_to_exit(proc, what, timeout)


# -- token wake-up ------------------------------------------------------------------------


def wakeup_latency(make_event: Callable[[], threading.Event], samples: int) -> list[float]:
    """Seconds from ``set()`` on this thread to ``wait()`` returning on another, per sample."""
    results: list[float] = []
    for _ in range(samples):
        event = make_event()
        parked = threading.Event()
        woke: list[float] = []

        def waiter(event: threading.Event = event, parked: threading.Event = parked, woke: list[float] = woke) -> None:
            parked.set()
            event.wait(30)
            woke.append(time.perf_counter())

        t = threading.Thread(target=waiter, name="bench-waiter")
        t.start()
        parked.wait()
        # The waiter said "parked" just before calling wait(); give it a moment to
        # block in the lock, so what is timed is a wake-up, not a race to wait().
        time.sleep(0.002)
        began = time.perf_counter()
        event.set()
        t.join()
        results.append(woke[0] - began)
    return results


# -- calibration and statistics -----------------------------------------------------------


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def repeated(fn: Callable[[int], tuple[float, ...]], n: int, times: int) -> tuple[float, ...]:
    """Median of each figure over ``times`` in-process runs: one round's figures, steadier than one run."""
    runs = [fn(n) for _ in range(times)]
    return tuple(statistics.median(r[i] for r in runs) for i in range(len(runs[0])))


def median_ratio(host: list[float], base: list[float]) -> float:
    return statistics.median(h / b for h, b in zip(host, base, strict=True) if b > 0)


def size_rows(n: int, data: dict[str, list[float]]) -> list[dict[str, Any]]:
    """The three rows (start, stop, SIGTERM to exit) of one size, with their targets."""
    rows: list[dict[str, Any]] = []
    for metric in ("start", "stop", "exit"):
        host, base = data[f"host_{metric}"], data[f"base_{metric}"]
        row: dict[str, Any] = {
            "services": n,
            "metric": {"start": "run() -> started", "stop": "stop -> run() returns", "exit": "SIGTERM -> exit"}[metric],
            "host_ms": ms(statistics.median(host)),
            "baseline_ms": ms(statistics.median(base)),
            "ratio": round(median_ratio(host, base), 2),
            "host_runs_ms": [ms(x) for x in host],
            "baseline_runs_ms": [ms(x) for x in base],
        }
        if metric in ("start", "stop"):
            row["target"] = "ratio <= 2.0"
            row["ok"] = row["ratio"] <= 2.0
        if metric == "stop":
            row["baseline_direct_ms"] = ms(statistics.median(data["direct_stop"]))
        if metric == "exit":
            modules = data["modules_exit"]
            row["threads_with_loguru_ms"] = ms(statistics.median(data["loguru_exit"]))
            row["threads_with_modules_ms"] = ms(statistics.median(modules))
            row["ratio_to_same_modules"] = round(median_ratio(host, modules), 2)
            row["loguru_floor_ratio"] = round(median_ratio(data["loguru_exit"], base), 2)
            row["target"] = "host <= 100 ms" if n == 100 else "vs modules <= 2"
            row["ok"] = row["host_ms"] <= 100.0 if n == 100 else row["ratio_to_same_modules"] <= 2.0
        if n == 1 and metric in ("stop", "exit"):
            # Retired (issue #14): a fraction of a millisecond at one service, which no user
            # notices; SIGTERM to exit is set by the interpreter's teardown of loguru's imports.
            row["target"], row["ok"] = "retired", None
        rows.append(row)
    return rows


# -- main ---------------------------------------------------------------------------------


def run(rounds: int, inner: int, wake_samples: int) -> dict[str, Any]:
    import tempfile

    import hostkit
    from hostkit import CancellationToken

    calibration: list[float] = []
    rows: list[dict[str, Any]] = []
    # Warm up once (imports, first thread creation) so round 1 is not an outlier.
    host_round(1)
    threads_round(1)
    with tempfile.TemporaryDirectory(prefix="hostkit-bench-") as tmp:
        # One host child first, only to learn which modules a host process has loaded.
        listing = str(Path(tmp) / "modules.txt")
        sigterm_to_exit("host", 1, 60.0, listing)
        module_count = len(Path(listing).read_text(encoding="utf-8").split())
        for n in SIZES:
            keys = ("host_start", "base_start", "host_stop", "base_stop", "direct_stop", "host_exit", "base_exit")
            data: dict[str, list[float]] = {k: [] for k in (*keys, "loguru_exit", "modules_exit")}
            for r in range(rounds):
                calibration.append(calibrate())
                # Alternate which goes first, so drift of the machine hits both alike.
                order = ("host", "base") if r % 2 == 0 else ("base", "host")
                for who in order:
                    if who == "host":
                        start, stop = repeated(host_round, n, inner)
                        data["host_start"].append(start)
                        data["host_stop"].append(stop)
                        data["host_exit"].append(sigterm_to_exit("host", n))
                    else:
                        start, stop, direct = repeated(threads_round, n, inner)
                        data["base_start"].append(start)
                        data["base_stop"].append(stop)
                        data["direct_stop"].append(direct)
                        data["base_exit"].append(sigterm_to_exit("threads", n))
                        data["loguru_exit"].append(sigterm_to_exit("threads-loguru", n))
                        data["modules_exit"].append(sigterm_to_exit("threads-modules", n, 60.0, listing))
            rows.extend(size_rows(n, data))
    token_wake = wakeup_latency(lambda: CancellationToken(name="bench"), wake_samples)
    event_wake = wakeup_latency(threading.Event, wake_samples)

    def summary(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {
            "median_ms": ms(statistics.median(xs)),
            "p90_ms": ms(xs[int(0.9 * (len(xs) - 1))]),
            "max_ms": ms(xs[-1]),
        }

    return {
        "benchmark": "lifecycle",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "hostkit": hostkit.__version__,
        "cpus": os.cpu_count(),
        "rounds": rounds,
        "in_process_runs_per_round": inner,
        "loop_period_s": LOOP_PERIOD,
        "calibration_ms": {
            "median": ms(statistics.median(calibration)),
            "min": ms(min(calibration)),
            "max": ms(max(calibration)),
        },
        "rows": rows,
        "host_child_modules": module_count,
        "wakeup": {
            "samples": wake_samples,
            "token": summary(token_wake),
            "event": summary(event_wake),
            "ratio": round(statistics.median(token_wake) / statistics.median(event_wake), 2),
        },
    }


def targets(result: dict[str, Any]) -> list[Target]:
    """Every row that has a target, as a :class:`_common.Target` (the same limits the table shows)."""
    found = []
    for row in result["rows"]:
        n, metric = row["services"], row["metric"]
        if row["ok"] is None:
            continue
        services = f"{n} service{'' if n == 1 else 's'}"
        if metric == "SIGTERM -> exit" and n == 100:
            found.append(Target(f"{services}: SIGTERM to exit", row["host_ms"], 100.0, unit=" ms"))
        elif metric == "SIGTERM -> exit":
            found.append(
                Target(
                    f"{services}: SIGTERM to exit within 2x of threads with the same modules",
                    row["ratio_to_same_modules"],
                    2.0,
                    unit="x",
                )
            )
        else:
            found.append(Target(f"{services}: {metric} within 2x of bare threads", row["ratio"], 2.0, unit="x"))
    return found


def print_table(result: dict[str, Any]) -> None:
    cal = result["calibration_ms"]
    print(
        f"hostkit {result['hostkit']} lifecycle benchmark: Python {result['python']}, {result['cpus']} CPUs, "
        f"median of {result['rounds']} rounds; calibration {cal['median']} ms (min {cal['min']}, max {cal['max']})"
    )
    header = f"{'services':>8}  {'metric':<22} {'host ms':>9} {'threads ms':>10} {'ratio':>6}  {'target':<15} {'ok':<4}"
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        if row["metric"] == "SIGTERM -> exit":
            continue
        ok = {True: "yes", False: "NO", None: ""}[row["ok"]]
        print(
            f"{row['services']:>8}  {row['metric']:<22} {row['host_ms']:>9.2f} {row['baseline_ms']:>10.2f} "
            f"{row['ratio']:>6.2f}  {row['target']:<15} {ok:<4}"
        )
    print()
    print("SIGTERM -> process exit (a child process each), ms:")
    header = (
        f"{'services':>8}  {'host':>7} {'threads':>8} {'ratio':>6}  {'threads+loguru':>14} {'threads+modules':>15}"
        f" {'host/modules':>12}  {'target':<15} {'ok':<4}"
    )
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        if row["metric"] != "SIGTERM -> exit":
            continue
        ok = {True: "yes", False: "NO", None: ""}[row["ok"]]
        print(
            f"{row['services']:>8}  {row['host_ms']:>7.2f} {row['baseline_ms']:>8.2f} {row['ratio']:>6.2f}  "
            f"{row['threads_with_loguru_ms']:>14.2f} {row['threads_with_modules_ms']:>15.2f} "
            f"{row['ratio_to_same_modules']:>12.2f}  {row['target']:<15} {ok:<4}"
        )
    wake = result["wakeup"]
    print()
    print(f"wake-up after cancel ({wake['samples']} samples): median / p90 / max ms")
    for kind in ("token", "event"):
        w = wake[kind]
        label = "CancellationToken.wait()" if kind == "token" else "threading.Event.wait()"
        print(f"  {label:<26} {w['median_ms']:>7.3f} {w['p90_ms']:>7.3f} {w['max_ms']:>7.3f}")
    print(f"  ratio (median token / median event): {wake['ratio']}")
    print()
    stops = [r for r in result["rows"] if r["metric"] == "stop -> run() returns"]
    print(
        "stop: from a request made on another thread to run() returning; the threads baseline is a main\n"
        "thread that waits for the same request, sets the Event and joins (set()+join() alone, with no\n"
        "hand-off: " + ", ".join(f"{r['baseline_direct_ms']:.2f} ms at {r['services']}" for r in stops) + ").\n"
        "SIGTERM -> exit is mostly interpreter teardown of what the process imported: threads+loguru is\n"
        "the bare threads with only `import loguru` (hostkit's logging, a fixed core dependency);\n"
        f"threads+modules imports every module the host child had loaded ({result['host_child_modules']});\n"
        "host/modules is what the host's own stop adds."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 rounds and fewer wake-up samples (a few seconds)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per size (default 5, or 3 with --quick)")
    parser.add_argument("--output", type=Path, default=RESULTS / "lifecycle.json", help="where to write the JSON")
    parser.add_argument("--child", nargs="+", metavar="KIND N [LISTING]", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, n = args.child[0], int(args.child[1])
        extra = args.child[2] if len(args.child) > 2 else ""
        if kind == "host":
            return child_host(n, extra)
        imports = {"threads": "", "threads-loguru": "loguru", "threads-modules": extra}[kind]
        return child_threads(n, imports=imports)
    rounds = args.rounds or (3 if args.quick else 5)
    if rounds < 1:
        parser.error(f"--rounds must be >= 1, not: {rounds}")
    result = run(rounds, inner=3 if args.quick else 5, wake_samples=50 if args.quick else 200)
    print_table(result)
    result["targets"] = report_targets(targets(result))
    write_json(args.output, result)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
