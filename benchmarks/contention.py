"""Does a CPU-bound background service hurt a Flask app's tail latency? Thread vs process placement.

A Flask app on gunicorn (gthread, 1 worker, 4 threads, 127.0.0.1) is driven by an
open-loop load: requests are scheduled at a fixed rate well below saturation, each
one's latency is measured from its *intended* send time (so a stalled server is
charged for the requests it delayed), over persistent connections. Three cases:

  (a) no background service
  (b) a CPU-bound background service with placement="thread"
  (c) the same service with placement="process"

Each round starts a fresh gunicorn per case (cases interleaved, so slow drift of
the machine hits all three alike). For every case it reports, as medians over the
rounds: p50, p99, p99.9 and max latency, the p99 ratio to (a) (median of per-round
ratios), the background service's iterations per second, the scheduling-lag probe's
p99 (hostkit.contention.LagProbe, read inside the web worker), and the contention
monitor's own CPU (sampler and probe threads, % of one core at a 1 s interval).
A calibration loop timed beside each round tells how fast the machine was.

    python benchmarks/contention.py            # 3 rounds x 10 s per case (about 2 minutes)
    python benchmarks/contention.py --quick    # 1 round x 4 s per case

Writes benchmarks/results/contention.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "contention.json"
CASES = (("a", "none"), ("b", "thread"), ("c", "process"))

APP = textwrap.dedent(
    """
    import os, threading, time
    from flask import Flask, jsonify
    from hostkit import BackgroundService, HostBuilder
    from hostkit.contention import LagProbe
    from hostkit.flask import Hostkit

    MODE = os.environ["BENCH_MODE"]
    COUNT_FILE = os.environ["BENCH_COUNT_FILE"]

    class Cruncher(BackgroundService):
        # Pure-Python CPU work: holds the GIL except at the interpreter's switch points.
        def execute(self, stopping):
            done, last = 0, time.monotonic()
            while not stopping.is_set():
                n = 0
                for i in range(10_000):
                    n += i * i
                done += 1
                now = time.monotonic()
                if now - last >= 0.25:
                    last = now
                    with open(COUNT_FILE + ".tmp", "w") as f:
                        f.write(f"{done} {now}")
                    os.replace(COUNT_FILE + ".tmp", COUNT_FILE)

    def make_builder():
        b = HostBuilder()
        b.options.shutdown_timeout = 5
        if MODE == "thread":
            b.add_hosted_service(Cruncher(), placement="thread")
        elif MODE == "process":
            nice = os.environ.get("BENCH_NICE")
            b.add_hosted_service(Cruncher(), placement="process", nice=int(nice) if nice else None)
        return b

    app = Flask(__name__)
    # The probe's window covers the measured load only (it is read right after it).
    probe = LagProbe(window=float(os.environ["BENCH_WINDOW"]))
    app.config.update(HOSTKIT_START="manual", HOSTKIT_CONTENTION={"interval": 1.0, "log_every": None, "probe": probe})
    hostkit = Hostkit(app, builder=make_builder)

    @app.get("/")
    def index():
        # A small handler: about a millisecond of Python work, like rendering a little JSON.
        return jsonify(total=sum(i * i for i in range(2000)))

    @app.get("/_stats")
    def stats():
        monitor = Hostkit.state(app).embedded.monitor
        probe = monitor.probe
        return jsonify(
            lag=probe.summary(),
            monitor_cpu_seconds=monitor.cpu_seconds + probe.cpu_seconds,
            sampler_cpu_seconds=monitor.cpu_seconds,
            probe_cpu_seconds=probe.cpu_seconds,
            now=time.monotonic(),
        )
    """
)

CONF = textwrap.dedent(
    """
    from hostkit.gunicorn import post_worker_init, worker_exit
    worker_class = "gthread"
    workers = 1
    threads = 4
    keepalive = 30
    graceful_timeout = 10
    control_socket_disable = True
    accesslog = None
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def calibrate(seconds: float = 0.5) -> float:
    """Iterations per second of the same loop the background service runs, on this process alone."""
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        n = 0
        for i in range(10_000):
            n += i * i
        done += 1
    return done / (time.perf_counter() - began)


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return json.loads(resp.read())  # type: ignore[no-any-return]
    finally:
        conn.close()


def open_loop(port: int, rate: float, duration: float, senders: int = 16) -> list[float]:
    """Send ``rate`` requests/s for ``duration`` s; return each latency (s) from its intended send time.

    Request i is due at t0 + i/rate and belongs to sender i % senders; a sender that is
    late sends at once, and the wait counts in the latency (no coordinated omission).
    """
    total = int(rate * duration)
    t0 = time.perf_counter() + 0.2
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def sender(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        for i in range(k, total, senders):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException) as err:
                errors.append(repr(err))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            mine.append(time.perf_counter() - due)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print(f"  warning: {len(errors)} request(s) failed, e.g. {errors[0]}", file=sys.stderr)
    return latencies


