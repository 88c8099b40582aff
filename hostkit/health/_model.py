"""The result model: a check's status and result, and a report of every check run."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from .._util import describe

Tag = Literal["live", "ready"]
TAGS: tuple[Tag, ...] = ("live", "ready")


class HealthStatus(str, enum.Enum):
    """How a check (or a whole report) came out; ordered from best to worst.

    .. versionadded:: 0.1
    """

    #: Working as it should.
    HEALTHY = "healthy"
    #: Working, but not as it should (still answers 200: degraded is not down).
    DEGRADED = "degraded"
    #: Not working: the probe answers 503 and the watchdog stops pinging.
    UNHEALTHY = "unhealthy"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {HealthStatus.HEALTHY: 0, HealthStatus.DEGRADED: 1, HealthStatus.UNHEALTHY: 2}


@dataclass(frozen=True)
class HealthCheckResult:
    """What one check found.

    Attributes:
        status: a :class:`HealthStatus`.
        description: one human sentence saying why.
        data: JSON-ready details (counts, names, ages).
        redacted_description: the description without exception messages, which
            a probe listener bound beyond loopback shows instead (an error's text
            can hold a password or an internal address); ``None`` when the
            description holds none. The factories fill it in when given ``exception``.

    .. versionadded:: 0.1
    """

    status: HealthStatus
    description: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)
    redacted_description: str | None = None

    @classmethod
    def healthy(
        cls, description: str = "", *, exception: BaseException | None = None, **data: Any
    ) -> HealthCheckResult:
        """A healthy result (see :meth:`unhealthy` for ``exception``)."""
        return cls._make(HealthStatus.HEALTHY, description, exception, data)

    @classmethod
    def degraded(
        cls, description: str = "", *, exception: BaseException | None = None, **data: Any
    ) -> HealthCheckResult:
        """A degraded result (see :meth:`unhealthy` for ``exception``)."""
        return cls._make(HealthStatus.DEGRADED, description, exception, data)

    @classmethod
    def unhealthy(
        cls, description: str = "", *, exception: BaseException | None = None, **data: Any
    ) -> HealthCheckResult:
        """An unhealthy result.

        With ``exception``, the description gets ``" (Type: message)"`` appended, and
        its redacted form ``" (Type)"``: ``unhealthy("database unreachable", exception=err)``.
        """
        return cls._make(HealthStatus.UNHEALTHY, description, exception, data)

    @classmethod
    def _make(
        cls, status: HealthStatus, description: str, exception: BaseException | None, data: Mapping[str, Any]
    ) -> HealthCheckResult:
        if exception is None:
            return cls(status, description, data)
        if not isinstance(cast(object, exception), BaseException):
            msg = f"exception= takes the exception a check caught, not: {describe(exception)}"
            raise TypeError(msg)
        kind = type(exception).__name__
        text = f"{kind}: {exception}" if str(exception) else kind
        if not description:
            return cls(status, text, data, kind)
        return cls(status, f"{description} ({text})", data, f"{description} ({kind})")


HealthCheck = Callable[[], "HealthCheckResult | HealthStatus"]


@dataclass(frozen=True)
class HealthEntry:
    """One check's result inside a :class:`HealthReport`."""

    name: str
    result: HealthCheckResult
    duration: float
    tags: tuple[str, ...]

    def to_dict(self, *, redact: bool = False) -> dict[str, Any]:
        """A JSON-ready dict; ``redact`` shows the description without exception messages."""
        result = self.result
        description = result.description
        if redact and result.redacted_description is not None:
            description = result.redacted_description
        return {
            "status": result.status.value,
            "description": description,
            "data": dict(result.data),
            "duration_ms": round(self.duration * 1000, 3),
            "tags": list(self.tags),
        }


@dataclass(frozen=True)
class HealthReport:
    """Every check run for one probe: the worst status wins.

    .. versionadded:: 0.1
    """

    status: HealthStatus
    entries: tuple[HealthEntry, ...]
    duration: float

    @property
    def http_status(self) -> int:
        """200 unless unhealthy (503)."""
        return 503 if self.status is HealthStatus.UNHEALTHY else 200

    def __getitem__(self, name: str) -> HealthEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        msg = f"no health check named {name!r} in this report; it has: {', '.join(e.name for e in self.entries)}"
        raise KeyError(msg)

    def to_dict(self, *, redact: bool = False) -> dict[str, Any]:
        """A JSON-ready dict; ``redact`` leaves exception messages out of the descriptions."""
        return {
            "status": self.status.value,
            "duration_ms": round(self.duration * 1000, 3),
            "checks": {e.name: e.to_dict(redact=redact) for e in self.entries},
        }

    def unhealthy_summary(self) -> str:
        """``"name: description; ..."`` of every check that is not healthy."""
        return "; ".join(
            f"{e.name}: {e.result.description or e.result.status.value}"
            for e in self.entries
            if e.result.status is not HealthStatus.HEALTHY
        )
