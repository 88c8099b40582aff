"""Bad input fails at the earliest moment, naming what was wrong, the service, and the fix."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from hostkit import (
    BackgroundService,
    CancellationToken,
    HostBuilder,
    HostedService,
    HostOptions,
    HostState,
    ServiceState,
)
from hostkit.exceptions import (
    ConfigurationError,
    ConfigurationTypeError,
    HostStartupError,
    HostStateError,
    InvalidServiceError,
    StartupTimeoutError,
)


class Worker(BackgroundService):
    def execute(self, stopping: CancellationToken) -> None:
        stopping.wait()


class NoExecute(BackgroundService):
    pass


class TestNotAService:
    def test_function_is_refused_with_a_hint(self) -> None:
        """A plain function is not a service: the error says how to wrap it."""

        def poll_table(stopping: CancellationToken) -> None: ...

        with pytest.raises(
            InvalidServiceError,
            match=r"add_hosted_service\(\) needs a HostedService or BackgroundService subclass or instance, "
            r"not: <function .*poll_table.*> \(function\)\. To run a function, subclass hostkit.BackgroundService "
            r"and call it from execute\(stopping\)",
        ):
            HostBuilder().services.add_hosted_service(poll_table)

    def test_unrelated_class_is_refused_with_a_hint(self) -> None:
        """A class that is not a HostedService subclass: the error says what to subclass."""

        class Poller:
            def start(self, token: CancellationToken) -> None: ...

        with pytest.raises(
            InvalidServiceError,
            match=r"not: <class '.*Poller'> \(type\)\. Make the class subclass hostkit.HostedService",
        ):
            HostBuilder().services.add_hosted_service(Poller)

    def test_other_object_is_refused(self) -> None:
        """Any other value is refused, and is also a TypeError."""
        with pytest.raises(
            TypeError, match=r"needs a HostedService or BackgroundService subclass or instance, not: 42 \(int\)\.$"
        ):
            HostBuilder().services.add_hosted_service(42)


class TestBackgroundServiceWithoutExecute:
    def test_missing_execute_is_refused_at_registration(self) -> None:
        """A BackgroundService subclass without execute() fails when registered, not when it runs."""
        with pytest.raises(
            InvalidServiceError,
            match=r"NoExecute is a BackgroundService but does not implement execute\(stopping\); "
            r"add `def execute\(self, stopping\): ...`",
        ):
            HostBuilder().services.add_hosted_service(NoExecute)

    def test_missing_execute_instance_is_refused_too(self) -> None:
        """The same check applies to an instance."""
        with pytest.raises(
            InvalidServiceError, match="NoExecute is a BackgroundService but does not implement execute"
        ):
            HostBuilder().services.add_hosted_service(NoExecute())


class TestTimeouts:
    @pytest.mark.parametrize("field", ["shutdown_timeout", "startup_timeout"])
    def test_negative_timeout(self, field: str) -> None:
        """A negative timeout is a ConfigurationError (a ValueError) naming the option."""
        with pytest.raises(ConfigurationError, match=rf"HostOptions.{field} must be >= 0 seconds, not: -1.5 \(float\)"):
            HostOptions(**{field: -1.5})

    @pytest.mark.parametrize("field", ["shutdown_timeout", "startup_timeout"])
    def test_non_numeric_timeout(self, field: str) -> None:
        """A string timeout is a ConfigurationTypeError (also a TypeError) saying what is accepted."""
        with pytest.raises(
            ConfigurationTypeError,
            match=rf"HostOptions.{field} must be a number of seconds or a timedelta, not: '30' \(str\)",
        ) as info:
            HostOptions(**{field: "30"})
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)

    def test_nan_timeout(self) -> None:
        """NaN is refused like a negative number."""
        with pytest.raises(ConfigurationError, match=r"HostOptions.shutdown_timeout must be >= 0 seconds, not: nan"):
            HostOptions(shutdown_timeout=float("nan"))

    @pytest.mark.parametrize("field", ["shutdown_timeout", "startup_timeout"])
    @pytest.mark.parametrize("value", [float("inf"), 1e12])
    def test_infinite_or_absurd_timeout(self, field: str, value: float) -> None:
        """inf and durations past a year are refused when the options are made.

        An infinite budget used to be accepted and then broke the stop itself: every
        wait on the budget raised OverflowError and the services were never waited for.
        """
        with pytest.raises(ConfigurationError) as info:
            HostOptions(**{field: value})
        assert str(info.value) == (
            f"HostOptions.{field} must be a finite number of seconds, at most 31536000 (365 days), "
            f"not: {value!r} (float)"
        )

    def test_assigning_a_field_later_is_validated_too(self) -> None:
        """Options changed after they were made (as `hostkit run` does on a built host) are checked the same way."""
        options = HostOptions()
        with pytest.raises(ConfigurationError, match=r"HostOptions.shutdown_timeout must be a finite number"):
            options.shutdown_timeout = float("inf")
        with pytest.raises(ConfigurationError, match=r"HostOptions.on_background_error must be one of"):
            options.on_background_error = "restart"  # type: ignore[assignment]
        assert options.shutdown_timeout == 30.0
        assert options.on_background_error == "stop_host"
        options.shutdown_timeout = timedelta(seconds=12)
        assert options.shutdown_timeout == 12.0

    def test_configure_options_validates_at_once(self) -> None:
        """configure_options() validates the new value when called, not at build()."""
        with pytest.raises(ConfigurationError, match=r"HostOptions\.shutdown_timeout must be >= 0 seconds"):
            HostBuilder().configure_options(shutdown_timeout=-3)

    def test_configure_options_unknown_field_lists_the_known_ones(self) -> None:
        """A misspelt option name is refused with the list of real names."""
        with pytest.raises(
            ConfigurationError, match=r"unknown HostOptions field\(s\): shutdown_timout; known: .*shutdown_timeout"
        ):
            HostBuilder().configure_options(shutdown_timout=3)


class TestPlacement:
    def test_unknown_placement_names_the_service_and_choices(self) -> None:
        """An unknown placement names the service and the valid placements."""
        with pytest.raises(
            ConfigurationError,
            match=r"add_hosted_service\(Worker\): placement must be one of 'thread', 'process', "
            r"not: 'subprocess' \(str\)",
        ):
            HostBuilder().services.add_hosted_service(Worker, placement="subprocess")

    def test_placement_on_a_hosted_service(self) -> None:
        """placement= on a plain HostedService is refused, saying to make it a BackgroundService."""

        class Warm(HostedService):
            pass

        with pytest.raises(
            ConfigurationError, match=r"placement='thread' applies to BackgroundService only; .*Warm is a HostedService"
        ):
            HostBuilder().services.add_hosted_service(Warm, placement="thread")

    def test_process_option_on_a_thread_service(self) -> None:
        """A process-only option on a thread-placed service is refused, naming both."""
        with pytest.raises(
            ConfigurationError,
            match=r"memory_limit= applies to placement='process' only; Worker is registered with placement='thread'",
        ):
            HostBuilder().services.add_hosted_service(Worker, memory_limit="1GB")


class TestOtherOptions:
    def test_unknown_on_background_error(self) -> None:
        """on_background_error accepts only the documented values."""
        with pytest.raises(
            ConfigurationError, match=r"on_background_error must be one of 'stop_host', 'ignore', not: 'restart'"
        ):
            HostOptions(on_background_error="restart")  # type: ignore[arg-type]

    def test_non_bool_flag(self) -> None:
        """Boolean options refuse truthy strings."""
        with pytest.raises(
            ConfigurationTypeError, match=r"HostOptions\.stop_concurrently must be True or False, not: 'yes'"
        ):
            HostOptions(stop_concurrently="yes")  # type: ignore[arg-type]

    def test_builder_options_of_wrong_type(self) -> None:
        """HostBuilder(options=) must be a HostOptions, not a dict."""
        with pytest.raises(
            ConfigurationTypeError, match=r"HostBuilder\(options=...\) must be a hostkit.HostOptions, not: \{"
        ):
            HostBuilder(options={"shutdown_timeout": 3})  # type: ignore[arg-type]

    def test_restart_of_wrong_type_names_the_service(self) -> None:
        """restart= must be a RestartPolicy; the error names the service."""
        with pytest.raises(
            ConfigurationTypeError,
            match=r"add_hosted_service\(Worker\): restart= must be a hostkit.RestartPolicy or None, not: 3 \(int\)",
        ):
            HostBuilder().services.add_hosted_service(Worker, restart=3)

    def test_duplicate_name(self) -> None:
        """Two registrations cannot share a name."""
        services = HostBuilder().services
        services.add_hosted_service(Worker, name="jobs")
        with pytest.raises(
            ConfigurationError,
            match="a hosted service named 'jobs' is already registered; give each registration its own name=",
        ):
            services.add_hosted_service(Worker, name="jobs")

    def test_same_class_twice_gets_distinct_names(self) -> None:
        """Registering a class twice is allowed: two instances with distinct names."""
        builder = HostBuilder()
        builder.services.add_hosted_service(Worker)
        builder.services.add_hosted_service(Worker)
        host = builder.build()
        assert [s.name for s in host.status().services] == ["Worker", "Worker-2"]


class TestSameInstanceTwice:
    def test_same_instance_registered_twice_is_refused(self) -> None:
        """One instance runs once per host: registering it again is refused at once, naming it."""
        services = HostBuilder().services
        worker = Worker()
        services.add_hosted_service(worker, name="first")
        with pytest.raises(
            ConfigurationError,
            match=r"this Worker instance is already registered \(as 'first'\); a service instance runs once per host",
        ):
            services.add_hosted_service(worker, name="second")


class TestStartupTimeout:
    def test_start_blocking_past_startup_timeout(self, logs) -> None:
        """A start() that blocks past startup_timeout fails start-up naming the service, the fix, and where it hangs."""
        release = threading.Event()
        stopped: list[str] = []

        def connect_forever(release: threading.Event) -> None:
            release.wait(30)

        class Hangs(HostedService):
            def start(self, token: CancellationToken) -> None:
                connect_forever(release)

        class Early(HostedService):
            def stop(self, token: CancellationToken) -> None:
                stopped.append("early")

        builder = HostBuilder(options=HostOptions(startup_timeout=0.5, shutdown_timeout=5))
        builder.services.add_hosted_service(Early)
        builder.services.add_hosted_service(Hangs, name="db-connect")
        host = builder.build()
        try:
            with pytest.raises(
                StartupTimeoutError,
                match=r"hosted service 'db-connect' did not finish starting within startup_timeout=0.5 s; "
                r"the 1 service\(s\) already started were stopped. Make its start\(\) return promptly "
                r"\(move long work to a BackgroundService\) or raise startup_timeout",
            ) as info:
                host.start()
            assert isinstance(info.value, HostStartupError) and isinstance(info.value, TimeoutError)
            assert info.value.service == "db-connect"
            assert stopped == ["early"]
            assert host.status()["db-connect"].state is ServiceState.TIMED_OUT
            records = logs.find(
                "Hosted service 'db-connect' did not finish starting within startup_timeout", "CRITICAL"
            )
            assert records and "connect_forever" in records[0]["message"]
            assert host.exit_code == 3
        finally:
            release.set()


class TestHostCalls:
    def test_run_twice_is_refused(self) -> None:
        """A host runs once: a second run() names the state and says to build a new host."""

        class Quit(BackgroundService):
            def execute(self, stopping: CancellationToken) -> None:
                assert host.lifetime.started.wait(10)
                host.lifetime.stop_application()

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(Quit)
        host = builder.build()
        assert host.run() == 0
        with pytest.raises(
            HostStateError,
            match=r"Host.run\(\) was called on a host that is already stopped; a Host runs once. "
            r"Build a new Host with HostBuilder.build\(\) to run again",
        ):
            host.run()

    def test_run_after_start_is_refused(self) -> None:
        """run() on a host already started by start() is refused, naming the state."""
        host = HostBuilder().build()
        host.start()
        try:
            with pytest.raises(HostStateError, match=r"Host\.run\(\) was called on a host that is already running"):
                host.run()
        finally:
            host.stop()

    def test_stop_before_start_is_a_no_op(self) -> None:
        """stop() before start() is not an error; the host can still start afterwards."""
        host = HostBuilder().build()
        host.stop()
        assert host.state is HostState.CREATED
        host.start()
        host.stop()
        assert host.state is HostState.STOPPED

    def test_build_twice_is_refused(self) -> None:
        """A builder builds one host."""
        builder = HostBuilder()
        builder.build()
        with pytest.raises(HostStateError, match=r"HostBuilder.build\(\) was called twice; a builder builds one host"):
            builder.build()
