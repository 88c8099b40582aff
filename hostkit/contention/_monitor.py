"""The contention monitor: per-service CPU from psutil, the lag probe, request latency, advice.

Every ``interval`` seconds a sampler thread reads, with psutil:

- the process: CPU (100 = one core), voluntary and involuntary context switches,
  RSS, thread count;
- each running background service: CPU of its thread (``Process().threads()``
  by the native id the runner recorded) for ``placement="thread"``, or of its
  child process (by pid: CPU, RSS, context switches) for ``placement="process"``;
- the lag probe's and the request-latency recorder's summaries.

It keeps the latest :class:`ContentionSnapshot`, logs one line per
``log_every`` seconds, writes the snapshot as JSON to a file ``hostkit top``
reads (the control address: ``top-<pid>.json`` in hostkit's private runtime
directory, mode 0600, so no other local user can plant a link there or a fake
snapshot), and logs a recommendation when a thread-placed service takes more
than its share of the GIL, or busy children take every core, while the lag probe
or request latency says the others are waiting.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psutil
from loguru import logger

from .._rundir import runtime_dir
from .._validate import to_seconds
from ..exceptions import HostStateError
from ._latency import LatencyRecorder
from ._probe import LagProbe

if TYPE_CHECKING:
    from .._host import Host

__all__ = ["ContentionMonitor", "ContentionSnapshot", "advise", "snapshot_path"]

_log = logger.bind(service="contention")


def snapshot_path(pid: int) -> str:
    """Where the monitor of process ``pid`` of this user publishes its snapshot (``hostkit top`` reads it).

    ``top-<pid>.json`` in hostkit's private runtime directory (``$XDG_RUNTIME_DIR/hostkit``,
    else ``<tempdir>/hostkit-<uid>``, mode 0700); the directory is not created here.

    Raises:
        UnsafePathError: that directory's place is taken by something that is not this
            user's own private directory.
    """
    return os.path.join(runtime_dir(create=False), f"top-{pid}.json")


@dataclass(frozen=True)
class ContentionSnapshot:
    """What the monitor measured over its last interval.

    Attributes:
        time: when (Unix time).
        pid: the host's process.
        interval: seconds the CPU figures cover.
        process: ``cpu_percent``, ``ctx_voluntary``, ``ctx_involuntary`` (per second), ``rss``, ``threads``,
            ``cpus`` (how many CPUs it may use).
        services: per service: ``name``, ``placement``, ``state``, ``pid``, ``thread_id``,
            ``cpu_percent`` (``None`` if not running), ``detail``, ``lock``, ``cpu_priority`` and
            ``cpu_affinity`` (see :class:`~hostkit.ServiceStatus`), and for a child process ``rss``
            and context switches.
        lag: the lag probe's lateness summary (ms), or ``None`` without a probe.
        requests: the request-latency summary (ms), or ``None`` without a recorder.
        monitor_cpu_percent: the sampler's and the probe's own CPU over the interval (100 = one core).
        advice: recommendations, one sentence each.

    .. versionadded:: 0.1
    """

    time: float
    pid: int
    interval: float
    process: dict[str, Any]
    services: list[dict[str, Any]]
    lag: dict[str, Any] | None
    requests: dict[str, Any] | None
    monitor_cpu_percent: float
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "time": self.time,
            "pid": self.pid,
            "interval": self.interval,
            "process": dict(self.process),
            "services": [dict(s) for s in self.services],
            "lag": self.lag,
            "requests": self.requests,
            "monitor_cpu_percent": self.monitor_cpu_percent,
            "advice": list(self.advice),
        }

    def to_json(self) -> str:
        """The snapshot as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def log_line(self) -> str:
        """One human line: process CPU, lag, requests, and each service's CPU."""
        parts = [f"cpu={self.process['cpu_percent']:.0f}%", f"threads={self.process['threads']}"]
        if self.lag and self.lag["p99"] is not None:
            parts.append(f"lag_p99={self.lag['p99']:.1f}ms")
        if self.requests and self.requests["p99"] is not None:
            parts.append(f"req_p99={self.requests['p99']:.1f}ms (n={self.requests['count']})")
        for s in self.services:
            if s["cpu_percent"] is not None:
                parts.append(f"{s['name']}[{s['placement']}]={s['cpu_percent']:.0f}%")
        return " ".join(parts)


