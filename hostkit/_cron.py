"""CronTimer: cron-style slots in a time zone, beside PeriodicTimer, once per slot across a cluster.

The cron expression is parsed and stepped by cronsim (the ``cron`` extra), which
follows Debian cron across daylight-saving changes: a job at a fixed time that
falls in the hour skipped in spring runs at the first instant after the gap,
and one in the hour repeated in autumn runs once; a job whose minute or hour
field starts with ``*`` follows real time, so an hourly job runs in every hour
that exists. Everything this module compares or subtracts is in UTC: Python
compares two datetimes of the same zone by wall time and ignores ``fold``, which
is wrong inside the repeated hour.

A slot is handled once: it is either yielded (run) or counted as missed. Under a
cluster lock, what was handled is kept in the lock's :class:`SlotLedger`
(:mod:`hostkit._ledger`), so a new holder resumes where the last one stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING, Literal, Protocol, cast

from loguru import logger

from ._ledger import SlotLedger, current_ledger
from ._services import BackgroundService
from ._token import CancellationToken
from ._validate import describe, to_seconds
from .exceptions import ConfigurationError, ConfigurationTypeError, InvalidServiceError

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

__all__ = ["CronClock", "CronTimer", "MisfirePolicy", "ScheduledService"]

UTC = timezone.utc

#: What happens to a slot that came due while nothing was waiting for it.
MisfirePolicy = Literal["skip", "run_late"]
_POLICIES = ("skip", "run_late")

#: The longest single wait: the wall clock is read again at least this often, so a
#: clock step (an NTP correction, a resumed virtual machine) is noticed within it.
_MAX_WAIT = 60.0

_INSTALL = "pip install 'pyhostkit[cron]'"


class CronClock(Protocol):
    """Where a :class:`CronTimer` reads the time and waits; injectable for tests.

    ``now()`` returns a timezone-aware datetime. ``wait(token, seconds)`` waits up to
    ``seconds`` of this clock's time and returns ``True`` when ``token`` was
    cancelled (as :meth:`threading.Event.wait` does).
    """

    def now(self) -> datetime: ...

    def wait(self, token: CancellationToken, seconds: float) -> bool: ...


class SystemClock:
    """The wall clock; waits on the token, so a cancel ends a wait at once."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def wait(self, token: CancellationToken, seconds: float) -> bool:
        return token.wait(seconds)

    def __repr__(self) -> str:
        return "<SystemClock>"


def _cronsim() -> type:
    """cronsim's ``CronSim`` class, or an ImportError that names the extra to install."""
    try:
        from cronsim import CronSim
    except ImportError:
        msg = f"CronTimer needs cronsim, which is not installed: {_INSTALL}"
        raise ImportError(msg) from None
    return cast("type", CronSim)


def _zone(tz: object) -> tzinfo:
    """``tz`` as a tzinfo: an IANA name (``"Europe/Berlin"``) or a tzinfo object."""
    if isinstance(tz, tzinfo):
        return tz
    if not isinstance(tz, str):
        msg = f"tz must be an IANA time zone name such as 'Europe/Berlin', or a tzinfo, not: {describe(tz)}"
        raise ConfigurationTypeError(msg)
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        zone: ZoneInfo = ZoneInfo(tz)
    except ZoneInfoNotFoundError:
        msg = (
            f"unknown time zone {tz!r}: use an IANA name such as 'Europe/Berlin' or 'UTC'; if this machine "
            f"has no time zone database (/usr/share/zoneinfo), install the tzdata package ({_INSTALL} includes it)"
        )
        raise ConfigurationError(msg) from None
    except ValueError as err:  # a malformed key, e.g. an absolute path
        msg = f"tz must be an IANA time zone name such as 'Europe/Berlin', not {tz!r}: {err}"
        raise ConfigurationError(msg) from None
    return zone


def _zone_name(zone: tzinfo) -> str:
    key = getattr(zone, "key", None)
    return key if isinstance(key, str) else str(zone)


