"""Preloaded into multiprocess's fork server only: make it survive a group SIGTERM or SIGINT.

systemd (``KillMode=control-group``), container runtimes and ``kill -TERM -<pgid>``
send SIGTERM to every process of the host's group, the fork server included. The
fork server ignores SIGINT but not SIGTERM, and once it is dead the parent reads
every child's exit status as 255 (``popen_forkserver`` reports EOF on its status
pipe that way), so a child that stopped cleanly looks crashed and gets restarted,
and no further child can be started. The host coordinates the stop; the fork
server needs no signal to end: it exits when the host's end of its "alive" pipe
closes.

The host starts the fork server with SIGINT and SIGTERM blocked (the mask is
inherited through exec), so a signal sent while the server's interpreter starts
waits. Here, before the server's loop begins, both are ignored and then unblocked:
a signal that was waiting is discarded. Every process the server forks inherits
"ignored" until it installs its own handlers (hostkit's children do at once).
SIGINT is ignored here, not only by the server's own loop: that loop gives its
children the handler it found, and a child must not die of Ctrl+C before it has
its own handlers.

The fork server is recognised by its command line, which multiprocess builds
itself (``python -c 'from multiprocess.forkserver import main; main(...)'``):
importing this module anywhere else does nothing. Its children never import it
again (it is already in their copy of ``sys.modules``), so they are unaffected.

If the server has loguru (its main module imports it), it also pays loguru's
per-sink set-up once (:func:`hostkit._fastadd.fill_memo`), so that no child pays it
when its log bridge adds its sink. Otherwise it does not import loguru: a child
imports it only if its service logs through it (:mod:`hostkit._lateloguru`).
"""

from __future__ import annotations

import signal
import sys

__all__ = ["in_fork_server"]

#: How multiprocess's fork server command line begins (the argument of ``-c``).
_SERVER_COMMAND = "from multiprocess.forkserver import main"


def in_fork_server() -> bool:
    """``True`` in an interpreter started to run multiprocess's fork server.

    Its forks share the command line, so this is also ``True`` in every child the
    server forks; the guard below runs only when the server preloads this module,
    and a child finds it already imported.
    """
    return any(arg.startswith(_SERVER_COMMAND) for arg in sys.orig_argv)


if in_fork_server():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    if "loguru" in sys.modules:
        # Each child adds its log bridge's loguru sink; paid here once, every child
        # inherits it paid (hostkit._fastadd).
        from .._fastadd import fill_memo

        fill_memo()
