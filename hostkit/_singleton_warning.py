"""A warning at build(): a process-placed service that depends on singletons gets its own.

A child process builds its own container, so a singleton it resolves is not the
one the host's process uses; the mistake it catches is a cache warmed in the
host and read, empty, in the child.
"""

from __future__ import annotations

import sys

from loguru import logger

from ._di import ServiceProvider
from ._registration import HostedServiceRegistration

__all__ = ["warn_own_singletons"]


def warn_own_singletons(registration: HostedServiceRegistration, services: ServiceProvider) -> None:
    """One WARNING if a process-placed class depends on singletons: its child builds its own.

    The mistake it catches: a hosted service warms a singleton cache in the host,
    and a loop moved to ``placement="process"`` reads an empty one in its child.
    Singletons registered ``per_process=True`` are meant to be one per process,
    and are not named.
    """
    chains = services.singleton_chains(registration)
    if not chains:
        return
    names = [chain[-1] for chain in chains]
    if len(names) == 1:
        what, built, inside = "a singleton", "of it, not the one", "in it"
        fix = f"register it with add_singleton({names[0]}, per_process=True)"
    else:
        what, built, inside = "singletons", "of each, not the ones", "in them"
        fix = f"register each with add_singleton(..., per_process=True): {', '.join(names)}"
    message = (
        f"{registration.name} runs in a child process (placement='process') and depends on {what}: "
        f"{', '.join(' -> '.join(c) for c in chains)}. The child builds its own instance {built} this process "
        f"uses: what this process puts {inside} (a warm-up, a cache) is not there, and what the child changes "
        f"does not come back. Pass what the child needs as constructor arguments of a registered instance "
        f"(pickled at start), or share it through a queue or a store both processes open; if one instance per "
        f"process is what you want, {fix}"
    )
    # Attributed to the code that called build() (as warnings.warn(stacklevel=...) would):
    # the mistake is in its registrations, and a record from outside the "hostkit"
    # package reaches loguru's sinks although the library's own logger is disabled
    # until run() or configure_logging(), which come after build().
    logger.opt(depth=_depth_outside_hostkit()).bind(service=registration.name).warning(message)


def _depth_outside_hostkit() -> int:
    """The loguru ``depth`` (seen from the caller) of the first frame outside the hostkit package."""
    frame = sys._getframe(1)
    depth = 0
    while frame.f_back is not None and str(frame.f_globals.get("__name__", "")).partition(".")[0] == "hostkit":
        frame = frame.f_back
        depth += 1
    return depth
