"""Does an embedded host leave the web server a long garbage collection to pay for?

A Flask app on gunicorn (gthread, 1 worker x 4 threads, 127.0.0.1) under an
open-loop load of ``--rate`` requests/s that begins as soon as the worker
answers (within about a second of the host's start) and lasts ``--duration`` s, so
the first full collections after start-up fall inside the measured window. Cases:

  none    the app alone (no hostkit, no background work)
  bare    the app without hostkit, and a bare ``multiprocess`` child (same start
          method as hostkit's default, forkserver) started from the worker's
          ``post_worker_init``, running the same CPU kernel at nice 19 (hostkit's
          default priority for a process-placed service)
  hostkit the kernel as a ``placement="process"`` BackgroundService of the Flask
          extension, started by ``hostkit.gunicorn``'s ``post_worker_init``, with the
          contention monitor and lag probe on (as benchmarks/contention.py runs it)

``gc.callbacks`` in the worker record every collection: generation, wall time,
the thread's CPU time, minor page faults and context switches during it
(``getrusage(RUSAGE_THREAD)``), collected / uncollectable counts, and for a full
collection the objects in each generation when it began. With ``--trace`` the
Python functions the collector calls (``__del__``, weakref callbacks,
finalizers) are counted too, by a profile hook set on the collecting thread for
the duration of each full collection, and the types of what it found unreachable
are listed (kept for that by ``gc.DEBUG_SAVEALL``, so with ``--trace`` the
collections free nothing and their timings are not comparable).

For each case it prints, as medians over the rounds: the full collections run while
the worker started its host (before it served), the number of full (gen 2)
collections during the load and the longest of them (wall ms, CPU ms, objects it
walked, when, in s after the host's start), and request latency p50 / p99 / p99.9 /
max, measured from each request's due time. After the load it forces three full
collections of the same heap (the child still busy), kept in the JSON as ``forced``.

The first full collection of a fresh worker comes 10 to 30 s into the load, so the
window is long: the default run takes about 5 minutes.

    python benchmarks/gc_pause.py               # 3 rounds x 30 s per case
    python benchmarks/gc_pause.py --quick       # 1 round
    python benchmarks/gc_pause.py --cases hostkit --preload   # the gc.freeze() recipe for --preload
    python benchmarks/gc_pause.py --trace --cases hostkit --rounds 1

Target: no full collection during the load with hostkit, in any round (printed with
met / NOT met, and stored under ``"targets"``). Writes benchmarks/results/gc_pause.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import _load
from _common import Target, report_targets

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gc_pause.json"
CASES = ("none", "bare", "hostkit")

APP = textwrap.dedent(
    """
    import gc, json, os, resource, sys, threading, time
    from collections import Counter

    # Installed first, at import in the worker, so every collection after it is seen.
    TRACE = os.environ.get("BENCH_TRACE") == "1"
    MARKS = {"imported": time.monotonic()}
    EVENTS = []
    _begun = []
    _calls = Counter()

    def _usage():
        r = resource.getrusage(resource.RUSAGE_THREAD)
        return time.thread_time(), r.ru_minflt, r.ru_nvcsw, r.ru_nivcsw

    def _profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            _calls[f"{code.co_name} {os.path.basename(code.co_filename)}:{code.co_firstlineno}"] += 1
        elif event == "c_call":
            _calls[f"{getattr(arg, '__qualname__', arg)} (C)"] += 1

    def _on_gc(phase, info):
        gen = info["generation"]
        if phase == "start":
            sizes = [len(gc.get_objects(g)) for g in range(3)] if gen == 2 else None
            _calls.clear()
            if TRACE and gen == 2:
                # Keep what this collection finds unreachable in gc.garbage, to list its types.
                gc.set_debug(gc.DEBUG_SAVEALL)
                sys.setprofile(_profile)
            _begun[:] = [time.monotonic(), gc.get_count(), sizes, _usage(), time.perf_counter()]
            return
        end, usage = time.perf_counter(), _usage()
        if TRACE and gen == 2:
            sys.setprofile(None)
        if not _begun:
            return
        at, counts, sizes, before, began = _begun
        _begun.clear()
        event = {
            "t": at,
            "gen": gen,
            "wall_ms": (end - began) * 1000,
            "cpu_ms": (usage[0] - before[0]) * 1000,
            "minflt": usage[1] - before[1],
            "nvcsw": usage[2] - before[2],
            "nivcsw": usage[3] - before[3],
            "collected": info["collected"],
            "uncollectable": info["uncollectable"],
            "counts": counts,
            "sizes": sizes,
            "thread": threading.current_thread().name,
        }
        if TRACE and gen == 2:
            event["calls"] = dict(_calls.most_common(40))
            found = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
            event["garbage_types"] = dict(found.most_common(25))
            gc.set_debug(0)
            gc.garbage.clear()
        EVENTS.append(event)

    gc.callbacks.append(_on_gc)

    from flask import Flask, jsonify
    from _load import crunch

    MODE = os.environ["BENCH_MODE"]
    COUNT_FILE = os.environ["BENCH_COUNT_FILE"]

    app = Flask(__name__)

    if MODE == "hostkit":
        # Only this case has hostkit: "none" and "bare" are what an app without it runs.
        from hostkit import BackgroundService, HostBuilder
        from hostkit.contention import LagProbe
        import hostkit.flask

        Hostkit = hostkit.flask.Hostkit

        class Cruncher(BackgroundService):
            def execute(self, stopping):
                crunch(stopping, COUNT_FILE)

        def make_builder():
            b = HostBuilder()
            b.options.shutdown_timeout = 5
            b.add_hosted_service(Cruncher(), placement="process")
            return b

        contention = {"interval": 1.0, "log_every": None, "probe": LagProbe(window=60.0)}
        app.config.update(HOSTKIT_START="manual", HOSTKIT_CONTENTION=contention)
        Hostkit(app, builder=make_builder)

    @app.get("/")
    def index():
        return jsonify(total=sum(i * i for i in range(2000)))

    @app.get("/_collect")
    def collect():
        # A forced full collection of the same heap, in the same conditions (the child still busy).
        n = len(EVENTS)
        gc.collect()
        forced = EVENTS[n:]
        del EVENTS[n:]
        return jsonify(forced)

    @app.get("/_gc")
    def report():
        return app.response_class(
            json.dumps({"marks": MARKS, "events": EVENTS, "stats": gc.get_stats(), "now": time.monotonic()}),
            mimetype="application/json",
        )
    """
)

CONF = _load.GUNICORN_SETTINGS + textwrap.dedent(
    """
    import gc, os, time

    HOSTKIT = os.environ["BENCH_MODE"] == "hostkit"
    if HOSTKIT:
        import hostkit.gunicorn as hk

    preload_app = os.environ.get("BENCH_PRELOAD") == "1"
    _bare = []

    def pre_fork(server, worker):
        if preload_app:
            # The recipe for --preload: the app's heap, imported in the master, leaves the
            # collector's reach before the fork (no worker walks it, or un-shares its pages).
            gc.freeze()

    def post_worker_init(worker):
        import _load, bench_app
        bench_app.MARKS["host_start"] = time.monotonic()
        if HOSTKIT:
            hk.post_worker_init(worker)
        if bench_app.MODE == "bare":
            import multiprocess
            ctx = multiprocess.get_context("forkserver")
            stopping = ctx.Event()
            # At nice 19, hostkit's default for a process-placed service: the same priority.
            args = (stopping, bench_app.COUNT_FILE, "low", 0)
            child = ctx.Process(target=_load.bare_child, args=args, name="bare-child")
            child.start()
            _bare.append((child, stopping))
        if os.environ.get("BENCH_FREEZE") == "1":
            gc.freeze()
        bench_app.MARKS["host_started"] = time.monotonic()

    def worker_exit(server, worker):
        for child, stopping in _bare:
            stopping.set()
            child.join(10)
        if HOSTKIT:
            hk.worker_exit(server, worker)
    """
)


def run_case(mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    env = dict(
        os.environ,
        BENCH_MODE=mode,
        BENCH_COUNT_FILE=str(workdir / f"count-{mode}"),
        BENCH_TRACE="1" if args.trace else "0",
        BENCH_PRELOAD="1" if args.preload else "0",
        BENCH_FREEZE="1" if args.freeze else "0",
    )
    with _load.gunicorn(workdir, env, "/_gc", mode) as port:
        requests = _load.open_loop(port, args.rate, args.duration)
        report = _load.get_json(port, "/_gc")
        forced = [_load.get_json(port, "/_collect") for _ in range(3)]
    result = summarise(report, requests)
    result["forced"] = [e for batch in forced for e in batch]
    return result


def summarise(report: dict[str, Any], requests: list[tuple[float, float]]) -> dict[str, Any]:
    marks = report["marks"]
    start = marks["host_start"]
    load_from = min(due for due, _ in requests)
    load_to = max(due for due, _ in requests)
    events = [e for e in report["events"] if e["t"] >= start]
    for e in events:
        e["after_start_s"] = e["t"] - start
    full = [e for e in events if e["gen"] == 2]
    at_start = [e for e in full if e["t"] <= marks["host_started"]]
    in_window = [e for e in full if load_from <= e["t"] <= load_to]
    worst = max(in_window, key=lambda e: e["wall_ms"]) if in_window else None
    young = [e for e in events if e["gen"] < 2]
    in_load = [e for e in young if load_from <= e["t"] <= load_to]
    slowest_due, _ = max(requests, key=lambda r: r[1])
    return {
        "host_start_ms": (marks["host_started"] - start) * 1000,
        "load_began_after_start_s": load_from - start,
        "gen2_count": len(full),
        "gen2_during_start": len(at_start),
        "gen2_during_start_ms": sum(e["wall_ms"] for e in at_start),
        "gen2_in_window": len(in_window),
        "gen2_worst": worst,
        "gen2_all": full,
        "gen01_max_ms": max((e["wall_ms"] for e in young), default=0.0),
        "gen0_during_start": sum(1 for e in young if e["t"] <= marks["host_started"]),
        "gen0_per_s_under_load": len(in_load) / max(load_to - load_from, 1e-9),
        **_load.latency_summary(requests),
        "slowest_due_after_start_s": slowest_due - start,
        "gc_stats": report["stats"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round per case")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds of load per case and round")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second (open loop)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--trace", action="store_true", help="count the Python calls made by full collections")
    parser.add_argument(
        "--preload", action="store_true", help="gunicorn --preload, with gc.freeze() in the pre_fork hook"
    )
    parser.add_argument(
        "--freeze", action="store_true", help="gc.freeze() in the worker once its hooks started the host"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    # The first full collection of a fresh worker comes 10-30 s into a 100 req/s load: the
    # window must reach past it, or a pause it would have measured is left out.
    args.duration = args.duration or 30.0

    per_case: dict[str, list[dict[str, Any]]] = {c: [] for c in args.cases}
    with tempfile.TemporaryDirectory(prefix="hostkit-gc-") as tmp:
        workdir = Path(tmp)
        (workdir / "bench_app.py").write_text(APP)
        (workdir / "bench_conf.py").write_text(CONF)
        for r in range(rounds):
            order = args.cases[r % len(args.cases) :] + args.cases[: r % len(args.cases)]
            for mode in order:
                res = run_case(mode, args, workdir)
                per_case[mode].append(res)
                w = res["gen2_worst"]
                worst = (
                    f"worst gen2 {w['wall_ms']:.1f} ms wall / {w['cpu_ms']:.1f} ms cpu, {sum(w['sizes'])} objects, "
                    f"at {w['after_start_s']:.1f} s"
                    if w
                    else "no gen2 in window"
                )
                forced = res["forced"]
                print(
                    f"round {r + 1}/{rounds} {mode:<8} p99={res['p99_ms']:.1f} max={res['max_ms']:.1f} ms; "
                    f"{res['gen2_count']} gen2; {worst}"
                    + (f" nivcsw {w['nivcsw']}" if w else "")
                    + "; forced: "
                    + ", ".join(f"{e['wall_ms']:.1f}/{e['cpu_ms']:.1f} ms ({e['nivcsw']})" for e in forced),
                    file=sys.stderr,
                )

    def med(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    summary: dict[str, Any] = {}
    for mode in args.cases:
        runs = per_case[mode]
        worst = [r["gen2_worst"] for r in runs if r["gen2_worst"]]
        summary[mode] = {
            "gen2_in_window": med([r["gen2_in_window"] for r in runs]),
            "gen2_worst_wall_ms": med([w["wall_ms"] for w in worst]),
            "gen2_worst_cpu_ms": med([w["cpu_ms"] for w in worst]),
            "gen2_worst_objects": med([sum(w["sizes"]) for w in worst]),
            "gen2_worst_after_start_s": med([w["after_start_s"] for w in worst]),
            "gen2_worst_minflt": med([w["minflt"] for w in worst]),
            "gen2_worst_nivcsw": med([w["nivcsw"] for w in worst]),
            "rounds_with_gen2": len(worst),
            **{
                k: med([r[k] for r in runs])
                for k in (
                    "p50_ms",
                    "p99_ms",
                    "p999_ms",
                    "max_ms",
                    "host_start_ms",
                    "gen2_during_start",
                    "gen2_during_start_ms",
                    "gen0_during_start",
                    "gen0_per_s_under_load",
                )
            },
        }
    if "bare" in per_case:
        for mode in args.cases:
            # Medians of per-round ratios: each round's cases ran back to back on the same machine.
            pairs = list(zip(per_case[mode], per_case["bare"], strict=True))
            for k in ("p99_ms", "p999_ms", "max_ms"):
                summary[mode][f"{k[:-3]}_ratio_to_bare"] = med([run[k] / base[k] for run, base in pairs])
    header = (
        f"{'case':<8} {'start gc ms':>11} {'gen2 n':>6} {'gen2 ms':>8} {'cpu ms':>7} {'objects':>8} {'at s':>5} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} {'max ms':>7}"
    )
    print(header)
    print("-" * len(header))

    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for mode in args.cases:
        s = summary[mode]
        print(
            f"{mode:<8} {f(s['gen2_during_start_ms'], '.1f'):>11} {f(s['gen2_in_window'], '.0f'):>6} "
            f"{f(s['gen2_worst_wall_ms'], '.1f'):>8} {f(s['gen2_worst_cpu_ms'], '.1f'):>7} "
            f"{f(s['gen2_worst_objects'], '.0f'):>8} {f(s['gen2_worst_after_start_s'], '.1f'):>5} "
            f"{s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} {s['p999_ms']:>8.2f} {s['max_ms']:>7.1f}"
        )
    if "bare" in per_case:
        print()
        for mode in (m for m in args.cases if m != "bare"):
            s = summary[mode]
            print(
                f"{mode:<8} / bare, medians of per-round ratios: p99 {s['p99_ratio_to_bare']:.2f}, "
                f"p99.9 {s['p999_ratio_to_bare']:.2f}, max {s['max_ratio_to_bare']:.2f}"
            )
    met = None
    if "hostkit" in summary:
        met = summary["hostkit"]["rounds_with_gen2"] == 0
    print(
        f"\n{args.rate:g} req/s open loop from the worker's first answer, {args.duration:g} s x {rounds} round(s); "
        "medians.\nstart gc ms: full collections while the worker started its host (before it served);\n"
        "gen2 n: full collections during the load; gen2 ms / cpu ms / objects / at s: the longest of them "
        "(wall, the collecting thread's CPU, objects it walked, seconds after the host's start)."
        + ("\n--preload: the app imported in the master, gc.freeze() before the fork" if args.preload else "")
        + ("\n--freeze: gc.freeze() in the worker after its host started" if args.freeze else "")
    )
    with_gen2 = summary["hostkit"]["rounds_with_gen2"] if "hostkit" in summary else None
    targets = report_targets(
        [Target(f"hostkit: rounds (of {rounds}) with a full collection during the load", with_gen2, 0, unit="")]
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "gc_pause",
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "rate": args.rate,
                "duration_s": args.duration,
                "rounds": rounds,
                "summary": summary,
                "target_no_full_collection_during_load_met": met,
                "targets": targets,
                "preload": args.preload,
                "freeze": args.freeze,
                "rounds_detail": per_case,
                "python": sys.version.split()[0],
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
