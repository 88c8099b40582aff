"""The fix for a main module that runs a host when a child process imports it again.

Under the ``spawn`` and ``forkserver`` start methods a new process imports the
program's main module again (as ``__mp_main__``) before it runs anything. A main
module that builds and runs a host at its top level then starts a second host in
that process, whose process-placed service tries to start a child of its own, and
multiprocessing refuses with its "bootstrapping phase" error. That message speaks
of ``freeze_support()``; the line here says what to do in hostkit's terms.
"""

from __future__ import annotations

__all__ = ["GUARD_HINT", "main_reimport_hint"]

GUARD_HINT = (
    "guard the host with if __name__ == '__main__': this process is importing the main module again to start "
    "a child process (start method spawn or forkserver), and that module builds and runs a host when imported"
)


def main_reimport_hint(error: BaseException) -> str | None:
    """:data:`GUARD_HINT` if ``error`` is multiprocessing refusing a start while this process imports main.

    That refusal happens exactly while the current process is still "inheriting"
    (importing the main module to bootstrap), the flag multiprocessing itself checks.
    """
    if not isinstance(error, RuntimeError):
        return None
    import multiprocess.process

    if getattr(multiprocess.process.current_process(), "_inheriting", False):
        return GUARD_HINT
    return None
