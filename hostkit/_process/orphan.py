"""The child's stop watcher, and what a child does when its host dies.

The watcher thread waits on three things at once: the control pipe (the host's
stop request, a reload request it hands on, or EOF when the host died), the
parent's sentinel (readable once the parent died), and the wake-up pipe its signal
handlers write to (a SIGTERM asks for a stop; the ``PR_SET_PDEATHSIG`` signal says
the parent died). A stop request sets the service's token; a dead host also makes
the child end what its service started, and itself: no host is left to stop,
escalate or sweep.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from .._token import CancellationToken
from .protocol import STOP, ChildSettings

__all__ = ["ORPHAN_EXIT_CODE", "ORPHAN_GRACE", "PARENT_DIED_BYTE", "Ending", "arm_pdeathsig", "parent_gone", "watch"]

#: How long a child whose parent died waits for ``execute`` (and what it started) to end before
#: it kills its process group, itself included.
ORPHAN_GRACE = 1.0
#: Exit code of a child that ended itself because its parent died and it ignored its token
#: (when it has no process group of its own to kill).
ORPHAN_EXIT_CODE = 70
#: What the parent-death signal's handler writes to the watcher's wake-up pipe.
PARENT_DIED_BYTE = b"P"


def _find_prctl() -> Any:
    """libc's ``prctl`` (Linux), or ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


#: Looked up once, where this module is imported (the host, or the fork server that preloads
#: it), and inherited by every fork: ctypes builds a new library object and function pointer
#: on each lookup, 0.14 ms of a forked child's start.
_PRCTL = _find_prctl()


class Ending:
    """Between the main thread and the watcher: has the host died, and is ``child_main`` done?"""

    def __init__(self) -> None:
        self.orphaned = threading.Event()
        self.main_done = threading.Event()
        #: Set if the watcher thread ends without ending the process (it raised).
        self.watcher_done = threading.Event()


def arm_pdeathsig(settings: ChildSettings, wake_w: int) -> None:
    """Backstop: ask the kernel for a signal when the parent dies (fork and spawn, Linux only).

    The signal is one of its own (a real-time one), whose handler tells the watcher
    the host is gone. Not SIGTERM: the kernel sends it when the host's *thread* that
    started this child exits, and while a SIGKILLed host's other threads still
    exit, its end of the sentinel pipe is still open; a SIGTERM would stop
    ``execute`` as a mere stop request, and the child could end before it saw the
    sentinel, leaving what its service started behind.

    Under forkserver the child's parent is the fork server, which outlives the host,
    so this would never fire there; the sentinel watcher covers it.
    """
    if settings.start_method == "forkserver" or _PRCTL is None:
        return
    signum = signal.SIGRTMIN + 1

    def on_parent_death(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            os.write(wake_w, PARENT_DIED_BYTE)

    try:
        signal.signal(signum, on_parent_death)
        pr_set_pdeathsig = 1
        _PRCTL(pr_set_pdeathsig, int(signum), 0, 0, 0)
    except (OSError, AttributeError, ValueError):
        return
    # The parent may have died before prctl: then nothing would ever send the signal.
    if os.getppid() != settings.parent_pid:
        on_parent_death(signum, None)


def watch(
    control: Any,
    token: CancellationToken,
    wake_r: int,
    settings: ChildSettings,
    ending: Ending,
    on_control: Callable[[bytes], None] | None = None,
) -> None:
    """The stop watcher thread: control pipe, parent sentinel, wake-up pipe.

    ``on_control`` gets every control message other than ``STOP`` (a reload
    request); it must return at once and never raise.
    """
    import multiprocess.connection as mpc
    from multiprocess import parent_process

    parent = parent_process()
    sentinel = parent.sentinel if parent is not None else None
    waitables: list[Any] = [control, wake_r]
    if sentinel is not None:
        waitables.append(sentinel)
    orphaned = False
    while not orphaned:
        ready = mpc.wait(waitables)
        if wake_r in ready:
            try:
                woken = os.read(wake_r, 64)
            except OSError:
                woken = b""
            if PARENT_DIED_BYTE in woken:
                orphaned = True
                # Before the token: execute() may return, and child_main end, at once.
                ending.orphaned.set()
            token.set()
        if control in ready:
            try:
                data = control.recv_bytes()
            except (EOFError, OSError):
                # The parent closes the control pipe only after this child ended:
                # EOF while we run means the parent died.
                orphaned = True
            else:
                if data == STOP or on_control is None:
                    token.set()
                    waitables.remove(control)
                else:
                    on_control(data)  # a reload request: handled on a thread of its own
        if sentinel is not None and sentinel in ready:
            orphaned = True
    ending.orphaned.set()
    token.set()
    _end_orphan(settings, ending)


def parent_gone() -> bool:
    """``True`` if the host process has died (its sentinel is readable), under every start method."""
    import multiprocess.connection as mpc
    from multiprocess import parent_process

    parent = parent_process()
    return parent is not None and bool(mpc.wait([parent.sentinel], timeout=0))


def _others_in_group() -> list[int]:
    """The other live processes of this child's process group: what the service started."""
    import psutil  # only on the orphan path: a child does not pay for it otherwise

    me, group = os.getpid(), os.getpgrp()
    found = []
    for pid in psutil.pids():
        if pid == me:
            continue
        try:
            if os.getpgid(pid) == group:
                found.append(pid)
        except OSError:
            continue  # gone, or not ours to ask about
    return found


def _end_orphan(settings: ChildSettings, ending: Ending) -> None:
    """The host died, so nobody can stop, escalate or sweep: end the service, what it started, and this child."""
    leader = os.getpgrp() == os.getpid()
    if leader:
        # What the service started gets the same grace as execute() does. Sent to each
        # one by pid: SIGTERM to the whole group would reach this process too, whose
        # handler the service's code may have replaced with the default (death).
        for pid in _others_in_group():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
    ending.main_done.wait(ORPHAN_GRACE)
    with contextlib.suppress(OSError):
        os.write(2, f"hostkit: {settings.name}: the host process died; ending this child\n".encode())
    if leader:
        # One system call for the whole group, this process included: nothing the service
        # forks meanwhile can slip between a listing and the kill.
        with contextlib.suppress(OSError):
            os.killpg(0, signal.SIGKILL)
    os._exit(ORPHAN_EXIT_CODE)
