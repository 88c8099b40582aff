"""The seams between hostkit's parts: nothing of hostkit is stored on user objects or exceptions."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from hostkit import (
    ApplicationLifetime,
    BackgroundService,
    CancellationToken,
    CancellationTokenSource,
    HostBuilder,
    HostedService,
    HostOptions,
)
from hostkit._embed import EmbeddedHost
from hostkit._runners._base import runner_for
from hostkit.cli import CliError
from hostkit.cli.run import load_host
from hostkit.exceptions import ConfigurationError, HostStartupError
from tests.conftest import wait_until


class Beats(BackgroundService):
    def __init__(self) -> None:
        self.beat = threading.Event()

    def execute(self, stopping: CancellationToken) -> None:
        self.heartbeat()
        self.beat.set()
        stopping.wait()


class FailsToStart(HostedService):
    def start(self, token: CancellationToken) -> None:
        raise ValueError("no database")


def gives_42() -> int:
    return 42


class TestRunnerTable:
    def test_the_runner_is_not_stored_on_the_service_and_heartbeat_reaches_the_host(self) -> None:
        """heartbeat() finds the host's runner, and the service's __dict__ holds only what the user put there."""
        service = Beats()
        builder = HostBuilder()
        builder.services.add_hosted_service(service)
        with builder.build() as host:
            assert service.beat.wait(10)
            assert wait_until(lambda: host.status()["Beats"].last_heartbeat_at is not None)
            assert set(vars(service)) == {"beat"}

    def test_a_host_built_and_dropped_leaves_no_runner_behind(self) -> None:
        """The runner table holds no runner alive: a host that never ran takes its runners with it."""
        service = Beats()
        builder = HostBuilder()
        builder.services.add_hosted_service(service)
        host = builder.build()
        assert runner_for(service) is not None
        gone = weakref.ref(host)
        del host, builder
        gc.collect()
        assert gone() is None
        assert runner_for(service) is None


class TestStartFailure:
    def test_the_failing_service_is_named_and_nothing_is_stashed_on_the_users_exception(self) -> None:
        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(FailsToStart(), name="db")
        host = builder.build()
        with pytest.raises(
            HostStartupError, match="hosted service 'db' failed to start: ValueError: no database"
        ) as info:
            host.start()
        cause = info.value.__cause__
        assert isinstance(cause, ValueError)
        assert vars(cause) == {}


class TestPublicSeams:
    def test_lifetime_stop_handler_is_given_or_set_and_called_when_stopping_is_set(self) -> None:
        calls: list[str] = []
        lifetime = ApplicationLifetime(on_stop_requested=lambda: calls.append("given"))
        lifetime.stop_application()
        other = ApplicationLifetime()
        other.set_stop_handler(lambda: calls.append("set"))
        other.stopping.set()
        assert calls == ["given", "set"]

    def test_token_remaining_and_watch_bound_a_wait_without_a_timer_thread(self) -> None:
        with CancellationTokenSource(cancel_after=30) as source:
            remaining = source.token.remaining()
            assert remaining is not None
            assert 0 < remaining <= 30
            woken = threading.Event()
            with source.token.watch(woken.set):
                assert not any(t.name.startswith("hostkit-cancel-after") for t in threading.enumerate())
                source.cancel()
            assert woken.is_set()
        assert CancellationToken().remaining() is None

    def test_service_records_is_a_read_only_tuple_in_registration_order(self) -> None:
        builder = HostBuilder()
        builder.services.add_hosted_service(Beats(), name="a")
        builder.services.add_hosted_service(Beats(), name="b")
        records = builder.build().service_records()
        assert isinstance(records, tuple)
        assert [r.name for r in records] == ["a", "b"]


class TestOneResolver:
    def test_cli_and_embed_name_a_factory_that_gives_no_host_the_same_way(self) -> None:
        """`hostkit run` and the embedded hosts resolve "module:attr or factory -> Host" in one place."""
        said = (
            r"tests.test_seams:gives_42\(\) returned 42 \(int\); it must return a hostkit.Host or a hostkit.HostBuilder"
        )
        with pytest.raises(CliError, match=said):
            load_host("tests.test_seams:gives_42")
        with pytest.raises(ConfigurationError, match=said):
            EmbeddedHost(gives_42).start()