class _Schedule:
    """A validated five-field expression in a zone: the slots after an instant, in UTC."""

    def __init__(self, expression: object, tz: object) -> None:
        if not isinstance(expression, str):
            msg = f"a cron expression must be a string such as '30 2 * * *', not: {describe(expression)}"
            raise ConfigurationTypeError(msg)
        fields = expression.split()
        if len(fields) != 5:
            msg = (
                f"a cron expression has five fields (minute hour day-of-month month day-of-week), "
                f"e.g. '30 2 * * *'; {expression!r} has {len(fields)}"
            )
            raise ConfigurationError(msg)
        self.expression = " ".join(fields)
        self.zone = _zone(tz)
        self._cron = _cronsim()
        try:
            first = self._cron(self.expression, datetime.now(UTC).astimezone(self.zone))
        except Exception as err:  # cronsim raises CronSimError (an Exception) naming the bad field
            msg = f"invalid cron expression {expression!r}: {err} (fields: minute hour day-of-month month day-of-week)"
            raise ConfigurationError(msg) from None
        try:
            next(first)
        except StopIteration:
            msg = f"cron expression {expression!r} never matches a date (within 50 years)"
            raise ConfigurationError(msg) from None

    def after(self, instant: datetime) -> Iterator[datetime]:
        """The slots strictly after ``instant``, in order, as UTC datetimes."""
        start = instant.astimezone(UTC)
        # cronsim steps a fixed-time job by wall time, so from inside the repeated
        # hour it can name the first pass of a wall time already behind us: drop it.
        for slot in self._cron(self.expression, start.astimezone(self.zone)):
            utc = cast("datetime", slot).astimezone(UTC)
            if utc > start:
                yield utc

    def next_after(self, instant: datetime) -> datetime | None:
        return next(self.after(instant), None)

    def due(self, after: datetime, now: datetime) -> tuple[datetime | None, int]:
        """The latest slot in ``(after, now]`` and how many slots that range holds."""
        latest: datetime | None = None
        count = 0
        for slot in self.after(after):
            if slot > now:
                break
            latest = slot
            count += 1
        return latest, count


class _CurrentLedger:
    def __repr__(self) -> str:
        return "<the current ledger>"


#: The default of ``ledger=``: the ledger of the lock the iterating thread runs under.
CURRENT_LEDGER = _CurrentLedger()


