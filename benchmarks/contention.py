"""Does CPU-heavy background work hurt a Flask app's tail latency? hostkit beside bare children, oversubscribed.

A Flask app on gunicorn (gthread, 1 worker x 4 threads, 127.0.0.1) gets an open-loop
load of ``--rate`` requests/s, each latency measured from the request's due time
(``_load.open_loop``). The load begins as soon as the worker answers, so the measured
window begins within 2 s of the host's start (the JSON keeps how soon, per round) and
lasts ``--duration`` s: a pause after start is measured, not warmed away. The
background work is the same pure-Python kernel (``_load.crunch``) in every case:

  none            no background work (and no hostkit)
  thread          one placement="thread" service
  process         one placement="process" service, hostkit's default CPU priority (nice 19)
  bare            one bare multiprocess child (forkserver, started from post_worker_init) at nice 19
  process3-os     three process services with cpu_priority="inherit": the OS default, the
                  server's own priority (more busy children than this machine's 2 cores)
  bare3-os        three bare children at the OS default
  process3        three process services at hostkit's default priority
  bare3           three bare children at nice 19
  process3-keep   three process services at the default priority with keep_cores=1
  bare3-keep      three bare children at nice 19, pinned off the lowest-numbered CPU by hand
  (--candidates adds process3/bare3 under SCHED_BATCH and SCHED_IDLE: -batch, -idle)

hostkit cases run the contention monitor with its lag probe (as ``hostkit top`` would
need; ``--no-monitor`` leaves it out); the bare cases do not import hostkit. Each round runs every case once on a
fresh gunicorn, in rotating order. Reported per case, as medians over the rounds:
p50 / p99 / p99.9 / max latency, the p99 ratio to ``none`` and to the bare case at the
same priority (medians of per-round ratios), the background kernel's iterations per
second (all its children together) and its ratio to the bare case's, the lag probe's
p99, and when the load began after the host's start.

Targets (item 3 of issue 14), as medians of per-round ratios:
  - process: p99 within 1.15x and p99.9 within 1.5x of bare;
  - process3 (the default priority): p99 / none <= 2.0;
  - process3-keep: p99 / none <= 1.3;
  - every hostkit process case: iterations/s >= 0.95x the bare case at the same priority.
And issue 5's checks of the contention monitor: its lag probe's p99 at least twice as high
with the thread as with the process service, and its own CPU under 1% of a core.

Charts (matplotlib, ``pip install -e ".[bench]"``): the latency distribution of every
case on one chart, and request latency over time with the host's start marked, written
to ``--figures`` (default docs/_static, which docs/contention.md shows).

    python benchmarks/contention.py              # 5 rounds x 10 s per case, about 11 minutes
    python benchmarks/contention.py --quick      # 1 round x 6 s per case, about 2 minutes
    python benchmarks/contention.py --candidates --cases bare3-os bare3 bare3-batch bare3-idle

Writes benchmarks/results/contention.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _load
from _common import Target, calibrate, report_targets, write_json

RESULTS = _load.ROOT / "benchmarks" / "results" / "contention.json"
FIGURES = _load.ROOT / "docs" / "_static"


@dataclass(frozen=True)
class Case:
    name: str
    #: "none", "thread", "process" (hostkit) or "bare".
    kind: str
    children: int = 0
    #: "inherit", "low" (hostkit's default: not passed), "batch" or "idle".
    priority: str = "low"
    keep_cores: int = 0

    @property
    def bare_twin(self) -> str | None:
        """The bare case with the same children, priority and cores, for a hostkit process case."""
        return "bare" + self.name.removeprefix("process") if self.kind == "process" else None


CASES = [
    Case("none", "none"),
    Case("thread", "thread", 1),
    Case("process", "process", 1),
    Case("bare", "bare", 1),
    Case("process3-os", "process", 3, "inherit"),
    Case("bare3-os", "bare", 3, "inherit"),
    Case("process3", "process", 3),
    Case("bare3", "bare", 3),
    Case("process3-keep", "process", 3, keep_cores=1),
    Case("bare3-keep", "bare", 3, keep_cores=1),
]
CANDIDATES = [
    Case("process3-batch", "process", 3, "batch"),
    Case("bare3-batch", "bare", 3, "batch"),
    Case("process3-idle", "process", 3, "idle"),
    Case("bare3-idle", "bare", 3, "idle"),
]

APP = textwrap.dedent(
    """
    import os, time
    from flask import Flask, jsonify
    from _load import crunch

    KIND = os.environ["BENCH_KIND"]
    CHILDREN = int(os.environ["BENCH_CHILDREN"])
    PRIORITY = os.environ["BENCH_PRIORITY"]
    KEEP = int(os.environ["BENCH_KEEP"])
    COUNT_FILE = os.environ["BENCH_COUNT_FILE"]
    MARKS = {}

    app = Flask(__name__)

    if KIND in ("thread", "process"):
        # Only these cases have hostkit: "none" and "bare" are what an app without it runs.
        from hostkit import BackgroundService, HostBuilder
        from hostkit.contention import LagProbe
        from hostkit.flask import Hostkit

        class Cruncher(BackgroundService):
            def __init__(self, count_file):
                self.count_file = count_file

            def execute(self, stopping):
                crunch(stopping, self.count_file)

        def make_builder():
            b = HostBuilder()
            b.options.shutdown_timeout = 5
            for i in range(CHILDREN):
                svc, name = Cruncher(f"{COUNT_FILE}-{i}"), f"Cruncher-{i}"
                if KIND == "thread":
                    b.add_hosted_service(svc, placement="thread", name=name)
                else:
                    # "low" is hostkit's default: not passed, so the default is what runs.
                    priority = None if PRIORITY == "low" else PRIORITY
                    b.add_hosted_service(
                        svc, placement="process", name=name, cpu_priority=priority, keep_cores=KEEP or None
                    )
            return b

        contention = {"interval": 1.0, "log_every": None, "probe": LagProbe(window=60.0)}
        if os.environ["BENCH_MONITOR"] == "0":
            contention = False
        app.config.update(HOSTKIT_START="manual", HOSTKIT_CONTENTION=contention)
        Hostkit(app, builder=make_builder)

    @app.get("/")
    def index():
        # A small handler: about a millisecond of Python work, like rendering a little JSON.
        return jsonify(total=sum(i * i for i in range(2000)))

    @app.get("/_marks")
    def marks():
        lag, monitor_cpu = None, None
        if KIND in ("thread", "process") and os.environ["BENCH_MONITOR"] == "1":
            monitor = Hostkit.state(app).embedded.monitor
            lag, monitor_cpu = monitor.probe.summary(), monitor.cpu_seconds + monitor.probe.cpu_seconds
        return jsonify(marks=MARKS, lag=lag, monitor_cpu_seconds=monitor_cpu, now=time.monotonic())
    """
)

CONF = _load.GUNICORN_SETTINGS + textwrap.dedent(
    """
    import os, time

    HOSTKIT = os.environ["BENCH_KIND"] in ("thread", "process")
    if HOSTKIT:
        import hostkit.gunicorn as hk
    _bare = []

    def post_worker_init(worker):
        import _load, bench_app
        bench_app.MARKS["host_start"] = time.monotonic()
        if HOSTKIT:
            hk.post_worker_init(worker)
        elif bench_app.KIND == "bare":
            import multiprocess
            ctx = multiprocess.get_context("forkserver")  # hostkit's default start method
            for i in range(bench_app.CHILDREN):
                stopping = ctx.Event()
                args = (stopping, f"{bench_app.COUNT_FILE}-{i}", bench_app.PRIORITY, bench_app.KEEP)
                child = ctx.Process(target=_load.bare_child, args=args, name=f"bare-{i}")
                child.start()
                _bare.append((child, stopping))
        bench_app.MARKS["host_started"] = time.monotonic()

    def worker_exit(server, worker):
        for child, stopping in _bare:
            stopping.set()
        for child, stopping in _bare:
            child.join(10)
        if HOSTKIT:
            hk.worker_exit(server, worker)
    """
)


def run_case(case: Case, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    count_file = workdir / f"count-{case.name}"
    for old in workdir.glob(f"count-{case.name}-*"):
        old.unlink()
    env = dict(
        os.environ,
        BENCH_KIND=case.kind,
        BENCH_CHILDREN=str(case.children),
        BENCH_PRIORITY=case.priority,
        BENCH_KEEP=str(case.keep_cores),
        BENCH_COUNT_FILE=str(count_file),
        BENCH_MONITOR="0" if args.no_monitor else "1",
    )
    with _load.gunicorn(workdir, env, "/_marks", case.name) as port:
        before = _load.get_json(port, "/_marks")
        requests = _load.open_loop(port, args.rate, args.duration)
        report = _load.get_json(port, "/_marks")
        rates = [_load.iterations_per_second(f"{count_file}-{i}") for i in range(case.children)]
    start = report["marks"]["host_start"]
    result: dict[str, Any] = {
        **_load.latency_summary(requests),
        "host_start_ms": (report["marks"]["host_started"] - start) * 1000,
        "load_began_after_start_s": requests[0][0] - start,
        "bg_iter_per_s": sum(r for r in rates if r is not None) if case.children else None,
        "children_reporting": sum(r is not None for r in rates),
        "lag_p99_ms": report["lag"]["p99"] if report["lag"] else None,
        # The contention monitor's own CPU (sampler and lag probe threads), % of one core.
        "monitor_cpu_percent": None
        if report["monitor_cpu_seconds"] is None
        else (report["monitor_cpu_seconds"] - before["monitor_cpu_seconds"]) / (report["now"] - before["now"]) * 100,
        # (due time after the host's start s, latency ms) of every request: the chart over time.
        "series": [(round(due - start, 4), round(latency * 1000, 3)) for due, latency in requests],
    }
    return result


def med(values: list[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return statistics.median(vs) if vs else None


def per_round_ratio(runs: list[dict[str, Any]], bases: list[dict[str, Any]], key: str) -> float | None:
    """The median over rounds of this case's ``key`` over the other case's, in the same round."""
    ratios = [
        run[key] / base[key]
        for run, base in zip(runs, bases, strict=True)
        if run[key] is not None and base[key] not in (None, 0)
    ]
    return med(ratios)


def summarise(cases: list[Case], per_case: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for case in cases:
        runs = per_case[case.name]
        s: dict[str, Any] = {
            k: med([r[k] for r in runs])
            for k in (
                "p50_ms",
                "p99_ms",
                "p999_ms",
                "max_ms",
                "bg_iter_per_s",
                "lag_p99_ms",
                "monitor_cpu_percent",
                "host_start_ms",
                "load_began_after_start_s",
            )
        }
        s["load_began_after_start_s_max"] = max(r["load_began_after_start_s"] for r in runs)
        s["requests_per_round"] = med([r["requests"] for r in runs])
        if "none" in per_case:
            s["p99_ratio_to_none"] = per_round_ratio(runs, per_case["none"], "p99_ms")
        twin = case.bare_twin
        if twin in per_case:
            for key in ("p99_ms", "p999_ms", "max_ms", "bg_iter_per_s"):
                s[f"{key.removesuffix('_ms')}_ratio_to_bare"] = per_round_ratio(runs, per_case[twin], key)
        summary[case.name] = s
    return summary


def targets(summary: dict[str, dict[str, Any]]) -> list[Target]:
    def get(case: str, key: str) -> float | None:
        return summary.get(case, {}).get(key)

    out = [
        Target("process: p99 / bare child's (medians of per-round ratios)", get("process", "p99_ratio_to_bare"), 1.15),
        Target("process: p99.9 / bare child's", get("process", "p999_ratio_to_bare"), 1.5),
        Target("process3 (3 services, default priority): p99 / none", get("process3", "p99_ratio_to_none"), 2.0),
        Target("process3-keep (keep_cores=1): p99 / none", get("process3-keep", "p99_ratio_to_none"), 1.3),
    ]
    extra = [c for c in ("process3-batch", "process3-idle") if c in summary]
    for case in ["process", "process3-os", "process3", "process3-keep", *extra]:
        out.append(
            Target(
                f"{case}: background iterations/s / bare at the same priority",
                get(case, "bg_iter_per_s_ratio_to_bare"),
                0.95,
                op=">=",
            )
        )
    # Issue 5's checks of the monitor: its lag probe tells a GIL-holding thread from a child,
    # and it costs under 1% of a core.
    lag_thread, lag_process = get("thread", "lag_p99_ms"), get("process", "lag_p99_ms")
    separation = None if lag_thread is None or not lag_process else lag_thread / lag_process
    out.append(Target("lag probe p99: thread / process", separation, 2.0, op=">="))
    cost = [s["monitor_cpu_percent"] for s in summary.values() if s.get("monitor_cpu_percent") is not None]
    out.append(Target("contention monitor's own CPU (worst case)", max(cost) if cost else None, 1.0, unit="%"))
    began = [s["load_began_after_start_s_max"] for s in summary.values()]
    out.append(Target("measured window begins after the host's start (worst round)", max(began), 2.0, unit=" s"))
    return out


def table(cases: list[Case], summary: dict[str, dict[str, Any]]) -> str:
    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    header = (
        f"{'case':<15} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} {'max ms':>7} {'p99/none':>8} "
        f"{'p99/bare':>8} {'p99.9/bare':>10} {'bg iter/s':>9} {'iter/bare':>9} {'lag p99':>7} {'began s':>7}"
    )
    lines = [header, "-" * len(header)]
    for case in cases:
        s = summary[case.name]
        lines.append(
            f"{case.name:<15} {f(s['p50_ms'], '.2f'):>7} {f(s['p99_ms'], '.2f'):>7} {f(s['p999_ms'], '.1f'):>8} "
            f"{f(s['max_ms'], '.1f'):>7} {f(s.get('p99_ratio_to_none'), '.2f'):>8} "
            f"{f(s.get('p99_ratio_to_bare'), '.2f'):>8} {f(s.get('p999_ratio_to_bare'), '.2f'):>10} "
            f"{f(s['bg_iter_per_s'], ',.0f'):>9} {f(s.get('bg_iter_per_s_ratio_to_bare'), '.3f'):>9} "
            f"{f(s['lag_p99_ms'], '.1f'):>7} {f(s['load_began_after_start_s'], '.2f'):>7}"
        )
    return "\n".join(lines)


def draw(cases: list[Case], per_case: dict[str, list[dict[str, Any]]], folder: Path) -> list[Path]:
    """Two PNGs: every case's latency distribution, and latency over time from the host's start."""
    try:
        import matplotlib
    except ImportError:
        print('no charts: matplotlib is not installed (pip install -e ".[bench]")', file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    colours = plt.get_cmap("tab10")
    family = {}  # a case and its bare twin share a colour: hostkit solid, bare dashed
    for case in cases:
        key = case.name.removeprefix("process").removeprefix("bare") or "1"
        family.setdefault(key if case.kind in ("process", "bare") else case.name, len(family))

    def colour(case: Case) -> Any:
        key = case.name.removeprefix("process").removeprefix("bare") or "1"
        return colours(family[key if case.kind in ("process", "bare") else case.name] % 10)

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for case in cases:
        lat = sorted(ms for run in per_case[case.name] for _, ms in run["series"])
        n = len(lat)
        # Fraction of requests slower than each latency: the tail reads off the bottom right.
        ax.step(
            lat,
            [(n - i) / n for i in range(n)],
            where="post",
            color=colour(case),
            linestyle="--" if case.kind == "bare" else "-",
            linewidth=1.4,
            label=case.name,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    pooled = max(sum(len(run["series"]) for run in runs) for runs in per_case.values())
    ax.set_ylim(0.5 / pooled, 1.05)
    ax.set_xlabel("request latency from its due time (ms)")
    ax.set_ylabel("fraction of requests slower")
    ax.set_title("Request latency beside CPU-bound background work (hostkit solid, bare children dashed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    dist = folder / "contention-latency.png"
    fig.savefig(dist, dpi=110)
    plt.close(fig)

    shown = [c for c in cases if c.name in ("none", "bare3-os", "process3-os", "process3", "process3-keep", "process")]
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 1.45 * len(shown) + 0.8), sharex=True, sharey=True)
    for ax, case in zip(list(getattr(axes, "flat", [axes])), shown, strict=True):
        runs = per_case[case.name]
        # The round whose p99 is the median one: a typical round, not the best or the worst.
        run = sorted(runs, key=lambda r: r["p99_ms"])[len(runs) // 2]
        t, ms = zip(*run["series"], strict=True)
        ax.plot(t, ms, ".", markersize=2, color=colour(case))
        ax.axvline(0.0, color="black", linewidth=1)
        ax.axvline(run["host_start_ms"] / 1000, color="black", linewidth=1, linestyle=":")
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(f"{case.name}: p99 {run['p99_ms']:.1f} ms, max {run['max_ms']:.0f} ms", fontsize=9, loc="left")
        ax.grid(True, alpha=0.3)
    axes_list = list(getattr(axes, "flat", [axes]))
    axes_list[-1].set_xlabel(
        "seconds after the host's start (solid line: the host starts; dotted: started); one typical round per case"
    )
    fig.tight_layout()
    over_time = folder / "contention-over-time.png"
    fig.savefig(over_time, dpi=110)
    plt.close(fig)
    return [dist, over_time]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 6 s per case")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds of load per case and round (>= 10)")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second (open loop)")
    parser.add_argument("--candidates", action="store_true", help="add the SCHED_BATCH and SCHED_IDLE cases")
    known = [c.name for c in CASES + CANDIDATES]
    parser.add_argument("--cases", nargs="+", choices=known, default=None, help="run only these cases")
    parser.add_argument(
        "--no-monitor", action="store_true", help="hostkit cases without the contention monitor and its lag probe"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--figures", type=Path, default=FIGURES, help="folder for the PNGs (default docs/_static)")
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 5)
    args.duration = args.duration or (6.0 if args.quick else 10.0)
    pool = CASES + (CANDIDATES if args.candidates or args.cases else [])
    cases = [c for c in pool if args.cases is None or c.name in args.cases]

    per_case: dict[str, list[dict[str, Any]]] = {c.name: [] for c in cases}
    calibration: list[float] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hostkit-contention-") as tmp:
        workdir = Path(tmp)
        (workdir / "bench_app.py").write_text(APP)
        (workdir / "bench_conf.py").write_text(CONF)
        for r in range(rounds):
            calibration.append(calibrate())
            order = cases[r % len(cases) :] + cases[: r % len(cases)]
            for case in order:
                res = run_case(case, args, workdir)
                per_case[case.name].append(res)
                print(
                    f"round {r + 1}/{rounds} {case.name:<15} p99={res['p99_ms']:.1f} p99.9={res['p999_ms']:.1f} "
                    f"max={res['max_ms']:.1f} ms iter/s={res['bg_iter_per_s'] or 0:.0f} "
                    f"began {res['load_began_after_start_s']:.2f} s after the host's start",
                    file=sys.stderr,
                )

    summary = summarise(cases, per_case)
    print(table(cases, summary))
    print(
        f"\n{args.rate:g} req/s open loop from the worker's first answer, {args.duration:g} s x {rounds} round(s) "
        f"per case in rotating order, medians; ratios are medians of per-round ratios. "
        f"{os.cpu_count()} CPUs; calibration {statistics.median(calibration) * 1000:.1f} ms; "
        f"took {time.monotonic() - began:.0f} s"
    )
    checked = report_targets(targets(summary))
    figures = [] if args.no_figures else draw(cases, per_case, args.figures)
    for path in figures:
        print(f"wrote {path}")
    write_json(
        args.output,
        {
            "benchmark": "contention",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "rate": args.rate,
            "duration_s": args.duration,
            "rounds": rounds,
            "monitor": not args.no_monitor,
            "calibration_s": calibration,
            "summary": summary,
            "targets": checked,
            "figures": [str(p) for p in figures],
            "rounds_detail": per_case,
        },
    )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
