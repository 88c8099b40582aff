"""CronTimer: five-field schedules in a time zone, DST, misfires, a stop at once, slots in a ledger."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from hostkit import CancellationToken, CronTimer, HostBuilder, ScheduledService
from hostkit._ledger import SlotState, using_ledger
from hostkit.exceptions import ConfigurationError, ConfigurationTypeError, InvalidServiceError
from tests.conftest import wait_until
from tests.cron_helpers import FastForwardClock, SlotFile, read_slots

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")


class FakeClock:
    """An injected clock: ``wait`` moves time forward instead of sleeping, so a day passes at once."""

    def __init__(self, start: datetime) -> None:
        assert start.tzinfo is not None
        self.current = start.astimezone(UTC)
        self.waits: list[float] = []

    def now(self) -> datetime:
        return self.current

    def wait(self, token: CancellationToken, seconds: float) -> bool:
        self.waits.append(seconds)
        self.current += timedelta(seconds=seconds)
        return token.is_set()

    def advance(self, **delta: float) -> None:
        """The loop body "takes" this long."""
        self.current += timedelta(**delta)


# Compare slots in UTC: two datetimes of one zone compare and subtract by wall time (fold is
# ignored), and one inside the repeated hour never equals a datetime of another zone.


def local(text: str, fold: int = 0) -> datetime:
    """``"2026-03-29 03:00"`` in Berlin; ``fold=1`` for the second pass of the repeated hour."""
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN, fold=fold)


def run(timer: CronTimer, clock: FakeClock, count: int, body: Callable[[datetime], None] | None = None) -> list:
    """The first ``count`` slots, each with the (fake) time it was yielded at."""
    seen = []
    for slot in timer:
        seen.append((slot, clock.now()))
        if body is not None:
            body(slot)
        if len(seen) == count:
            break
    return seen


def walls(slots: list) -> list[str]:
    """Each slot as its wall time and UTC offset in its zone, e.g. ``'29 03:00+0200'``."""
    return [f"{slot:%d %H:%M%z}" for slot, _ in slots]


class MemoryLedger:
    """A SlotLedger in memory, as a lock backend keeps one: writes fail once the holder lost the lock."""

    def __init__(self) -> None:
        self.states: dict[str, SlotState] = {}
        self.holding = True
        self.writes: list[tuple[str, datetime]] = []

    def slot_state(self, schedule: str) -> SlotState:
        return self.states.get(schedule, SlotState())

    def begin_slot(self, schedule: str, slot: datetime) -> bool:
        if not self.holding:
            return False
        assert slot.tzinfo is not None and slot.utcoffset() == timedelta(0), "the ledger gets UTC"
        self.writes.append(("begin", slot))
        self.states[schedule] = SlotState(self.slot_state(schedule).completed, slot)
        return True

    def complete_slot(self, schedule: str, slot: datetime) -> bool:
        if not self.holding:
            return False
        self.writes.append(("complete", slot))
        self.states[schedule] = SlotState(slot, None)
        return True


class TestDaylightSaving:
    def test_spring_forward_fixed_time_runs_at_the_first_instant_after_the_gap_once(self) -> None:
        """02:30 does not exist on 2026-03-29 in Berlin (02:00 -> 03:00): the job runs at 03:00, once."""
        clock = FakeClock(local("2026-03-28 12:00"))
        timer = CronTimer("30 2 * * *", CancellationToken(), tz="Europe/Berlin", clock=clock)
        seen = run(timer, clock, 3)
        assert walls(seen) == ["29 03:00+0200", "30 02:30+0200", "31 02:30+0200"]
        # It ran when the slot came, not at some other moment the wait happened to end.
        assert all(slot.astimezone(UTC) == at for slot, at in seen)
        assert timer.missed == 0

    def test_autumn_repeated_hour_fixed_time_runs_once(self) -> None:
        """02:30 happens twice on 2026-10-25 in Berlin (03:00 CEST -> 02:00 CET): the job runs once, at the first."""
        clock = FakeClock(local("2026-10-24 12:00"))
        timer = CronTimer("30 2 * * *", CancellationToken(), tz="Europe/Berlin", clock=clock)
        seen = run(timer, clock, 3)
        assert walls(seen) == ["25 02:30+0200", "26 02:30+0100", "27 02:30+0100"]
        assert all(slot.astimezone(UTC) == at for slot, at in seen)

    def test_started_in_the_second_pass_of_the_repeated_hour_does_not_run_that_wall_time_again(self) -> None:
        """A timer started at 02:10 CET on 2026-10-25, after 02:30 CEST passed, next runs on the 26th.

        Compared by wall time (as Python compares two datetimes of one zone), 02:30 CEST
        would look later than 02:10 CET and run a second time that day.
        """
        clock = FakeClock(local("2026-10-25 02:10", fold=1))
        timer = CronTimer("30 2 * * *", CancellationToken(), tz="Europe/Berlin", clock=clock)
        assert f"{timer.next_slot:%d %H:%M%z}" == "26 02:30+0100"
        assert walls(run(timer, clock, 1)) == ["26 02:30+0100"]

    def test_hourly_job_runs_in_every_hour_that_happens_in_spring(self) -> None:
        """ "30 * * * *" on 2026-03-29: 23 runs that day, one real hour apart, no 02:30 (the hour does not exist)."""
        clock = FakeClock(local("2026-03-29 00:00"))
        timer = CronTimer("30 * * * *", CancellationToken(), tz="Europe/Berlin", clock=clock)
        seen = run(timer, clock, 24)
        day = [slot for slot, _ in seen if slot.day == 29]
        assert len(day) == 23
        assert walls(seen[:4]) == ["29 00:30+0100", "29 01:30+0100", "29 03:30+0200", "29 04:30+0200"]
        gaps = {later - earlier for (_, earlier), (_, later) in itertools.pairwise(seen)}
        assert gaps == {timedelta(hours=1)}

    def test_hourly_job_runs_in_both_passes_of_the_repeated_hour_in_autumn(self) -> None:
        """ "0 * * * *" on 2026-10-25: 25 runs that day, one real hour apart; 02:00 runs in CEST and in CET."""
        clock = FakeClock(local("2026-10-24 23:30"))
        timer = CronTimer("0 * * * *", CancellationToken(), tz="Europe/Berlin", clock=clock)
        seen = run(timer, clock, 26)
        day = [slot for slot, _ in seen if slot.day == 25]
        assert len(day) == 25
        assert walls(seen[:5]) == ["25 00:00+0200", "25 01:00+0200", "25 02:00+0200", "25 02:00+0100", "25 03:00+0100"]
        gaps = {later - earlier for (_, earlier), (_, later) in itertools.pairwise(seen)}
        assert gaps == {timedelta(hours=1)}

    def test_slots_are_aware_datetimes_in_the_zone(self) -> None:
        clock = FakeClock(datetime(2026, 6, 1, tzinfo=UTC))
        timer = CronTimer("0 9 * * MON-FRI", CancellationToken(), tz="America/New_York", clock=clock)
        (slot, _), *_ = run(timer, clock, 1)
        assert slot.tzinfo == ZoneInfo("America/New_York")
        assert (slot.isoformat(), slot.strftime("%a")) == ("2026-06-01T09:00:00-04:00", "Mon")


class TestMisfire:
    def make(self, **options: object) -> tuple[CronTimer, FakeClock]:
        clock = FakeClock(datetime(2026, 5, 4, 0, 0, 30, tzinfo=UTC))
        return CronTimer("*/10 * * * *", CancellationToken(), clock=clock, **options), clock  # type: ignore[arg-type]

    def test_skip_drops_slots_that_came_due_while_the_body_ran(self) -> None:
        """The 00:10 run takes 25 minutes: 00:20 and 00:30 misfire and are skipped; 00:40 runs on time."""
        timer, clock = self.make()
        seen = run(timer, clock, 2, body=lambda _: clock.advance(minutes=25))
        assert [f"{slot:%H:%M}" for slot, _ in seen] == ["00:10", "00:40"]
        assert seen[1][0].astimezone(UTC) == seen[1][1]
        assert (timer.missed, timer.late, timer.completed) == (2, 0, 1)

    def test_run_late_runs_the_latest_misfire_once_within_grace(self) -> None:
        """The 00:10 run ends at 00:35: 00:30 (5 min old) runs once at once, 00:20 is missed, 00:40 on time."""
        timer, clock = self.make(misfire="run_late", grace=timedelta(minutes=10))
        seen = run(timer, clock, 3, body=lambda slot: clock.advance(minutes=25 if slot.minute == 10 else 1))
        assert [(f"{slot:%H:%M}", f"{at:%H:%M}") for slot, at in seen] == [
            ("00:10", "00:10"),
            ("00:30", "00:35"),
            ("00:40", "00:40"),
        ]
        assert (timer.missed, timer.late) == (1, 1)

    def test_run_late_skips_a_misfire_older_than_grace(self) -> None:
        timer, clock = self.make(misfire="run_late", grace=120)
        seen = run(timer, clock, 2, body=lambda _: clock.advance(minutes=25))
        assert [f"{slot:%H:%M}" for slot, _ in seen] == ["00:10", "00:40"]
        assert (timer.missed, timer.late) == (2, 0)

    def test_a_short_body_misses_nothing(self) -> None:
        timer, clock = self.make()
        seen = run(timer, clock, 4, body=lambda _: clock.advance(minutes=9))
        assert [f"{slot:%H:%M}" for slot, _ in seen] == ["00:10", "00:20", "00:30", "00:40"]
        assert timer.missed == 0


class TestStop:
    def test_cancel_ends_a_long_wait_at_once_on_a_real_thread(self) -> None:
        """The next slot is months away; cancelling the token ends the iteration within a fraction of a second."""
        token = CancellationToken()
        waiting = threading.Event()

        class SignallingClock:
            def now(self) -> datetime:
                return datetime.now(UTC)

            def wait(self, token: CancellationToken, seconds: float) -> bool:
                waiting.set()
                return token.wait(seconds)

        timer = CronTimer("0 0 1 1 *", token, clock=SignallingClock())
        slots: list[datetime] = []
        thread = threading.Thread(target=lambda: slots.extend(timer), name="cron-test")
        thread.start()
        assert waiting.wait(10)
        cancelled = time.monotonic()
        token.set()
        thread.join(10)
        assert not thread.is_alive()
        assert time.monotonic() - cancelled < 1.0
        assert slots == []

    def test_a_cancelled_token_yields_nothing(self) -> None:
        token = CancellationToken()
        token.set()
        clock = FakeClock(datetime(2026, 1, 1, tzinfo=UTC))
        assert list(CronTimer("* * * * *", token, clock=clock)) == []
        assert clock.waits == []

    def test_cancel_during_the_body_ends_after_it_and_completes_its_slot(self) -> None:
        token = CancellationToken()
        clock = FakeClock(datetime(2026, 1, 1, tzinfo=UTC))
        ledger = MemoryLedger()
        timer = CronTimer("* * * * *", token, clock=clock, ledger=ledger)
        slots = []
        for slot in timer:
            slots.append(slot)
            token.set()
        assert len(slots) == 1
        assert ledger.slot_state(timer.name) == SlotState(completed=slots[0].astimezone(UTC))
        assert timer.completed == 1


class TestLedger:
    start = datetime(2026, 5, 4, 0, 0, 30, tzinfo=UTC)

    def test_each_slot_is_begun_then_completed_in_utc(self) -> None:
        clock = FakeClock(self.start)
        ledger = MemoryLedger()
        timer = CronTimer("*/10 * * * *", CancellationToken(), tz="Europe/Berlin", clock=clock, ledger=ledger)
        seen = run(timer, clock, 2)
        first, second = (slot.astimezone(UTC) for slot, _ in seen)
        # The second slot is begun; it completes when the loop asks for a third.
        assert ledger.writes == [("begin", first), ("complete", first), ("begin", second)]
        assert ledger.slot_state(timer.name) == SlotState(completed=first, begun=second)
        assert timer.name == "*/10 * * * * Europe/Berlin"

    def test_the_ledger_of_the_running_lock_is_found_on_the_thread(self) -> None:
        """Without ledger=, the timer records in the ledger the cluster lock set for this thread."""
        clock = FakeClock(self.start)
        ledger = MemoryLedger()
        with using_ledger(ledger):
            run(CronTimer("*/10 * * * *", CancellationToken(), clock=clock), clock, 2)
        assert [kind for kind, _ in ledger.writes] == ["begin", "complete", "begin"]

    def test_a_slot_begun_and_not_completed_runs_again_at_once_for_the_next_holder(self) -> None:
        """Holder A dies in the 00:10 run; holder B takes over at 00:13, runs 00:10 at once, then 00:20 on time."""
        clock = FakeClock(self.start)
        ledger = MemoryLedger()
        a = CronTimer("*/10 * * * *", CancellationToken(), clock=clock, ledger=ledger)
        for slot in a:
            clock.advance(minutes=3)
            break  # holder A dies mid-run: the slot was begun, never completed
        clock.current = slot.astimezone(UTC) + timedelta(minutes=3)
        b = CronTimer("*/10 * * * *", CancellationToken(), clock=clock, ledger=ledger)
        assert b.next_slot is not None
        seen = run(b, clock, 3)
        assert [(f"{s:%H:%M}", f"{at:%H:%M}") for s, at in seen] == [
            ("00:10", "00:13"),
            ("00:20", "00:20"),
            ("00:30", "00:30"),
        ]
        assert (b.missed, b.late) == (0, 0)
        completed = [s for kind, s in ledger.writes if kind == "complete"]
        assert completed == sorted(set(completed)), "no slot completed twice"

    def test_slots_due_while_no_one_held_the_lock_are_misfires(self) -> None:
        """Completed up to 00:10; the next holder starts at 00:35: 00:20 and 00:30 follow the policy."""
        ledger = MemoryLedger()
        name = "*/10 * * * * UTC"
        ledger.states[name] = SlotState(completed=datetime(2026, 5, 4, 0, 10, tzinfo=UTC))
        clock = FakeClock(datetime(2026, 5, 4, 0, 35, tzinfo=UTC))
        skip = CronTimer("*/10 * * * *", CancellationToken(), clock=clock, ledger=ledger)
        assert [f"{s:%H:%M}" for s, _ in run(skip, clock, 1)] == ["00:40"]
        assert skip.missed == 2

        ledger.states[name] = SlotState(completed=datetime(2026, 5, 4, 0, 10, tzinfo=UTC))
        clock.current = datetime(2026, 5, 4, 0, 35, tzinfo=UTC)
        late = CronTimer("*/10 * * * *", CancellationToken(), clock=clock, ledger=ledger, misfire="run_late", grace=600)
        assert [(f"{s:%H:%M}", f"{at:%H:%M}") for s, at in run(late, clock, 2)] == [
            ("00:30", "00:35"),
            ("00:40", "00:40"),
        ]
        assert (late.missed, late.late) == (1, 1)

    def test_a_schedule_never_run_owes_nothing_from_before(self) -> None:
        clock = FakeClock(datetime(2026, 5, 4, 0, 35, tzinfo=UTC))
        timer = CronTimer("*/10 * * * *", CancellationToken(), clock=clock, ledger=MemoryLedger())
        assert [f"{s:%H:%M}" for s, _ in run(timer, clock, 1)] == ["00:40"]
        assert timer.missed == 0

    def test_a_body_that_raises_leaves_the_slot_begun_and_the_next_timer_runs_it(self) -> None:
        clock = FakeClock(self.start)
        ledger = MemoryLedger()
        with pytest.raises(RuntimeError, match="report failed"):
            for _ in CronTimer("*/10 * * * *", CancellationToken(), clock=clock, ledger=ledger):
                raise RuntimeError("report failed")
        assert ledger.slot_state("*/10 * * * * UTC") == SlotState(begun=datetime(2026, 5, 4, 0, 10, tzinfo=UTC))
        again = CronTimer("*/10 * * * *", CancellationToken(), clock=clock, ledger=ledger)
        assert [f"{s:%H:%M}" for s, _ in run(again, clock, 1)] == ["00:10"]

    def test_a_refused_begin_ends_the_iteration_before_the_body(self) -> None:
        """begin_slot returns False: this process lost the lock; the body does not run."""
        clock = FakeClock(self.start)
        ledger = MemoryLedger()
        ledger.holding = False
        timer = CronTimer("*/10 * * * *", CancellationToken(), clock=clock, ledger=ledger)
        assert list(timer) == []
        assert timer.lost_lock
        assert timer.runs == 0

    def test_a_refused_completion_ends_the_iteration_after_the_body(self) -> None:
        clock = FakeClock(self.start)
        ledger = MemoryLedger()
        timer = CronTimer("*/10 * * * *", CancellationToken(), clock=clock, ledger=ledger)
        slots = []
        for slot in timer:
            slots.append(slot)
            ledger.holding = False  # the lease ran out during the run
        assert len(slots) == 1
        assert timer.lost_lock
        assert timer.completed == 0

    def test_without_a_ledger_the_timer_works_alone(self) -> None:
        clock = FakeClock(self.start)
        timer = CronTimer("*/10 * * * *", CancellationToken(), clock=clock)
        assert len(run(timer, clock, 3)) == 3
        assert timer.completed == 2


class TestValidation:
    token = CancellationToken()

    @pytest.mark.parametrize(
        ("expression", "message"),
        [
            ("61 * * * *", "invalid cron expression '61 \\* \\* \\* \\*': Bad minute"),
            ("* 24 * * *", "Bad hour"),
            ("0 0 * * * *", "has 6"),
            ("0 0 * *", "has 4"),
            ("0 0 30 2 *", "Bad day-of-month"),
            ("", "has 0"),
        ],
    )
    def test_a_bad_expression_is_refused_at_construction(self, expression: str, message: str) -> None:
        with pytest.raises(ConfigurationError, match=message):
            CronTimer(expression, self.token)

    def test_an_expression_must_be_a_string(self) -> None:
        with pytest.raises(ConfigurationTypeError, match="must be a string"):
            CronTimer(30, self.token)  # type: ignore[arg-type]

    def test_an_unknown_time_zone_is_refused_and_tzdata_is_named(self) -> None:
        with pytest.raises(ConfigurationError, match=r"unknown time zone 'Europe/Berlim'.*tzdata"):
            CronTimer("0 2 * * *", self.token, tz="Europe/Berlim")

    @pytest.mark.parametrize("tz", ["/etc/localtime", "../x"])
    def test_a_malformed_time_zone_is_refused(self, tz: str) -> None:
        with pytest.raises(ConfigurationError, match="IANA time zone name"):
            CronTimer("0 2 * * *", self.token, tz=tz)

    def test_a_tzinfo_is_accepted(self) -> None:
        assert CronTimer("0 2 * * *", self.token, tz=timezone(timedelta(hours=2))).tz == timezone(timedelta(hours=2))
        with pytest.raises(ConfigurationTypeError, match="tz must be"):
            CronTimer("0 2 * * *", self.token, tz=2)  # type: ignore[arg-type]

    def test_misfire_and_grace(self) -> None:
        with pytest.raises(ConfigurationError, match="misfire must be 'skip' or 'run_late'"):
            CronTimer("0 2 * * *", self.token, misfire="catch_up")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="needs grace="):
            CronTimer("0 2 * * *", self.token, misfire="run_late")
        with pytest.raises(ConfigurationError, match="applies to misfire='run_late' only"):
            CronTimer("0 2 * * *", self.token, grace=60)
        with pytest.raises(ConfigurationError, match="grace must be > 0"):
            CronTimer("0 2 * * *", self.token, misfire="run_late", grace=-1)
        assert CronTimer("0 2 * * *", self.token, misfire="run_late", grace=90).grace == timedelta(seconds=90)

    def test_the_token_and_the_ledger_are_checked(self) -> None:
        with pytest.raises(ConfigurationTypeError, match="needs a CancellationToken"):
            CronTimer("0 2 * * *", None)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationTypeError, match="ledger must be a SlotLedger"):
            CronTimer("0 2 * * *", self.token, ledger=object())  # type: ignore[arg-type]

    def test_a_naive_clock_is_refused(self) -> None:
        class Naive:
            def now(self) -> datetime:
                return datetime(2026, 1, 1)

            def wait(self, token: CancellationToken, seconds: float) -> bool:
                return True

        with pytest.raises(ConfigurationError, match="timezone-aware"):
            CronTimer("0 2 * * *", self.token, clock=Naive())

    def test_repr_and_next_slot(self) -> None:
        clock = FakeClock(local("2026-03-28 12:00"))
        timer = CronTimer("30  2 * * *", self.token, tz="Europe/Berlin", clock=clock)
        assert timer.next_slot == local("2026-03-29 03:00")
        assert repr(timer) == (
            "<CronTimer '30 2 * * *' tz=Europe/Berlin misfire=skip next=2026-03-29T03:00:00+02:00 completed=0 missed=0>"
        )


class TestScheduledService:
    def test_calls_the_function_at_each_slot(self) -> None:
        clock = FakeClock(datetime(2026, 5, 4, 0, 0, 30, tzinfo=UTC))
        token = CancellationToken()
        slots: list[datetime] = []

        def report(slot: datetime) -> None:
            slots.append(slot)
            if len(slots) == 3:
                token.set()

        ScheduledService(report, "0 * * * *", tz="Europe/Berlin", clock=clock).execute(token)
        assert [f"{s:%H:%M%z}" for s in slots] == ["03:00+0200", "04:00+0200", "05:00+0200"]

    def test_checks_its_arguments_at_registration(self) -> None:
        with pytest.raises(ConfigurationError, match="Bad hour"):
            ScheduledService(print, "0 25 * * *")
        with pytest.raises(InvalidServiceError, match="needs a callable"):
            ScheduledService("report", "0 2 * * *")  # type: ignore[arg-type]


def fresh(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
    )


class TestOptionalExtra:
    def test_import_hostkit_does_not_import_cronsim(self) -> None:
        out = fresh(
            """
            import sys
            import hostkit
            from hostkit import CronTimer, ScheduledService
            print("cronsim" in sys.modules)
            """
        )
        assert out.stdout.strip() == "False", out.stderr

    def test_without_cronsim_the_error_names_the_extra(self) -> None:
        out = fresh(
            """
            import sys
            sys.modules["cronsim"] = None  # as if not installed
            from hostkit import CancellationToken, CronTimer
            try:
                CronTimer("0 2 * * *", CancellationToken())
            except ImportError as err:
                print(err)
            """
        )
        assert out.stdout.strip() == "CronTimer needs cronsim, which is not installed: pip install 'pyhostkit[cron]'"


class TestInAHost:
    @pytest.mark.parametrize("placement", ["thread", "process"])
    def test_a_scheduled_service_runs_its_slots_and_stops_with_the_host(self, tmp_path, placement: str) -> None:
        """Hourly slots (fast-forwarded) reach the function, in a thread or a child; the host stops it."""
        record = tmp_path / "slots.txt"
        service = ScheduledService(
            SlotFile(record),
            "0 * * * *",
            tz="Europe/Berlin",
            clock=FastForwardClock(local("2026-03-29 00:30")),
        )
        host = HostBuilder().add_hosted_service(service, placement=placement, name="Hourly").build()  # type: ignore[arg-type]
        with host:
            assert wait_until(lambda: len(read_slots(record)) >= 3, timeout=30)
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 10
        slots, pids = zip(*read_slots(record))
        assert slots[:3] == ("2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T04:00:00+02:00")
        assert (set(pids) == {os.getpid()}) is (placement == "thread")
        assert host.status()["Hourly"].error is None

    def test_under_once_per_deployment_slots_go_to_the_lock_and_a_restart_resumes_there(self, tmp_path) -> None:
        """With a FileLock, the timer records in the lock's ledger; a host started again repeats no slot."""
        from hostkit import OncePerDeployment
        from hostkit.cluster import FileLock

        record = tmp_path / "slots.txt"
        lock = tmp_path / "hourly.lock"

        def run_host(count: int) -> None:
            service = ScheduledService(SlotFile(record), "0 * * * *", clock=FastForwardClock(local("2026-03-29 00:30")))
            once = OncePerDeployment(service, lock=FileLock(lock), poll_interval=0.05)
            with HostBuilder().add_hosted_service(once, name="Hourly").build():
                assert wait_until(lambda: len(read_slots(record)) >= count, timeout=30)

        run_host(3)
        first = [slot for slot, _ in read_slots(record)]
        lease = FileLock(lock).lease("Hourly")
        assert lease.try_acquire()
        try:
            state = lease.slot_state("0 * * * * UTC")
        finally:
            lease.release()
        assert state.completed == datetime.fromisoformat(first[-1])
        # The second host's clock starts at the same fake moment, before the slots already completed.
        run_host(len(first) + 2)
        slots = [datetime.fromisoformat(slot) for slot, _ in read_slots(record)]
        assert slots == sorted(set(slots)), "no slot ran twice"
        assert {b - a for a, b in itertools.pairwise(slots)} == {timedelta(hours=1)}, "and none was left out"