def advise(
    snapshot: ContentionSnapshot,
    *,
    share: float = 25.0,
    lag_threshold_ms: float = 10.0,
    request_baseline_ms: float | None = None,
    request_factor: float = 2.0,
) -> list[str]:
    """Recommendations for ``snapshot``: services that make the host's requests wait.

    Either the lag probe's p99 passed ``lag_threshold_ms`` or the request p99 passed
    ``request_factor`` times ``request_baseline_ms``; then:

    - a thread-placed service that used more than ``share`` percent of a core should
      move to ``placement="process"``;
    - when busy children (process-placed services using more than half a core each)
      leave no CPU free for the host's request threads, each busy child still at a
      higher priority than ``cpu_priority="low"`` should get it, and a busy child
      already there should leave a core to the host (``keep_cores=1``).

    .. versionadded:: 0.1
    """
    items = _advice(
        snapshot,
        share=share,
        lag_threshold_ms=lag_threshold_ms,
        request_baseline_ms=request_baseline_ms,
        request_factor=request_factor,
    )
    return [text for _, text in items]


def _advice(
    snapshot: ContentionSnapshot,
    *,
    share: float,
    lag_threshold_ms: float,
    request_baseline_ms: float | None,
    request_factor: float,
) -> list[tuple[str, str]]:
    """(service name, sentence) for each service to move."""
    lag_p99 = snapshot.lag["p99"] if snapshot.lag else None
    req_p99 = snapshot.requests["p99"] if snapshot.requests else None
    reasons = []
    if lag_p99 is not None and lag_p99 > lag_threshold_ms:
        reasons.append(f"the scheduling lag p99 was {lag_p99:.1f} ms (threshold {lag_threshold_ms:g} ms)")
    if req_p99 is not None and request_baseline_ms and req_p99 > request_factor * request_baseline_ms:
        reasons.append(f"the request p99 was {req_p99:.1f} ms ({req_p99 / request_baseline_ms:.1f}x its baseline)")
    if not reasons:
        return []
    out = []
    for s in snapshot.services:
        cpu = s["cpu_percent"]
        if s["placement"] == "thread" and cpu is not None and cpu > share:
            text = (
                f"move {s['name']!r} to placement='process': it used {cpu:.0f}% of a core on a thread of the "
                f"host's process (more than its share, {share:g}%) while {' and '.join(reasons)}"
            )
            out.append((s["name"], text))
    out.extend(_starving_children(snapshot, reasons))
    return out


#: A child using more than this much of a core (percent) counts as busy: it competes for a core.
_BUSY_CHILD = 50.0
#: The priorities (as ``ServiceStatus.cpu_priority`` words them) that yield to request threads.
_YIELDING = ("nice 19", "SCHED_BATCH, nice 19", "SCHED_IDLE")


def _starving_children(snapshot: ContentionSnapshot, reasons: list[str]) -> list[tuple[str, str]]:
    """(name, sentence) for each busy child when busy children take every CPU the host may use."""
    cpus = snapshot.process.get("cpus")
    busy = [
        s
        for s in snapshot.services
        if s["placement"] == "process" and s["cpu_percent"] is not None and s["cpu_percent"] > _BUSY_CHILD
    ]
    if not cpus or len(busy) < cpus:
        return []  # a core is left for the request threads: the scheduler need not choose
    pinned = [set(s["cpu_affinity"]) for s in busy if s.get("cpu_affinity") is not None]
    if len(pinned) == len(busy) and len(set().union(*pinned)) < cpus:
        return []  # the children are kept off at least one core: the host has it
    why = (
        f"{len(busy)} busy child process(es) compete for the host's {cpus} CPU(s), "
        f"leaving none to its request threads, while {' and '.join(reasons)}"
    )
    out = []
    for s in busy:
        name, priority = s["name"], s.get("cpu_priority") or "inherited"
        if priority not in _YIELDING:
            fix = f"give {name!r} cpu_priority='low' (nice 19; it runs at {priority})"
        elif s.get("cpu_affinity") is None:
            fix = f"give {name!r} keep_cores=1, to leave a core to the host (it runs at {priority} on every CPU)"
        else:
            continue  # pinned and yielding already: fewer children, or more cores, is the user's call
        out.append((name, f"{fix}: it used {s['cpu_percent']:.0f}% of a core, and {why}"))
    return out


