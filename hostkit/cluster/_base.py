"""The lock-backend contract: a backend makes leases; a lease is held, renewed, fenced, and is a slot ledger.

A *backend* (:class:`LockBackend`) is configuration only: where the lock lives and
its timings. It is what ``OncePerDeployment(service, lock=...)`` takes, and it is
pickled into a child for ``placement="process"``. Where the service runs, the
wrapper asks it for a :class:`Lease` on one key and competes for it.

A lease carries a *fencing token* while held: a number that grows with every
takeover of that key, so a resource that remembers the highest token it has seen
can refuse the writes of a holder that lost the lease and does not know it yet
(paused, cut off). The lease is also the :class:`~hostkit._ledger.SlotLedger` of
the key: a schedule records its slots there, each write atomic with the check that
the caller's token is still the current one.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar

from .._ledger import SlotState
from .._util import describe
from ..exceptions import ConfigurationError

__all__ = ["Lease", "LockBackend", "current_lease", "slot_text", "using_lease"]


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as a standby last saw it: pid and host name (``None`` where unknown)."""

    pid: int | None = None
    host: str | None = None


class Lease(ABC):
    """One process's claim on one key of a backend: a standby until :meth:`try_acquire` succeeds.

    Attributes:
        backend: ``"file"``, ``"redis"`` or ``"postgres"``.
        key: what is locked (the service's name unless the backend names it).
        where: where the lock lives, for status pages (a path, a URL or a DSN
            without its password, and the key).
        token: the fencing token this lease got when it last took the lock (``None``
            before): greater than every token an earlier holder of this key had. It is
            kept after the lease is lost or released, so that the writes a stale
            holder still makes carry it, and a fenced resource refuses them.
        holder: the holder, as the last failed :meth:`try_acquire` saw it.

    .. versionadded:: 0.2
    """

    backend: ClassVar[str]

    def __init__(self, key: str, where: str) -> None:
        self.key = key
        self.where = where
        self.token: int | None = None
        self._held = False
        self.holder = Holder()

    @property
    def held(self) -> bool:
        """Whether this lease is held (as far as this process knows: see :meth:`is_current`)."""
        return self._held

    @abstractmethod
    def try_acquire(self) -> bool:
        """Take the lease if it is free; never waits for it. ``True`` if held now.

        Raises:
            Exception: the backend's own error when it cannot be reached (the caller retries).
        """

    def renew(self) -> bool:
        """Extend the lease; ``False`` if it was lost (another holder, or the server forgot it).

        Raises:
            Exception: the backend's own error when it cannot be reached: the caller
                counts the lease as lost once its time is up.
        """
        return self.held

    def standby_wait(self, poll_interval: float) -> float:
        """How long a standby waits before its next try: ``poll_interval``, or less when the lease ends sooner."""
        return poll_interval

    def is_outage(self, error: BaseException) -> bool:
        """Whether ``error`` means the backend is unreachable for now (retried quietly), not a bug."""
        return False

    @abstractmethod
    def release(self) -> None:
        """Give the lease up (idempotent); a standby may take it at once."""

    @abstractmethod
    def is_current(self) -> bool:
        """Ask the backend whether this lease's token is still the current one (a read, not a fence).

        Between this answer and a write the lease may still be lost: a write that must
        not land after a takeover carries :attr:`token` to the resource, which refuses
        tokens lower than the highest it has seen (see the docs, "Fenced writes").
        """

    def fence_postgres(self, conn: Any, resource: str, *, table: str = "hostkit_fences") -> bool:
        """Pass the fence of ``resource`` in a PostgreSQL transaction: ``False`` if a later holder passed it.

        Call it in the transaction that makes the write, before the write, and roll
        back (or skip the write) on ``False``::

            lease = current_lease()
            with conn.transaction():
                if not lease.fence_postgres(conn, "daily-report"):
                    raise RuntimeError("a newer holder took over; this run's writes are stale")
                conn.execute("INSERT INTO reports ...")

        The table ``table`` (made on first use) keeps the highest token that passed
        each resource's fence. Passing it raises that number to this lease's token and
        locks its row until the transaction ends, so a newer holder's transaction waits
        for this one, and this one, run after the newer holder's, is refused. Works with
        a token of any backend (a Redis lease can fence PostgreSQL writes).

        Args:
            conn: a psycopg 3 connection, in a transaction (or not in autocommit mode).
            resource: the name of what the write changes.
            table: the fence table.

        Raises:
            ConfigurationError: the lease is not held, the connection is in autocommit
                mode outside a transaction (the fence would not cover the write), or
                ``table`` is not a plain SQL name.

        .. versionadded:: 0.2
        """
        from ._fence import fence_postgres

        return fence_postgres(conn, resource, self.token, table)

    # -- the slot ledger (hostkit._ledger.SlotLedger) -------------------------------

    @abstractmethod
    def slot_state(self, schedule: str) -> SlotState:
        """The last completed slot of ``schedule``, and a slot begun after it and not completed."""

    @abstractmethod
    def begin_slot(self, schedule: str, slot: datetime) -> bool:
        """Record that the run for ``slot`` begins; ``False`` (nothing written) unless this token is current."""

    @abstractmethod
    def complete_slot(self, schedule: str, slot: datetime) -> bool:
        """Record that the run for ``slot`` finished; ``False`` (nothing written) unless this token is current."""

    def __repr__(self) -> str:
        state = f"held, token {self.token}" if self.held else "not held"
        return f"<{type(self).__name__} {self.where} {state}>"


