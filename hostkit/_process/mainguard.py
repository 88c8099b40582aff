"""The fix for a main module that runs a host when a child process imports it again.

Under the ``spawn`` and ``forkserver`` start methods a new process imports the
program's main module again (as ``__mp_main__``) before it runs anything. A main
module that builds and runs a host at its top level then starts a second host in
that process, whose process-placed service tries to start a child of its own, and
multiprocessing refuses with its "bootstrapping phase" error. That message speaks
of ``freeze_support()``; the line here, put in front of it in the same error,
says what to do in hostkit's terms.
"""

from __future__ import annotations

import textwrap

__all__ = ["GUARD_HINT", "explain_main_reimport"]

GUARD_HINT = (
    "guard the host with if __name__ == '__main__': this process is importing the main module again to start "
    "a child process (start method spawn or forkserver), and that module builds and runs a host when imported"
)


def explain_main_reimport(error: BaseException) -> str | None:
    """The message for ``error`` with :data:`GUARD_HINT` as its first line, or ``None`` if it does not apply.

    It applies to a ``RuntimeError`` raised while this process is still
    "inheriting" (importing the main module to bootstrap): the flag multiprocessing
    itself checks before it refuses a start. Its own text follows the hint.
    """
    if not isinstance(error, RuntimeError):
        return None
    import multiprocess.process

    if not getattr(multiprocess.process.current_process(), "_inheriting", False):
        return None
    return f"{GUARD_HINT}\n{textwrap.dedent(str(error)).strip()}"
