"""Clocks and slot recorders for the CronTimer tests; children import them, so they live in a module.

A test cannot wait for 02:30 on a spring-forward day, nor for several one-minute
slots, in real time: these clocks are the injected ``clock=`` of a CronTimer.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone

from hostkit import CancellationToken

UTC = timezone.utc


class FastForwardClock:
    """Each wait takes ``real_step`` real seconds (or ends at once on a cancel) and moves time by what was asked."""

    def __init__(self, start: datetime, real_step: float = 0.02) -> None:
        self.current = start.astimezone(UTC)
        self.real_step = real_step

    def now(self) -> datetime:
        return self.current

    def wait(self, token: CancellationToken, seconds: float) -> bool:
        if token.wait(self.real_step):
            return True
        self.current += timedelta(seconds=seconds)
        return False


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