class LockBackend(ABC):
    """Where a once-per-deployment lock lives, and its timings; makes :class:`Lease` objects.

    Attributes:
        kind: ``"file"``, ``"redis"`` or ``"postgres"``.
        renew_interval: how often a holder renews its lease, in seconds; ``None``
            for a lock that cannot be lost while its holder lives (the file lock).
        ttl: how long a lease outlives its holder's last renewal, or ``None``.

    .. versionadded:: 0.2
    """

    kind: ClassVar[str]
    renew_interval: float | None = None
    ttl: float | None = None

    @abstractmethod
    def lease(self, key: str) -> Lease:
        """A lease on ``key`` (not yet acquired); ``key`` is the service's name unless the backend has its own."""

    def check(self) -> None:  # noqa: B027 - most backends have nothing more to check
        """Raise a clear error now, at registration, for anything that would fail where the service runs."""


_current = threading.local()


def current_lease() -> Lease | None:
    """The lease the service running in this thread holds, or ``None`` outside a once-per-deployment service.

    ``OncePerDeployment`` sets it for the thread that calls the service's
    ``execute``; a thread the service starts itself gets the lease passed on.

    .. versionadded:: 0.2
    """
    lease: Lease | None = getattr(_current, "lease", None)
    return lease


@contextlib.contextmanager
def using_lease(lease: Lease | None) -> Iterator[None]:
    """Make ``lease`` this thread's :func:`current_lease` for the ``with`` block."""
    previous = getattr(_current, "lease", None)
    _current.lease = lease
    try:
        yield
    finally:
        _current.lease = previous


def slot_text(slot: datetime) -> str:
    """A slot as stored: ISO 8601 in UTC, microseconds always written (so the strings sort as the times do).

    Raises:
        ConfigurationError: ``slot`` is not a timezone-aware datetime.
    """
    if not isinstance(slot, datetime) or slot.tzinfo is None or slot.utcoffset() is None:
        msg = f"a slot must be a timezone-aware datetime, not: {describe(slot)}"
        raise ConfigurationError(msg)
    return slot.astimezone(timezone.utc).isoformat(timespec="microseconds")


def slot_from_text(text: str | bytes | datetime | None) -> datetime | None:
    if text is None:
        return None
    if isinstance(text, datetime):
        return text.astimezone(timezone.utc)
    if isinstance(text, bytes):
        text = text.decode()
    return datetime.fromisoformat(text).astimezone(timezone.utc)


def state_of(completed: str | bytes | datetime | None, begun: str | bytes | datetime | None) -> SlotState:
    """A :class:`SlotState` from the stored texts; a begun slot at or before the completed one is no longer open."""
    done, started = slot_from_text(completed), slot_from_text(begun)
    if started is not None and done is not None and started <= done:
        started = None
    return SlotState(completed=done, begun=started)


def check_timings(ttl: float, renew_interval: float, what: str) -> None:
    """A lease must be renewed, and a lost one noticed, with time to stop before it could be taken over."""
    if renew_interval >= ttl / 2:
        msg = (
            f"{what}: renew_interval ({renew_interval:g} s) must be less than half of ttl ({ttl:g} s), so a holder "
            f"that cannot renew notices within one renewal period and still has time to stop its service before "
            f"another instance may take over; use renew_interval <= {ttl / 3:g} (ttl / 3, the default) or a longer ttl"
        )
        raise ConfigurationError(msg)
