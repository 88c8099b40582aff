"""Preloaded into multiprocess's fork server only: make it survive a group SIGTERM.

systemd (``KillMode=control-group``), container runtimes and ``kill -TERM -<pgid>``
send SIGTERM to every process of the host's group, the fork server included. The
fork server ignores SIGINT but not SIGTERM, and once it is dead the parent reads
every child's exit status as 255 (``popen_forkserver`` reports EOF on its status
pipe that way), so a child that stopped cleanly looks crashed and gets restarted.
The host coordinates the stop; the fork server needs no signal to end: it exits
when the host's end of its "alive" pipe closes.

The guard makes importing this module anywhere else a no-op.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _in_fork_server() -> bool:
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        code = frame.f_code
        if code.co_name == "main" and code.co_filename.endswith("forkserver.py"):
            return True
        frame = frame.f_back
    return False


if _in_fork_server():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