class CronTimer:
    """Yields the slots of a cron schedule, in a time zone, until ``token`` is cancelled.

    ::

        def execute(self, stopping):
            for slot in CronTimer("30 2 * * *", stopping, tz="Europe/Berlin"):
                self.nightly_report(slot)

    Each iteration waits for the next slot and yields it, a timezone-aware datetime
    in ``tz``. The wait ends at once when ``token`` is cancelled, and so does the
    iteration. A slot counts as **completed** when the loop body for it returns and
    the loop asks for the next slot; a body that raises, breaks or returns out of
    the loop leaves its slot begun but not completed.

    Misfires: a slot that came due while nothing was waiting for it (the body was
    still running for an earlier slot, or, under a cluster lock, no process held the
    lock) is a misfire. ``misfire="skip"`` counts it in :attr:`missed` and waits for
    the next slot; ``misfire="run_late"`` runs the latest such slot once, at once, if
    it is at most ``grace`` old (older misfires are counted as missed). Slots
    before the timer was first iterated are not owed, unless a ledger says so.

    Once per cluster: inside a service wrapped by :class:`~hostkit.OncePerDeployment`,
    the lock's lease (a :class:`~hostkit.cluster.Lease`, which is a slot ledger) is
    set for the service's thread, and the timer records each slot there: begun
    before the body runs, completed after.
    A new holder reads where the last one stopped: a slot begun but not completed
    runs again, at once (it came due on time; it is no misfire); slots that came due
    while no one held the lock follow the misfire policy. If a ledger write says
    the lock was lost, the iteration ends and :attr:`lost_lock` is set. So each slot
    completes at most once; it completes once if a holder runs through it.

    Daylight-saving time follows Debian cron (see the module's docs): ``"30 2 * * *"``
    in ``Europe/Berlin`` runs at 03:00 on the spring-forward day and once on the
    autumn day; ``"30 * * * *"`` runs in every hour that really happens.

    Args:
        expression: five fields, minute hour day-of-month month day-of-week
            (``"30 2 * * *"``), with ranges, lists, steps and names (``MON``, ``JAN``).
        token: the cancellation token that ends the iteration.
        tz: an IANA time zone name (``"Europe/Berlin"``) or a tzinfo; default UTC.
        misfire: ``"skip"`` (default) or ``"run_late"``.
        grace: with ``misfire="run_late"``, the latest a late run may start after its
            slot (seconds or a timedelta); required there, refused with ``"skip"``.
        name: the schedule's name in the ledger; default the expression and the zone,
            so a changed schedule starts afresh. Give one name per schedule in a service.
        ledger: the slot ledger to record slots in (an object with ``slot_state``,
            ``begin_slot`` and ``complete_slot``, as a :class:`~hostkit.cluster.Lease`);
            default the iterating thread's current one, set by ``OncePerDeployment``
            (none outside it: the timer works alone). ``None``: never record.
        clock: a :class:`CronClock`; default the system clock (injectable for tests).

    Raises:
        ConfigurationError: a bad expression, time zone, misfire policy or grace.
        ImportError: cronsim is not installed (``pip install 'pyhostkit[cron]'``).

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        expression: str,
        token: CancellationToken,
        *,
        tz: str | tzinfo = "UTC",
        misfire: MisfirePolicy = "skip",
        grace: float | timedelta | None = None,
        name: str | None = None,
        ledger: SlotLedger | _CurrentLedger | None = CURRENT_LEDGER,
        clock: CronClock | None = None,
    ) -> None:
        if not isinstance(cast("object", token), threading.Event):
            msg = f"CronTimer needs a CancellationToken to end the iteration, not: {describe(token)}"
            raise ConfigurationTypeError(msg)
        self._schedule = _Schedule(expression, tz)
        self.misfire, self.grace = _misfire(misfire, grace)
        if name is not None and (not isinstance(name, str) or not name):
            msg = f"name must be a non-empty string, not: {describe(name)}"
            raise ConfigurationError(msg)
        self.name = name if name is not None else f"{self.expression} {_zone_name(self.tz)}"
        if ledger is not None and not isinstance(cast("object", ledger), (_CurrentLedger, SlotLedger)):
            msg = f"ledger must be a SlotLedger (slot_state, begin_slot, complete_slot), not: {describe(ledger)}"
            raise ConfigurationTypeError(msg)
        self._ledger_choice = ledger
        self.token = token
        self._clock: CronClock = clock if clock is not None else SystemClock()
        now = self._now()
        #: The last slot handled (run or missed), UTC; slots up to it are never yielded again.
        self._handled = now
        #: Since when the timer has been ready for a slot: slots due before it are misfires.
        self._ready_since = now
        #: A slot a previous holder began and did not complete: run first.
        self._rerun: datetime | None = None
        self._started = False
        self._ledger: SlotLedger | None = None
        #: Slots yielded (begun).
        self.runs = 0
        #: Slots completed: the loop body returned for them and the loop asked for the next.
        self.completed = 0
        #: Slots that misfired and were not run.
        self.missed = 0
        #: Misfired slots run late (``misfire="run_late"``).
        self.late = 0
        #: Set when a ledger write said this process no longer holds the lock.
        self.lost_lock = False
        self._log = logger.bind(schedule=self.name)

    @property
    def expression(self) -> str:
        """The five-field expression, with single spaces."""
        return self._schedule.expression

    @property
    def tz(self) -> tzinfo:
        """The zone the expression is read in."""
        return self._schedule.zone

    @property
    def next_slot(self) -> datetime | None:
        """The next slot this timer will consider, in ``tz`` (``None``: the schedule has no more).

        It is in the past when a slot is due now (a misfire not handled yet, or a
        begun slot to run again).
        """
        slot = self._rerun if self._rerun is not None else self._schedule.next_after(self._handled)
        return None if slot is None else slot.astimezone(self.tz)

    def _now(self) -> datetime:
        now = self._clock.now()
        if now.tzinfo is None or now.utcoffset() is None:
            msg = f"the CronTimer clock must return timezone-aware datetimes, not: {now!r}"
            raise ConfigurationError(msg)
        return now.astimezone(UTC)

    def _resume(self) -> None:
        """On first iteration: take the ledger, and where the last holder stopped."""
        self._started = True
        choice = self._ledger_choice
        self._ledger = current_ledger() if isinstance(choice, _CurrentLedger) else choice
        now = self._now()
        self._ready_since = now
        if self._ledger is None:
            self._handled = now
            return
        state = self._ledger.slot_state(self.name)
        if state.begun is not None:
            self._rerun = state.begun.astimezone(UTC)
            self._handled = self._rerun
            self._log.info("slot {} was begun and not completed; running it again", self._local(self._rerun))
        elif state.completed is not None:
            self._handled = state.completed.astimezone(UTC)
        else:
            self._handled = now

    def _local(self, slot: datetime) -> str:
        return slot.astimezone(self.tz).isoformat()

    def _next_due(self) -> datetime | None:
        """Wait for the next slot to run and return it (UTC); ``None`` when cancelled."""
        while not self.token.is_set():
            if self._rerun is not None:
                slot, self._rerun = self._rerun, None
                return slot
            now = self._now()
            latest, count = self._schedule.due(self._handled, now)
            if latest is not None:
                self._handled = latest
                if latest >= self._ready_since:
                    # Came due while the timer waited for it: on time. Older slots can
                    # only be here if the wait overslept them (a suspended machine).
                    self._missed(count - 1, latest)
                    return latest
                if self.misfire == "run_late" and self.grace is not None and now - latest <= self.grace:
                    self._missed(count - 1, latest)
                    self.late += 1
                    self._log.warning("slot {} misfired; running it {} late", self._local(latest), now - latest)
                    return latest
                self._missed(count, latest)
            upcoming = self._schedule.next_after(self._handled)
            if upcoming is None:
                self._log.info("the schedule has no more slots")
                return None
            delay = (upcoming - now).total_seconds()
            if delay > 0 and self._clock.wait(self.token, min(delay, _MAX_WAIT)):
                return None
        return None

    def _missed(self, count: int, latest: datetime) -> None:
        if count <= 0:
            return
        self.missed += count
        self._log.warning(
            "{} slot(s) up to {} came due while nothing waited for them (misfire={}); not run",
            count,
            self._local(latest),
            self.misfire,
        )

    def _record(self, write: Callable[[str, datetime], bool], slot: datetime, what: str) -> bool:
        if self._ledger is None or write(self.name, slot):
            return True
        self.lost_lock = True
        self._log.warning(
            "could not record slot {} as {}: this process no longer holds the lock", self._local(slot), what
        )
        return False

    def __iter__(self) -> Iterator[datetime]:
        if not self._started:
            self._resume()
        while True:
            slot = self._next_due()
            if slot is None:
                return
            ledger = self._ledger
            if ledger is not None and not self._record(ledger.begin_slot, slot, "begun"):
                return
            self.runs += 1
            yield slot.astimezone(self.tz)
            if ledger is not None and not self._record(ledger.complete_slot, slot, "completed"):
                return
            self.completed += 1
            # Slots that came due while the body ran are misfires.
            self._ready_since = self._now()

    def __repr__(self) -> str:
        slot = self.next_slot
        return (
            f"<CronTimer {self.expression!r} tz={_zone_name(self.tz)} misfire={self.misfire}"
            f" next={slot.isoformat() if slot is not None else None} completed={self.completed}"
            f" missed={self.missed}>"
        )


def _misfire(misfire: object, grace: float | timedelta | None) -> tuple[MisfirePolicy, timedelta | None]:
    if misfire not in _POLICIES:
        msg = f"misfire must be 'skip' or 'run_late', not: {describe(misfire)}"
        raise ConfigurationError(msg)
    if misfire == "skip":
        if grace is not None:
            msg = "grace= applies to misfire='run_late' only; with misfire='skip' a missed slot is not run"
            raise ConfigurationError(msg)
        return "skip", None
    if grace is None:
        msg = "misfire='run_late' needs grace=, the latest a late run may start (e.g. grace=timedelta(minutes=10))"
        raise ConfigurationError(msg)
    return "run_late", timedelta(seconds=to_seconds(grace, "grace", allow_zero=False))


class ScheduledService(BackgroundService):
    """A background service that calls ``func(slot)`` at each slot of a cron schedule.

    ::

        builder.add_hosted_service(
            ScheduledService(send_report, "0 2 * * *", tz="Europe/Berlin"), name="report"
        )

    The arguments after ``func`` are :class:`CronTimer`'s, checked here, at
    registration. A slot is completed when ``func`` returns for it; an exception
    from ``func`` fails the service (its restart policy applies) and leaves the
    slot begun but not completed. Wrap the service in
    :class:`~hostkit.OncePerDeployment` with a cluster lock to run each slot once
    across machines.

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        func: Callable[[datetime], object],
        expression: str,
        *,
        tz: str | tzinfo = "UTC",
        misfire: MisfirePolicy = "skip",
        grace: float | timedelta | None = None,
        name: str | None = None,
        clock: CronClock | None = None,
    ) -> None:
        if not callable(cast("object", func)):
            msg = f"ScheduledService needs a callable taking the slot's datetime, not: {describe(func)}"
            raise InvalidServiceError(msg)
        # Validated now, so that a mistake shows at registration, not at the first slot.
        CronTimer(expression, CancellationToken(), tz=tz, misfire=misfire, grace=grace, name=name)
        self.func = func
        self.expression = expression
        self.tz = tz
        self.misfire: MisfirePolicy = misfire
        self.grace = grace
        self.name = name
        self.clock = clock

    def execute(self, stopping: CancellationToken) -> None:
        timer = CronTimer(
            self.expression,
            stopping,
            tz=self.tz,
            misfire=self.misfire,
            grace=self.grace,
            name=self.name,
            clock=self.clock,
        )
        for slot in timer:
            self.func(slot)

    def __repr__(self) -> str:
        func = getattr(self.func, "__qualname__", repr(self.func))
        return f"<ScheduledService {func} {self.expression!r} tz={self.tz!s}>"
