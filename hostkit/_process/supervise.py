"""Supervising one child from the host: launching it, watching it, ending it and what it left.

- :func:`launch` starts the child with SIGINT and SIGTERM blocked, so a signal
  sent while it starts waits for its handlers;
- :class:`Watchdog` samples the child's RSS and heartbeat between reads of its
  pipe, and says when it is over its ``memory_limit`` or hung;
- :func:`terminate` ends a child: SIGTERM to its process group, then SIGKILL;
- :func:`sweep` ends what a child left in its group once it has exited.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import multiprocess.connection as mpc
import psutil

from .._summary import heartbeat_age
from ..exceptions import MemoryLimitError, ServiceHungError
from .protocol import LAUNCH_BLOCKED, SharedState

__all__ = [
    "KILL_GRACE",
    "SAMPLE_INTERVAL",
    "Watchdog",
    "launch",
    "preload_in_fork_server",
    "signal_group",
    "sweep",
    "terminate",
]

#: Seconds between RSS / heartbeat samples while a child runs (when either is watched).
SAMPLE_INTERVAL = 0.2
#: Grace between SIGTERM and SIGKILL when the runner stops a hung or oversized child, and
#: for what a child left in its process group after it ended.
KILL_GRACE = 1.0
#: Seconds between checks that a swept process group is empty.
_SWEEP_POLL = 0.02
#: What hostkit asks the fork server to import once, so that each child need not: the
#: main module (multiprocess's own default, see below), the fork server's signal guard and the
#: child side with its target. loguru only if the main module refers to it (:func:`_main_uses_loguru`);
#: otherwise a child imports it only if its service logs, as a bare child would.
FORK_SERVER_PRELOAD = ("__main__", "hostkit._process.forkserver", "hostkit._process.child", "hostkit._process.entry")

_preload_lock = threading.Lock()
_preload_set = False


def _main_uses_loguru() -> bool:
    """``True`` if the program's main module refers to loguru (``import loguru``, ``from loguru import logger``).

    Each forkserver child imports the main module again (multiprocess's fork server
    does not, whatever its preload list says), so such a program's every child would
    import loguru on its own: the fork server imports it once instead.
    """
    main = sys.modules.get("__main__")
    for value in vars(main).values() if main is not None else ():
        module = value.__name__ if isinstance(value, ModuleType) else type(value).__module__
        if module == "loguru" or module.startswith("loguru."):
            return True
    return False


def preload_in_fork_server(ctx: Any) -> None:
    """Have the fork server import hostkit's child side once, so each child need not.

    Without it every forkserver child imports hostkit's child side and dill on its
    own (~20 ms here, most of a child's start); loguru too if the main module uses
    it. Set once per process, through the context's public ``set_forkserver_preload``;
    effective only if the fork server is not running yet. ``__main__`` stays first
    in the list, as multiprocess has it, though its fork server never gets the main
    module's path (its preparation data names it ``init_main_from_path``), so each
    child imports the main module itself, as under spawn.
    """
    global _preload_set
    with _preload_lock:
        if not _preload_set:
            extra = ["loguru"] if _main_uses_loguru() else []
            ctx.set_forkserver_preload([*FORK_SERVER_PRELOAD, *extra])
            _preload_set = True


def launch(process: Any, start_method: str) -> None:
    """``process.start()`` with SIGINT and SIGTERM blocked in this thread; the child inherits the mask.

    Until the child has installed its own handlers, a SIGINT or SIGTERM sent to it
    (to the whole group, as systemd does) would kill it (spawn: Python's defaults),
    or run the host's handler in it (fork). Blocked, the signal waits, and the child
    handles it once it is ready (``child_main`` unblocks). The fork server, if this
    call starts it, inherits the mask too and ignores both before it unblocks them.

    multiprocess's resource tracker unblocks both signals in the calling thread after
    it starts, so it is started first, outside the shielded part.
    """
    if start_method in ("spawn", "forkserver"):
        from multiprocess import resource_tracker

        resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, LAUNCH_BLOCKED)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Watchdog:
    """The child's RSS and heartbeat, sampled between reads of its pipe."""

    def __init__(
        self, pid: int, service: str, shared: SharedState, memory_limit: int | None, heartbeat_timeout: float | None
    ) -> None:
        self.pid = pid
        self.service = service
        self.shared = shared
        self.memory_limit = memory_limit
        self.heartbeat_timeout = heartbeat_timeout
        self.last_beat = 0.0
        self._ps: psutil.Process | None = None

    @property
    def tick(self) -> float | None:
        """How long the supervising thread may wait for the child before the next sample (``None``: no limit)."""
        if self.heartbeat_timeout is not None:
            return min(SAMPLE_INTERVAL, self.heartbeat_timeout / 4)
        return SAMPLE_INTERVAL if self.memory_limit is not None else None

    def new_beat(self) -> float | None:
        """The time of a heartbeat the child wrote since the last call, if any (watched services only)."""
        value = self.shared.beat
        if self.heartbeat_timeout is None or not value or value == self.last_beat:
            return None
        self.last_beat = value
        return value

    def over_memory(self) -> MemoryLimitError | None:
        """The error to stop the child with if its RSS is over its ``memory_limit``, else ``None``."""
        if self.memory_limit is None:
            return None
        rss = self._rss()
        if rss <= self.memory_limit:
            return None
        return MemoryLimitError(
            f"child process {self.pid} of {self.service!r} used {rss / 1e6:.1f} MB RSS, "
            f"over its memory_limit of {self.memory_limit / 1e6:.1f} MB; it was stopped"
        )

    def hung(self) -> ServiceHungError | None:
        """The error to stop the child with if its last heartbeat is older than its timeout, else ``None``."""
        timeout = self.heartbeat_timeout
        if timeout is None:
            return None
        # Counted from the last beat, or from when execute() began: the child's own
        # start-up (imports, unpickling, building the service) is no hang of its loop.
        age = heartbeat_age(self.last_beat, self.shared.executing)
        if age is None or age <= timeout:
            return None
        return ServiceHungError(
            f"child process {self.pid} of {self.service!r} sent no heartbeat for "
            f"{age:.1f} s (heartbeat_timeout {timeout:g} s); treated as a hang "
            f"and stopped"
        )

    def _rss(self) -> int:
        try:
            self._ps = self._ps or psutil.Process(self.pid)
            return int(self._ps.memory_info().rss)
        except psutil.Error:
            return 0


def signal_group(pid: int, signum: int) -> None:
    """Send ``signum`` to the process group a child leads (it and what it started), else to the child alone.

    A child that has not made its group yet (it is still starting) has none: then
    the signal goes to its pid.
    """
    try:
        os.killpg(pid, signum)
        return
    except (ProcessLookupError, PermissionError):
        pass  # no such group (yet): the child alone
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def terminate(process: Any, shared: SharedState | None, grace: float, note: Callable[[str], None] | None = None) -> str:
    """SIGTERM to the child's group, wait up to ``grace``, then SIGKILL to it. Returns what was done.

    ``note`` hears each step *before* it is taken, so whoever reads it after the
    child ended (the supervising thread) sees the step that ended it.
    """
    action = f"child process {process.pid} was terminated (SIGTERM)"
    if note is not None:
        note(action)
    if shared is not None:
        # Before the signal: the child's handler reads it to tell this SIGTERM (end
        # now, with finally blocks) from any other (a request to stop).
        shared.escalating = True
    signal_group(process.pid, signal.SIGTERM)
    if mpc.wait([process.sentinel], timeout=max(grace, 0.0)):
        return action
    action = f"child process {process.pid} was killed (SIGKILL) after {grace:.2f} s"
    if note is not None:
        note(action)
    signal_group(process.pid, signal.SIGKILL)
    mpc.wait([process.sentinel], timeout=1.0)
    return action


def _group_members(pgid: int) -> list[int]:
    """The live pids of process group ``pgid``, for the log."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except OSError:
            continue
    return found


def sweep(pgid: int, log: Any, service: str) -> None:
    """End what a child left in its process group: SIGTERM, then SIGKILL after ``KILL_GRACE``.

    Called once the child has been reaped. Its pid stays allocated while its group
    has members, so the group cannot be confused with a newer process's; when the
    group is empty (the usual case) this is one system call.
    """
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    left = _group_members(pgid)
    log.warning(
        "Background service {!r}: its child process {} left processes running in its process group {}; "
        "sent them SIGTERM",
        service,
        pgid,
        left,
    )
    deadline = time.monotonic() + KILL_GRACE
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(_SWEEP_POLL)
    left = _group_members(pgid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    log.warning(
        "Background service {!r}: processes {} of child process {}'s group were still running {:.1f} s after "
        "SIGTERM; sent them SIGKILL",
        service,
        left,
        pgid,
        KILL_GRACE,
    )
