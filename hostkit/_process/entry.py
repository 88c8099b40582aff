"""The target of every service child: a name the host gives multiprocess without importing the child side.

multiprocess pickles a child's target by reference (its module and name), so the
host must import the module that defines it. Defined in :mod:`hostkit._process.child`,
that meant importing the whole child side (bootstrap, stop watcher, reload handling:
about 2.5 ms) in the host before its first child could be launched, for a function
the host never runs. Here the target imports the child side itself: the fork server
has preloaded it, so that import costs a child nothing; a spawned child imports it
anyway; a host that forks imports it once before its first fork (the runner does),
so no forked child pays it either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .protocol import ChildSettings

__all__ = ["run_child"]


def run_child(payload: bytes, settings: ChildSettings, results: Any, control: Any, shared_array: Any) -> None:
    """Run :func:`hostkit._process.child.child_main` in this (child) process."""
    # Imported here, not at the top: the host names this function and never calls it.
    from .child import child_main

    child_main(payload, settings, results, control, shared_array)
