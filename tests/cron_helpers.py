"""Clocks and slot recorders for the CronTimer tests; children import them, so they live in a module.

A test cannot wait for 02:30 on a spring-forward day, nor for several one-minute
slots, in real time: these clocks are the injected ``clock=`` of a CronTimer.

As a script, ``python tests/cron_helpers.py host URL KEY RECORD_DIR EPOCH SPEED`` runs
a host standing for one machine: its only service is
``OncePerDeployment(Slots(), lock=RedisLease(URL, key=KEY))``, and ``Slots`` runs
``CronTimer("* * * * *")`` on an :class:`AcceleratedClock` (one minute every
``60 / SPEED`` real seconds). Each run takes half a second of real time, then
appends its slot to a fenced record in the same Redis (refused for a token lower
than the highest seen). Each event goes to ``RECORD_DIR/<pid>.log`` as
``event slot token monotonic-time``: ``begin``, ``done``, ``refused``, ``hanging``. While the file
``RECORD_DIR/hang`` exists, a run that begins hangs in the middle (``hanging`` is
logged), for a test to kill it there.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timedelta, timezone

if not __package__:  # run as a script: make the `tests` package and hostkit importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hostkit import CancellationToken

UTC = timezone.utc


class FastForwardClock:
    """Each wait takes ``real_step`` real seconds (or ends at once on a cancel) and moves time by what was asked.

    A CronTimer waits at most a minute at a time, so an hourly slot is 60 such waits.
    """

    def __init__(self, start: datetime, real_step: float = 0.002) -> None:
        self.current = start.astimezone(UTC)
        self.real_step = real_step

    def now(self) -> datetime:
        return self.current

    def wait(self, token: CancellationToken, seconds: float) -> bool:
        if token.wait(self.real_step):
            return True
        self.current += timedelta(seconds=seconds)
        return False


class GateClock:
    """Fake time that moves only while the test holds ``gate`` open; ``waiting`` is set while a wait is blocked.

    In one process only (it holds events): for a thread-placed service.
    """

    def __init__(self, start: datetime) -> None:
        import threading

        self.current = start.astimezone(UTC)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def now(self) -> datetime:
        return self.current

    def wait(self, token: CancellationToken, seconds: float) -> bool:
        while not self.gate.is_set():
            self.waiting.set()
            if token.wait(0.01):
                return True
        self.waiting.clear()
        self.current += timedelta(seconds=seconds)
        return token.is_set()


class AcceleratedClock:
    """Time that runs ``speed`` times faster than the wall clock, from ``start`` at the real moment ``epoch``.

    Every process given the same three numbers reads the same time (they share
    the machine's wall clock), so hosts in separate processes agree on when a
    slot is due, as machines synchronised by NTP do. A wait is a real wait on the
    token, ``speed`` times shorter.
    """

    def __init__(self, start: datetime, epoch: float, speed: float) -> None:
        self.start = start.astimezone(UTC)
        self.epoch = epoch
        self.speed = speed

    def now(self) -> datetime:
        return self.start + timedelta(seconds=(time.time() - self.epoch) * self.speed)

    def wait(self, token: CancellationToken, seconds: float) -> bool:
        return token.wait(seconds / self.speed)


class SlotFile:
    """A ScheduledService function: appends each slot (ISO format) and this process's pid to a file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def __call__(self, slot: datetime) -> None:
        with open(self.path, "a") as f:
            f.write(f"{slot.isoformat()} {os.getpid()}\n")


def read_slots(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    try:
        with open(path) as f:
            return [(slot, int(pid)) for slot, pid in (line.split() for line in f if line.strip())]
    except FileNotFoundError:
        return []


#: The fake time at the real moment EPOCH: every host process reads the same time.
CLUSTER_START = datetime(2026, 3, 29, 0, 0, 0, tzinfo=UTC)
#: Real seconds one run takes.
RUN_SECONDS = 0.5

# The fenced append: refuse a token lower than the highest seen, else record it and append.
FENCED_APPEND = """
local seen = tonumber(redis.call('GET', KEYS[1]) or '0')
local token = tonumber(ARGV[1])
if token < seen then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[2] .. ' ' .. ARGV[1] .. ' ' .. ARGV[3])
return 1
"""


def record_keys(key: str) -> list[str]:
    """The fence and the list of the fenced record of slots."""
    return [f"resource:{key}:fence", f"resource:{key}:slots"]


def read_events(folder: str | os.PathLike[str]) -> dict[int, list[tuple[str, str, int, float]]]:
    """Every host's events, by pid: (event, slot, token, monotonic time)."""
    events: dict[int, list[tuple[str, str, int, float]]] = {}
    for name in os.listdir(folder):
        if name.endswith(".log"):
            with open(os.path.join(folder, name)) as f:
                rows = [line.split() for line in f]
            events[int(name[:-4])] = [
                (e, slot, int(tok), float(t)) for e, slot, tok, t in (r for r in rows if len(r) == 4)
            ]
    return events


def run_host(url: str, key: str, folder: str, epoch: float, speed: float) -> None:
    import redis

    from hostkit import BackgroundService, CronTimer, HostBuilder, OncePerDeployment
    from hostkit.cluster import RedisLease, current_lease

    log_path = os.path.join(folder, f"{os.getpid()}.log")
    hang_flag = os.path.join(folder, "hang")

    def record(event: str, slot: datetime, token: int) -> None:
        with open(log_path, "a") as f:
            f.write(f"{event} {slot.isoformat()} {token} {time.monotonic():.6f}\n")

    class Slots(BackgroundService):
        def execute(self, stopping: CancellationToken) -> None:
            lease = current_lease()
            assert lease is not None and lease.token is not None
            token = lease.token
            client = redis.Redis.from_url(url)
            append = client.register_script(FENCED_APPEND)
            clock = AcceleratedClock(CLUSTER_START, epoch, speed)
            timer = CronTimer("* * * * *", stopping, clock=clock, misfire="skip")
            for slot in timer:
                record("begin", slot, token)
                if os.path.exists(hang_flag):
                    record("hanging", slot, token)
                    while os.path.exists(hang_flag):  # stuck mid-run, until the test kills this process
                        time.sleep(0.05)
                if stopping.wait(RUN_SECONDS):
                    return  # stopped mid-run: the slot stays begun, not completed
                done = int(append(keys=record_keys(key), args=[token, slot.isoformat(), os.getpid()])) == 1
                record("done" if done else "refused", slot, token)

    lock = RedisLease(url, key=key, ttl=2.0)
    builder = HostBuilder()
    builder.add_hosted_service(OncePerDeployment(Slots(), lock=lock, poll_interval=0.05), name="Slots")
    print("ready", flush=True)
    builder.build().run()


if __name__ == "__main__":
    if sys.argv[1] != "host":
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
    run_host(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), float(sys.argv[6]))