def _ctx_switches(proc: psutil.Process) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of every thread of ``proc``.

    On Linux psutil reads ``/proc/<pid>/status``, which counts the main thread only;
    summing ``/proc/<pid>/task/*/status`` counts the service threads too.
    """
    task_dir = f"/proc/{proc.pid}/task"
    try:
        tids = os.listdir(task_dir)
    except OSError:
        c = proc.num_ctx_switches()
        return c.voluntary, c.involuntary
    vol = invol = 0
    for tid in tids:
        try:
            with open(f"{task_dir}/{tid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        invol += int(line.split()[1])
        except (OSError, ValueError):
            continue  # the thread ended between listdir() and open()
    return vol, invol


class _CpuClock:
    """CPU seconds per key, turned into percent of a core since the last reading."""

    def __init__(self) -> None:
        self._last: dict[object, float] = {}

    def percent(self, key: object, cpu: float, elapsed: float) -> float | None:
        before = self._last.get(key)
        self._last[key] = cpu
        if before is None or elapsed <= 0:
            return None
        return round(max(cpu - before, 0.0) / elapsed * 100.0, 1)


class ContentionMonitor:
    """Samples a host's services with psutil on a thread of its own.

    Args:
        host: the :class:`~hostkit.Host` to watch (its status gives each service's thread id and pid).
        interval: seconds between samples.
        probe: a :class:`LagProbe`, ``True`` for a default one, or ``False``.
        latency: a :class:`LatencyRecorder` fed by :class:`LatencyMiddleware`, or ``None``.
        log_every: seconds between log lines (``None``: never).
        publish: write the snapshot for ``hostkit top`` (``True``: :func:`snapshot_path`, in
            hostkit's private runtime directory; or a path). Written 0600 under a fresh name, then
            renamed into place.
        share, lag_threshold_ms, request_factor: see :func:`advise`.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        host: Host,
        *,
        interval: float | timedelta = 1.0,
        probe: LagProbe | bool = True,
        latency: LatencyRecorder | None = None,
        log_every: float | None = 60.0,
        publish: bool | str | os.PathLike[str] = False,
        share: float = 25.0,
        lag_threshold_ms: float = 10.0,
        request_factor: float = 2.0,
    ) -> None:
        self.interval = to_seconds(interval, "interval", allow_zero=False)
        self.host = host
        self.probe: LagProbe | None = LagProbe() if probe is True else (probe or None)
        self.latency = latency
        self.log_every = log_every
        if publish is True:
            runtime_dir()  # made (0700) and checked now: a problem shows before the monitor starts
            self.publish_path: str | None = snapshot_path(os.getpid())
        elif publish is False:
            self.publish_path = None
        else:
            self.publish_path = os.fspath(publish)
        self.share = share
        self.lag_threshold_ms = lag_threshold_ms
        self.request_factor = request_factor
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._latest: ContentionSnapshot | None = None
        self._lock = threading.Lock()
        self._cpu = _CpuClock()
        self._counts: dict[str, int] = {}
        self._children: dict[int, psutil.Process] = {}
        self._proc = psutil.Process()
        self._native_id: int | None = None
        self._last_time: float | None = None
        self._baseline_ms: float | None = None
        self._advised: dict[str, float] = {}
        self._latest_advice: list[tuple[str, str]] = []
        self._last_log = 0.0
        #: CPU seconds the sampler thread has used (``time.thread_time``).
        self.cpu_seconds = 0.0

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the sampler (and the probe) threads."""
        if self._thread is not None:
            msg = "ContentionMonitor.start() was called twice; a monitor starts once"
            raise HostStateError(msg)
        if self.probe is not None:
            self.probe.start()
        # The first reading primes the counters (a percentage needs two readings); it is not a snapshot.
        self.sample()
        with self._lock:
            self._latest = None
        self._thread = threading.Thread(target=self._run, name="hostkit-contention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop both threads and remove the published snapshot (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.probe is not None:
            self.probe.stop()
        if self.publish_path is not None:
            try:
                os.unlink(self.publish_path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> ContentionMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        self._native_id = threading.get_native_id()
        while not self._stop.wait(self.interval):
            began = time.thread_time()
            try:
                snap = self.sample()
                self._report(snap)
            except Exception:
                _log.opt(exception=True).warning("Contention sample failed; the monitor goes on")
            # thread_time() has nanosecond resolution; psutil's per-thread times count 10 ms ticks.
            self.cpu_seconds += time.thread_time() - began

    # -- sampling --------------------------------------------------------------------

    @property
    def latest(self) -> ContentionSnapshot | None:
        """The most recent snapshot, or ``None`` before the first interval."""
        with self._lock:
            return self._latest

    def snapshot(self) -> ContentionSnapshot:
        """The most recent snapshot; takes one now if there is none yet."""
        latest = self.latest
        return latest if latest is not None else self.sample()

    def sample(self) -> ContentionSnapshot:
        """Take a sample now and make it the latest snapshot."""
        now = time.monotonic()
        elapsed = 0.0 if self._last_time is None else now - self._last_time
        self._last_time = now
        proc = self._proc
        with proc.oneshot():
            times = proc.cpu_times()
            rss = proc.memory_info().rss
            nthreads = proc.num_threads()
        vol, invol = _ctx_switches(proc)
        per_thread = {t.id: t.user_time + t.system_time for t in proc.threads()}
        process = {
            "cpu_percent": self._cpu.percent("process", times.user + times.system, elapsed),
            "ctx_voluntary": self._rate("ctx_v", vol, elapsed),
            "ctx_involuntary": self._rate("ctx_i", invol, elapsed),
            "rss": rss,
            "threads": nthreads,
            # The CPUs this process may use: what its request threads and its children share.
            "cpus": len(os.sched_getaffinity(0)),
        }
        if process["cpu_percent"] is None:
            process["cpu_percent"] = 0.0
        own_cpu = self.cpu_seconds + (self.probe.cpu_seconds if self.probe else 0.0)
        own = self._cpu.percent("own", own_cpu, elapsed) or 0.0
        services = [self._service(s, per_thread, elapsed) for s in self.host.status().services]
        snap = ContentionSnapshot(
            time=time.time(),
            pid=os.getpid(),
            interval=round(elapsed, 3),
            process=process,
            services=services,
            lag=self.probe.summary() if self.probe else None,
            requests=self.latency.summary() if self.latency else None,
            monitor_cpu_percent=round(own, 2),
        )
        req_p99 = snap.requests["p99"] if snap.requests else None
        advice = _advice(
            snap,
            share=self.share,
            lag_threshold_ms=self.lag_threshold_ms,
            request_baseline_ms=self._baseline_ms,
            request_factor=self.request_factor,
        )
        if req_p99 is not None and snap.requests and snap.requests["count"] >= 20:
            # The baseline is the best window seen: latency when nothing was in the way.
            self._baseline_ms = req_p99 if self._baseline_ms is None else min(self._baseline_ms, req_p99)
        snap = ContentionSnapshot(**{**snap.__dict__, "advice": [text for _, text in advice]})
        with self._lock:
            self._latest = snap
            self._latest_advice = advice
        return snap

    def _rate(self, key: str, count: int, elapsed: float) -> float | None:
        """A counter's growth per second since the last reading."""
        before = self._counts.get(key)
        self._counts[key] = count
        if before is None or elapsed <= 0:
            return None
        return round(max(count - before, 0) / elapsed, 1)

    def _service(self, status: Any, per_thread: dict[int, float], elapsed: float) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": status.name,
            "placement": status.placement,
            "state": status.state.value,
            "pid": status.pid,
            "thread_id": status.thread_id,
            "cpu_percent": None,
            "detail": status.detail,
            "lock": None if status.lock is None else asdict(status.lock),
            "cpu_priority": status.cpu_priority,
            "cpu_affinity": None if status.cpu_affinity is None else list(status.cpu_affinity),
        }
        # "starting": a process-placed service's child exists (it has a pid) and its start-up costs too.
        if status.state.value not in ("starting", "running", "stopping"):
            return entry
        if status.placement == "process" and status.pid and status.pid != os.getpid():
            child = self._children.get(status.pid)
            try:
                if child is None:
                    child = self._children[status.pid] = psutil.Process(status.pid)
                with child.oneshot():
                    t = child.cpu_times()
                    entry["rss"] = child.memory_info().rss
                cv, ci = _ctx_switches(child)
                entry["cpu_percent"] = self._cpu.percent(("pid", status.pid), t.user + t.system, elapsed)
                entry["ctx_voluntary"] = self._rate(f"v{status.pid}", cv, elapsed)
                entry["ctx_involuntary"] = self._rate(f"i{status.pid}", ci, elapsed)
            except psutil.Error:
                self._children.pop(status.pid, None)
        elif status.thread_id is not None and status.thread_id in per_thread:
            entry["cpu_percent"] = self._cpu.percent(("tid", status.thread_id), per_thread[status.thread_id], elapsed)
        return entry

    def _report(self, snap: ContentionSnapshot) -> None:
        now = time.monotonic()
        if self.log_every is not None and now - self._last_log >= self.log_every:
            self._last_log = now
            _log.info("Contention: {}", snap.log_line())
        with self._lock:
            advice = list(self._latest_advice)
        for name, line in advice:
            # One recommendation per service per minute: advice, not noise.
            if now - self._advised.get(name, -1e9) >= 60.0:
                self._advised[name] = now
                _log.warning("Contention advice: {}", line)
        if self.publish_path is not None:
            self._publish(snap, self.publish_path)

    @staticmethod
    def _publish(snap: ContentionSnapshot, path: str) -> None:
        # mkstemp: a name nobody can guess, created exclusively (O_EXCL) with mode 0600, so
        # there is no link to follow even in a directory others may write.
        fd, tmp = tempfile.mkstemp(prefix=".top-", suffix=".tmp", dir=os.path.dirname(path) or ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(snap.to_json())
            # rename() is atomic, and replaces a link at `path` instead of following it:
            # `hostkit top` never reads half a snapshot.
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def __repr__(self) -> str:
        state = "running" if self._thread is not None and not self._stop.is_set() else "stopped"
        return f"<ContentionMonitor {state} interval={self.interval} s>"
