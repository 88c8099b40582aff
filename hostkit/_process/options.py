"""``ProcessOptions``: how one process-placed service's child is started and watched."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["CPU_PRIORITIES", "DEFAULT_CPU_PRIORITY", "ProcessOptions"]

#: The names ``cpu_priority=`` takes, and what each does in the child.
CPU_PRIORITIES = {
    "low": "nice 19: the child yields the CPU to anything at the default priority, such as request threads",
    "batch": "SCHED_BATCH at nice 19: as 'low', and the scheduler never lets the child preempt a waking task",
    "idle": "SCHED_IDLE: the child gets almost no CPU while anything else wants it",
    "inherit": "no change: the child keeps the host's nice value and policy (the operating system's default)",
}
#: The priority of a process-placed service given neither ``cpu_priority=`` nor ``nice=``.
#: Measured with ``benchmarks/contention.py`` (see the contention docs): with more busy
#: children than cores, nice 19 keeps request latency lowest at the same throughput.
DEFAULT_CPU_PRIORITY = "low"
#: The nice value of ``"low"`` and ``"batch"``: the lowest priority a nice value can give.
LOWEST_NICE = 19


@dataclass(frozen=True)
class ProcessOptions:
    """The ``placement="process"`` keywords of ``add_hosted_service``, validated at registration.

    ``None`` means "not given": the host's default for ``start_method``
    (``HostOptions.start_method``), :data:`DEFAULT_CPU_PRIORITY` for ``cpu_priority``
    (unless ``nice`` is given), every CPU the host may use for ``cpu_affinity``, no
    ceiling for ``memory_limit``.
    """

    #: ``"forkserver"``, ``"spawn"`` or ``"fork"``.
    start_method: str | None = None
    #: The child's nice value (-20 to 19).
    nice: int | None = None
    #: The CPUs the child may run on, sorted, without duplicates.
    cpu_affinity: tuple[int, ...] | None = None
    #: RSS ceiling in bytes; over it the child is stopped and the run counts as failed.
    memory_limit: int | None = None
    #: One of :data:`CPU_PRIORITIES`.
    cpu_priority: str | None = None
    #: How many of the host's CPUs the child leaves to the host (it runs on the others).
    keep_cores: int | None = None

    def given(self) -> tuple[str, ...]:
        """The names of the options that were given (not ``None``), in declaration order."""
        return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def with_default_start_method(self, start_method: str) -> ProcessOptions:
        """These options, with ``start_method`` filled in from the host's default if it was not given."""
        if self.start_method is not None:
            return self
        return dataclasses.replace(self, start_method=start_method)

    def scheduling(self) -> tuple[str | None, int | None]:
        """What the child sets: (policy ``"batch"``, ``"idle"`` or ``None`` to keep its own, nice or ``None``)."""
        priority = self.cpu_priority
        if priority is None:
            if self.nice is not None:
                return None, self.nice
            priority = DEFAULT_CPU_PRIORITY
        if priority == "low":
            return None, LOWEST_NICE
        if priority == "batch":
            return "batch", LOWEST_NICE if self.nice is None else self.nice
        if priority == "idle":
            return "idle", None
        return None, None

    def describe_priority(self) -> str:
        """The child's CPU priority for people: ``"nice 19"``, ``"SCHED_IDLE"``, ``"inherited"``..."""
        policy, nice = self.scheduling()
        if policy == "idle":
            return "SCHED_IDLE"
        if policy == "batch":
            return f"SCHED_BATCH, nice {nice}"
        return "inherited" if nice is None else f"nice {nice}"
