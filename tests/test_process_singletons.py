"""A process-placed class gets its own singletons in its child: build() says so, once per service.

The user story: a hosted service warms a singleton cache in the host, a loop moved to
``placement="process"`` reads the child's own, empty one. ``build()`` logs one
WARNING per such service naming the dependency chain; ``add_singleton(...,
per_process=True)`` says "one per process is what I want" and silences it.
"""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest

from hostkit import ApplicationLifetime, BackgroundService, CancellationToken, HostBuilder, HostOptions
from hostkit.exceptions import InvalidServiceError
from tests.conftest import LogCapture
from tests.subproc import Program, python


class PriceCache:
    def __init__(self) -> None:
        self.prices: dict[str, float] = {}


class Settings:
    pass


class Formatter:
    """A transient between a service and a singleton."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings


class Repository:
    """A singleton that holds another singleton."""

    def __init__(self, cache: PriceCache) -> None:
        self.cache = cache


class Reporter(BackgroundService):
    def __init__(self, cache: PriceCache) -> None:
        self.cache = cache

    def execute(self, stopping: CancellationToken) -> None:
        stopping.wait()


class Auditor(BackgroundService):
    """Reaches singletons only through a transient and a singleton, and takes hostkit's own lifetime."""

    def __init__(self, formatter: Formatter, repository: Repository, lifetime: ApplicationLifetime) -> None:
        self.formatter = formatter
        self.repository = repository

    def execute(self, stopping: CancellationToken) -> None:
        stopping.wait()


class OnlyHostkitOwn(BackgroundService):
    def __init__(self, lifetime: ApplicationLifetime, options: HostOptions) -> None:
        self.lifetime = lifetime

    def execute(self, stopping: CancellationToken) -> None:
        stopping.wait()


def singleton_warnings(logs: LogCapture) -> list[dict[str, Any]]:
    return logs.find("runs in a child process (placement='process') and depends on", level="WARNING")


def builder_with_graph() -> HostBuilder:
    builder = HostBuilder()
    builder.services.add_singleton(PriceCache)
    builder.services.add_singleton(Settings)
    builder.services.add_singleton(Repository)
    builder.services.add_transient(Formatter)
    return builder


class TestWarningAtBuild:
    def test_one_warning_per_process_placed_service_naming_the_chain(self, logs: LogCapture) -> None:
        """Each process-placed class that reaches singletons gets one WARNING, with each chain to them."""
        builder = builder_with_graph()
        builder.services.add_hosted_service(Reporter, placement="process")
        builder.services.add_hosted_service(Auditor, placement="process")
        builder.build()
        found = singleton_warnings(logs)
        assert len(found) == 2, logs.text()
        by_service = {record["service"]: record["message"] for record in found}
        assert set(by_service) == {"Reporter", "Auditor"}
        reporter = by_service["Reporter"]
        assert "depends on a singleton: Reporter -> PriceCache." in reporter
        assert "The child builds its own instance of it, not the one this process uses" in reporter
        assert "register it with add_singleton(PriceCache, per_process=True)" in reporter
        auditor = by_service["Auditor"]
        # Through a transient, through a singleton (and the singleton itself), shortest chain each;
        # hostkit's own ApplicationLifetime is per process by design and not named.
        assert (
            "depends on singletons: Auditor -> Repository, Auditor -> Formatter -> Settings, "
            "Auditor -> Repository -> PriceCache." in auditor
        )
        assert (
            "The child builds its own instance of each, not the ones this process uses: what this process puts in them"
            in auditor
        )
        assert "ApplicationLifetime" not in auditor
        assert "register each with add_singleton(..., per_process=True): Repository, Settings, PriceCache" in auditor

    def test_no_warning_for_thread_placement_instances_or_hostkit_own(self, logs: LogCapture) -> None:
        """A thread shares the singletons; an instance crosses as itself; lifetime and options are per process."""
        builder = builder_with_graph()
        builder.services.add_hosted_service(Reporter)  # thread
        builder.services.add_hosted_service(Reporter(PriceCache()), placement="process", name="Snapshot")
        builder.services.add_hosted_service(OnlyHostkitOwn, placement="process")
        builder.build()
        assert singleton_warnings(logs) == [], logs.text()

    def test_per_process_singletons_are_not_named(self, logs: LogCapture) -> None:
        """per_process=True silences that singleton; what it depends on is still checked."""
        builder = HostBuilder()
        builder.services.add_singleton(PriceCache, per_process=True)
        builder.services.add_hosted_service(Reporter, placement="process")
        builder.build()
        assert singleton_warnings(logs) == [], logs.text()

        builder = builder_with_graph()
        builder.services.add_singleton(Repository, per_process=True)
        builder.services.add_singleton(Settings, per_process=True)
        builder.services.add_hosted_service(Auditor, placement="process")
        builder.build()
        (only,) = singleton_warnings(logs)
        assert "depends on a singleton: Auditor -> Repository -> PriceCache." in only["message"]

    def test_per_process_must_be_a_bool(self) -> None:
        """A wrong kind of value is refused at registration, naming the key and the value."""
        builder = HostBuilder()
        with pytest.raises(InvalidServiceError) as info:
            builder.services.add_singleton(PriceCache, per_process="yes")  # type: ignore[arg-type]
        assert str(info.value) == "add_singleton(PriceCache, per_process=...) must be True or False, not: 'yes' (str)"

    def test_per_process_survives_the_trip_to_the_child(self) -> None:
        """The marker is part of the registration a child rebuilds its container from."""
        builder = HostBuilder()
        builder.services.add_singleton(PriceCache, per_process=True)
        descriptor = builder.services.descriptor(PriceCache)
        assert descriptor is not None and descriptor.per_process
        assert builder.services.copy().descriptor(PriceCache) is descriptor