def pct(values: list[float], q: float) -> float:
    data = sorted(values)
    rank = max(int(-(-q / 100.0 * len(data) // 1)), 1)
    return data[min(rank, len(data)) - 1]


def run_case(mode: str, rate: float, duration: float, workdir: Path, nice: int | None = None) -> dict:
    port = free_port()
    count_file = workdir / f"count-{mode}"
    count_file.unlink(missing_ok=True)
    env = dict(
        os.environ,
        BENCH_MODE=mode,
        BENCH_COUNT_FILE=str(count_file),
        BENCH_WINDOW=str(duration),
        BENCH_NICE="" if nice is None else str(nice),
        PYTHONPATH=os.pathsep.join([str(workdir), str(ROOT)]),
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(workdir / "bench_conf.py"),
            "--bind",
            f"127.0.0.1:{port}",
            "bench_app:app",
        ],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get_json(port, "/_stats")
                break
            except (OSError, http.client.HTTPException, ValueError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(
                        f"gunicorn did not come up for mode={mode}: {proc.stderr.read() if proc.stderr else ''}"
                    ) from None
                time.sleep(0.1)
        time.sleep(1.0)  # let the background service reach its steady state
        before = get_json(port, "/_stats")
        count_before = _read_count(count_file)
        latencies = open_loop(port, rate, duration)
        count_after = _read_count(count_file)
        after = get_json(port, "/_stats")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    elapsed = after["now"] - before["now"]
    iters = None
    if count_before and count_after and count_after[1] > count_before[1]:
        iters = (count_after[0] - count_before[0]) / (count_after[1] - count_before[1])
    return {
        "requests": len(latencies),
        "p50_ms": pct(latencies, 50) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
        "p999_ms": pct(latencies, 99.9) * 1000,
        "max_ms": max(latencies) * 1000,
        "bg_iter_per_s": iters,
        "lag_p50_ms": after["lag"]["p50"],
        "lag_p99_ms": after["lag"]["p99"],
        "monitor_cpu_percent": (after["monitor_cpu_seconds"] - before["monitor_cpu_seconds"]) / elapsed * 100,
        "sampler_cpu_percent": (after["sampler_cpu_seconds"] - before["sampler_cpu_seconds"]) / elapsed * 100,
        "probe_cpu_percent": (after["probe_cpu_seconds"] - before["probe_cpu_seconds"]) / elapsed * 100,
    }


def _read_count(path: Path) -> tuple[int, float] | None:
    try:
        done, when = path.read_text().split()
    except (OSError, ValueError):
        return None
    return int(done), float(when)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 4 s per case")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds of load per case and round")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second (open loop)")
    parser.add_argument(
        "--process-nice",
        type=int,
        default=None,
        metavar="N",
        help="run case (c)'s child with nice=N (on a busy machine it then yields its core to the web worker)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON file (default {RESULTS.relative_to(ROOT)})")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration or (4.0 if args.quick else 10.0)

    try:
        import hostkit._process.runner  # noqa: F401

        have_process = True
    except ImportError:
        have_process = False
    cases = [(label, mode) for label, mode in CASES if mode != "process" or have_process]

    per_case: dict[str, list[dict]] = {label: [] for label, _ in cases}
    calibration: list[float] = []
    with tempfile.TemporaryDirectory(prefix="hostkit-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "bench_app.py").write_text(APP)
        (workdir / "bench_conf.py").write_text(CONF)
        for r in range(rounds):
            calibration.append(calibrate())
            for label, mode in cases:
                result = run_case(mode, args.rate, duration, workdir, args.process_nice)
                per_case[label].append(result)
                print(
                    f"round {r + 1}/{rounds} ({label}) {mode:<7} p99={result['p99_ms']:.1f} ms "
                    f"lag_p99={result['lag_p99_ms']} ms iter/s={result['bg_iter_per_s']}",
                    file=sys.stderr,
                )

    def med(values: list[float | None]) -> float | None:
        vs = [v for v in values if v is not None]
        return statistics.median(vs) if vs else None

    summary = {}
    for label, mode in cases:
        runs = per_case[label]
        ratios = [run["p99_ms"] / base["p99_ms"] for run, base in zip(runs, per_case["a"], strict=True)]
        summary[label] = {
            "mode": mode,
            **{k: med([run[k] for run in runs]) for k in runs[0] if k != "requests"},
            "requests_per_round": med([run["requests"] for run in runs]),
            "p99_ratio_to_a": med(ratios),
        }

    header = (
        f"{'case':<12} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8} {'p99/(a)':>8} "
        f"{'bg iter/s':>10} {'lag p50 ms':>11} {'lag p99 ms':>11} {'monitor %cpu':>13}"
    )
    lines = [header, "-" * len(header)]
    for label, mode in cases:
        s = summary[label]
        iters = "-" if s["bg_iter_per_s"] is None else f"{s['bg_iter_per_s']:.0f}"
        lines.append(
            f"({label}) {mode:<8} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} {s['p999_ms']:>9.2f} {s['max_ms']:>8.1f} "
            f"{s['p99_ratio_to_a']:>8.2f} {iters:>10} {s['lag_p50_ms']:>11.2f} {s['lag_p99_ms']:>11.2f} "
            f"{s['monitor_cpu_percent']:>13.3f}"
        )
    cal = statistics.median(calibration)
    lines.append("")
    lines.append(
        f"rate {args.rate:g} req/s open loop, {duration:g} s x {rounds} round(s) per case, medians; "
        f"calibration (same loop, alone): {cal:.0f} iter/s"
    )
    if not have_process:
        lines.append("(c) skipped: placement='process' is not available in this checkout")
    if have_process and args.process_nice is not None:
        lines.append(f"(c) child runs with nice={args.process_nice}")
    print("\n".join(lines))

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "contention",
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "rate": args.rate,
                "process_nice": args.process_nice,
                "duration_s": duration,
                "rounds": rounds,
                "calibration_iter_per_s": calibration,
                "summary": summary,
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
