"""``ProcessOptions``: how one process-placed service's child is started and watched."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["ProcessOptions"]


@dataclass(frozen=True)
class ProcessOptions:
    """The ``placement="process"`` keywords of ``add_hosted_service``, validated at registration.

    ``None`` means "not given": the host's default for ``start_method``
    (``HostOptions.start_method``), no change for ``nice`` and ``cpu_affinity``, no
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

    def given(self) -> tuple[str, ...]:
        """The names of the options that were given (not ``None``), in declaration order."""
        return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def with_default_start_method(self, start_method: str) -> ProcessOptions:
        """These options, with ``start_method`` filled in from the host's default if it was not given."""
        if self.start_method is not None:
            return self
        return dataclasses.replace(self, start_method=start_method)