# The user's program, as the getting-started page had it: a warm-up fills a singleton
# cache, and a loop moved to a child process reads it. Run as a real script, because the
# warning must reach a user who has configured no logging (build() runs before run()).
PROGRAM = textwrap.dedent(
    """
    from loguru import logger

    from hostkit import BackgroundService, HostBuilder, HostedService, PeriodicTimer


    class PriceCache:
        def __init__(self):
            self.prices = {}


    class WarmCache(HostedService):
        def __init__(self, cache: PriceCache):
            self.cache = cache

        def start(self, token):
            self.cache.prices = {f"SKU-{n}": 1.0 for n in range(250)}


    class Reporter(BackgroundService):
        def __init__(self, cache: PriceCache):
            self.cache = cache

        def execute(self, stopping):
            for tick in PeriodicTimer(1.0, stopping):
                logger.info("Report {}: {} prices", tick, len(self.cache.prices))


    builder = HostBuilder()
    builder.services.add_singleton(PRICE_CACHE_REGISTRATION)
    builder.services.add_hosted_service(WarmCache)
    builder.services.add_hosted_service(Reporter, placement="process")

    if __name__ == "__main__":
        raise SystemExit(builder.build().run())
    """
)


def run_until(script: Path, needle: str) -> tuple[int, str]:
    """Run ``script`` until it prints ``needle``, then SIGTERM it; its exit code and output."""
    with Program(python(script.name), cwd=script.parent, folder=script.parent) as program:
        program.wait_for_output(needle, timeout=60)
        assert program.running(), program.describe()
        program.signal(signal.SIGTERM)
        return program.wait(30), program.output


class TestTheUsersProgram:
    @pytest.mark.timeout(120)
    def test_warns_once_before_the_child_reports_zero_prices(self, tmp_path: Path) -> None:
        """Without any logging set up, the script shows the WARNING (pointing at its build() line), then 0 prices."""
        script = tmp_path / "moved.py"
        script.write_text(PROGRAM.replace("PRICE_CACHE_REGISTRATION", "PriceCache"), encoding="utf-8")
        code, output = run_until(script, "Report 1:")
        assert code == 0, output
        warnings = [line for line in output.splitlines() if "WARNING" in line]
        assert len(warnings) == 1, output
        assert "__main__:<module>:" in warnings[0]  # attributed to the user's build() call
        assert "Reporter runs in a child process (placement='process')" in warnings[0]
        assert "depends on a singleton: Reporter -> PriceCache." in warnings[0]
        assert "Report 1: 0 prices" in output  # what the warning is about

    @pytest.mark.timeout(120)
    def test_per_process_says_i_know(self, tmp_path: Path) -> None:
        """With per_process=True the same script runs without the warning."""
        script = tmp_path / "moved.py"
        script.write_text(PROGRAM.replace("PRICE_CACHE_REGISTRATION", "PriceCache, per_process=True"), encoding="utf-8")
        code, output = run_until(script, "Report 1:")
        assert code == 0, output
        assert "WARNING" not in output, output
