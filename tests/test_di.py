"""Dependency injection: registrations, scopes, disposal, build-time validation, threads, dill."""

from __future__ import annotations

import functools
import gc
import inspect
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any, Optional

import dill
import pytest

from hostkit import (
    BackgroundService,
    CancellationToken,
    HostBuilder,
    HostedService,
    HostServiceCollection,
    PeriodicTimer,
    Scope,
    ServiceCollection,
    ServiceProvider,
)
from hostkit.exceptions import (
    CaptiveDependencyError,
    CircularDependencyError,
    InvalidServiceError,
    ScopeError,
    ServiceNotFoundError,
)
from tests.conftest import wait_until

# -- services used across the tests (module level: type hints resolve, dill pickles by name) --

CLOSED: list[str] = []


class DbSession:
    """A scoped resource: records its close."""

    count = 0

    def __init__(self) -> None:
        DbSession.count += 1
        self.n = DbSession.count
        self.closed = False

    def close(self) -> None:
        self.closed = True
        CLOSED.append(f"DbSession#{self.n}")


class ReportRepository:
    def __init__(self, session: DbSession) -> None:
        self.session = session

    def close(self) -> None:
        CLOSED.append("ReportRepository")


class ReportService:
    def __init__(self, repo: ReportRepository) -> None:
        self.repo = repo


class ReportWorker(BackgroundService):
    def __init__(self, repo: ReportRepository) -> None:
        self.repo = repo

    def execute(self, stopping: CancellationToken) -> None:
        stopping.wait()


class Clock:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True
        CLOSED.append("Clock")


class Settings:
    def __init__(self, name: str = "default") -> None:
        self.name = name


class Cache:
    def __init__(self, clock: Clock, settings: Optional[Settings] = None, size: int = 10) -> None:  # noqa: UP045
        self.clock = clock
        self.settings = settings
        self.size = size

    def close(self) -> None:
        CLOSED.append("Cache")


class Formatter:
    """A transient with nothing to close."""


class Mailer:
    def __init__(self, formatter: Formatter) -> None:
        self.formatter = formatter


class CycleA:
    def __init__(self, b: CycleB) -> None:
        self.b = b


class CycleB:
    def __init__(self, c: CycleC) -> None:
        self.c = c


class CycleC:
    def __init__(self, a: CycleA) -> None:
        self.a = a


class NeedsMissing:
    def __init__(self, mailer: Mailer) -> None:
        self.mailer = mailer


class Untyped:
    def __init__(self, thing) -> None:  # type: ignore[no-untyped-def]
        self.thing = thing


class NeedsScope:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope


class ScopeUser:
    def __init__(self, provider: ServiceProvider) -> None:
        self.provider = provider


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    CLOSED.clear()
    DbSession.count = 0
    yield
    CLOSED.clear()


def scoped_graph(services: ServiceCollection | None = None) -> ServiceCollection:
    services = services if services is not None else ServiceCollection()
    services.add_scoped(DbSession)
    services.add_scoped(ReportRepository)
    services.add_scoped(ReportService)
    return services


class TestRegistration:
    def test_class_factory_and_instance_registrations_resolve(self) -> None:
        """A class, a factory and an instance each resolve; the factory's typed parameters are injected."""
        settings = Settings("prod")
        services = ServiceCollection()
        services.add_singleton(Settings, instance=settings)
        services.add_singleton(Clock)

        def make_cache(clock: Clock, s: Settings) -> Cache:
            return Cache(clock, s, size=99)

        services.add_singleton(Cache, factory=make_cache)
        provider = services.build_provider()
        cache = provider.get(Cache)
        assert cache.size == 99
        assert cache.clock is provider.get(Clock)
        assert cache.settings is settings
        assert provider.get(Settings) is settings

    def test_optional_dependency_keeps_its_default_when_not_registered(self) -> None:
        """A parameter with a default is injected only when its type is registered."""
        services = ServiceCollection().add_singleton(Clock).add_transient(Cache)
        cache = services.build_provider().get(Cache)
        assert cache.settings is None
        assert cache.size == 10
        services.add_singleton(Settings, instance=Settings("given"))
        cache = services.build_provider().get(Cache)
        assert cache.settings is not None and cache.settings.name == "given"

    def test_untyped_single_parameter_factory_receives_the_resolver(self) -> None:
        """``factory=lambda sp: ...`` gets the current scope (or the provider), as in .NET."""
        services = scoped_graph()
        services.add_scoped(Mailer, factory=lambda sp: Mailer(sp.get(Formatter)))
        services.add_transient(Formatter)
        provider = services.build_provider()
        with provider.create_scope() as scope:
            assert isinstance(scope.get(Mailer).formatter, Formatter)

    def test_transient_is_new_each_time_and_singleton_is_shared(self) -> None:
        """A transient is made per resolution; a singleton once per provider."""
        services = ServiceCollection().add_transient(Formatter).add_singleton(Clock)
        provider = services.build_provider()
        assert provider.get(Formatter) is not provider.get(Formatter)
        assert provider.get(Clock) is provider.get(Clock)

    def test_class_defined_in_a_function_resolves_from_a_string_hint(self) -> None:
        """With ``from __future__ import annotations``, a local class named in a hint resolves when registered."""

        class LocalDep:
            pass

        class LocalUser:
            def __init__(self, dep: LocalDep) -> None:
                self.dep = dep

        provider = ServiceCollection().add_singleton(LocalDep).add_singleton(LocalUser).build_provider()
        assert isinstance(provider.get(LocalUser).dep, LocalDep)

    @pytest.mark.parametrize(
        ("register", "message"),
        [
            (
                lambda s: s.add_singleton(Clock, Clock, factory=Clock),
                "add_singleton(Clock): give one of an implementation class, factory= or instance=, not several",
            ),
            (
                lambda s: s.add_scoped("session"),
                "add_scoped('session' (str)): the key is not a class, so give an implementation class",
            ),
            (
                lambda s: s.add_transient(Clock, lambda: Clock()),
                "the implementation must be a class, not: <function",
            ),
            (lambda s: s.add_singleton(Clock, factory=42), "factory must be callable, not: 42 (int)"),
            (
                lambda s: s.add_singleton(Clock, Settings),
                "add_singleton(Clock, Settings): Settings is not a subclass of Clock",
            ),
            (lambda s: s.add_singleton(Clock, instance=Settings()), "the instance is not a Clock"),
            (lambda s: s.add_singleton(ServiceProvider), "this key cannot be registered"),
            (lambda s: s.add_scope_hooks(), "add_scope_hooks() needs on_start=, on_end= or both"),
        ],
    )
    def test_bad_registration_is_refused_at_once(self, register: Any, message: str) -> None:
        """A wrong registration raises InvalidServiceError (a TypeError) naming what is wrong and the fix."""
        with pytest.raises(InvalidServiceError, match=None) as info:
            register(ServiceCollection())
        assert message in str(info.value)
        assert isinstance(info.value, TypeError)

    def test_registering_a_key_again_replaces_it(self) -> None:
        """The last registration of a key wins."""
        services = ServiceCollection().add_transient(Clock).add_singleton(Clock)
        provider = services.build_provider()
        assert provider.get(Clock) is provider.get(Clock)

    def test_hosted_service_is_built_by_the_container_as_a_singleton(self) -> None:
        """A hosted service class gets its constructor parameters injected; they are the provider's singletons."""
        seen: list[Cache] = []

        class Warm(HostedService):
            def __init__(self, cache: Cache) -> None:
                self.cache = cache

            def start(self, token: CancellationToken) -> None:
                seen.append(self.cache)

        builder = HostBuilder()
        builder.services.add_singleton(Clock).add_singleton(Cache)
        builder.add_hosted_service(Warm)
        host = builder.build()
        with host:
            assert seen == [host.services.get(Cache)]
        assert "Warm" not in repr(builder.services)  # build() did not change the user's collection
        assert len(builder.services) == 2


class TestScopes:
    def test_one_instance_per_scope(self) -> None:
        """Within a scope a scoped service is one instance; another scope gets its own."""
        provider = scoped_graph().build_provider()
        with provider.create_scope() as first:
            service = first.get(ReportService)
            assert service.repo is first.get(ReportRepository)
            assert service.repo.session is first.get(DbSession)
            with provider.create_scope() as second:
                assert second.get(DbSession) is not first.get(DbSession)

    def test_scope_closes_what_it_made_in_reverse_creation_order(self) -> None:
        """At scope end every closable object it made is closed, newest first."""
        provider = scoped_graph().build_provider()
        with provider.create_scope() as scope:
            session = scope.get(ReportService).repo.session
            assert CLOSED == []
        assert session.closed
        # DbSession was made first (a dependency is made before its consumer).
        assert CLOSED == ["ReportRepository", "DbSession#1"]

    def test_scope_closes_also_when_the_unit_of_work_raised(self) -> None:
        """An exception in the ``with`` body still closes everything, and propagates unchanged."""
        provider = scoped_graph().build_provider()
        with pytest.raises(ZeroDivisionError), provider.create_scope() as scope:
            scope.get(ReportRepository)
            1 / 0
        assert CLOSED == ["ReportRepository", "DbSession#1"]

    def test_failing_close_is_logged_and_the_others_still_close(self, logs: Any) -> None:
        """A close that raises is logged at WARNING with its traceback; the remaining objects close."""

        class Broken:
            def close(self) -> None:
                raise OSError("disk gone")

        services = scoped_graph()
        services.add_scoped(Broken)
        provider = services.build_provider()
        with provider.create_scope() as scope:
            scope.get(DbSession)
            scope.get(Broken)
            scope.get(ReportRepository)
        assert CLOSED == ["ReportRepository", "DbSession#1"]
        [record] = logs.find("Closing the scoped service", "WARNING")
        assert "Broken failed; the others still close" in record["message"]
        assert record["exception"] is not None and "disk gone" in str(record["exception"].value)

    def test_context_manager_gets_exit_with_the_exception(self) -> None:
        """An object that is only a context manager is finished by ``__exit__``, which sees the error."""
        exits: list[object] = []

        class Tx:
            def __enter__(self) -> Tx:
                return self

            def __exit__(self, *exc: object) -> None:
                exits.append(exc[0])

        provider = ServiceCollection().add_scoped(Tx).build_provider()
        with provider.create_scope() as scope:
            scope.get(Tx)
        with pytest.raises(KeyError), provider.create_scope() as scope:
            scope.get(Tx)
            raise KeyError("x")
        assert exits == [None, KeyError]

    def test_generator_factory_is_finished_at_scope_end_and_sees_the_error(self) -> None:
        """A generator factory runs to its ``yield``; after it, it commits or rolls back."""
        events: list[str] = []

        def unit_of_work() -> Iterator[DbSession]:
            session = DbSession()
            try:
                yield session
                events.append("commit")
            except Exception as err:
                events.append(f"rollback {type(err).__name__}")
                raise
            finally:
                session.close()

        provider = ServiceCollection().add_scoped(DbSession, factory=unit_of_work).build_provider()
        with provider.create_scope() as scope:
            assert isinstance(scope.get(DbSession), DbSession)
        with pytest.raises(ValueError, match="bad row"), provider.create_scope() as scope:
            scope.get(DbSession)
            raise ValueError("bad row")
        assert events == ["commit", "rollback ValueError"]
        assert CLOSED == ["DbSession#1", "DbSession#2"]

    def test_transients_are_closed_by_the_scope_that_made_them(self) -> None:
        """A closable transient resolved in a scope is closed at that scope's end."""
        provider = ServiceCollection().add_transient(Clock).build_provider()
        with provider.create_scope() as scope:
            clocks = [scope.get(Clock), scope.get(Clock)]
        assert all(c.closed for c in clocks)
        assert CLOSED == ["Clock", "Clock"]

    def test_closed_scope_refuses_resolution(self) -> None:
        """Using a scope after its end raises ScopeError naming the key."""
        provider = scoped_graph().build_provider()
        with provider.create_scope() as scope:
            pass
        with pytest.raises(ScopeError, match="this scope is closed; DbSession cannot be resolved"):
            scope.get(DbSession)

    def test_scope_and_provider_are_injectable(self) -> None:
        """A parameter typed Scope gets the current scope; one typed ServiceProvider the root provider."""
        services = ServiceCollection().add_scoped(NeedsScope).add_singleton(ScopeUser)
        provider = services.build_provider()
        with provider.create_scope() as scope:
            assert scope.get(NeedsScope).scope is scope
            assert scope.get(ScopeUser).provider is provider

    def test_scope_hooks_run_at_start_and_end(self) -> None:
        """on_start runs when a scope opens; on_end after its services closed, in reverse order."""
        order: list[str] = []
        services = scoped_graph()
        services.add_scope_hooks(on_start=lambda: order.append("start 1"), on_end=lambda: order.append("end 1"))
        services.add_scope_hooks(on_start=lambda: order.append("start 2"), on_end=lambda: order.append("end 2"))
        provider = services.build_provider()
        with provider.create_scope() as scope:
            order.append("work")
            scope.get(DbSession)
        assert order == ["start 1", "start 2", "work", "end 2", "end 1"]
        assert CLOSED == ["DbSession#1"]

    def test_failing_start_hook_undoes_the_started_ones(self) -> None:
        """If an on_start raises, the hooks already started are ended and the scope is not created."""
        order: list[str] = []

        def boom() -> None:
            raise ConnectionError("db down")

        services = ServiceCollection()
        services.add_scope_hooks(on_start=lambda: order.append("start 1"), on_end=lambda: order.append("end 1"))
        services.add_scope_hooks(on_start=boom, on_end=lambda: order.append("end 2"))
        provider = services.build_provider()
        with pytest.raises(ConnectionError, match="db down"):
            provider.create_scope()
        assert order == ["start 1", "end 1"]

    def test_unclosed_scope_warns_when_collected(self) -> None:
        """A scope dropped while still holding closable objects emits a ResourceWarning."""
        provider = ServiceCollection().add_scoped(DbSession).build_provider()
        scope = provider.create_scope()
        session = scope.get(DbSession)
        collected = weakref.ref(scope)
        # pytest.warns records the warning instead of raising it (filterwarnings=error would
        # otherwise turn it into an unraisable exception inside the finalizer).
        with pytest.warns(ResourceWarning, match="was never closed"):
            del scope
            gc.collect()
        assert collected() is None, "nothing may keep a dropped scope alive"
        assert not session.closed  # dropping is not closing: the warning is all the user gets


class TestSingletonDisposal:
    def test_host_stop_closes_singletons_in_reverse_creation_order(self) -> None:
        """Singletons the container made are closed at the end of the host's stop, newest first."""

        class Warm(HostedService):
            def __init__(self, cache: Cache) -> None:
                self.cache = cache

        given = Clock()
        builder = HostBuilder()
        builder.services.add_singleton(Clock).add_singleton(Cache)
        builder.services.add_singleton(Settings, instance=Settings())
        builder.add_hosted_service(Warm)
        host = builder.build()
        host.start()
        assert CLOSED == []
        host.stop()
        assert CLOSED == ["Cache", "Clock"]
        assert not given.closed

    def test_instance_registrations_are_never_closed(self) -> None:
        """hostkit closes only what it created: an ``instance=`` stays open."""
        clock = Clock()
        provider = ServiceCollection().add_singleton(Clock, instance=clock).build_provider()
        assert provider.get(Clock) is clock
        provider.close()
        assert not clock.closed

    def test_closed_provider_refuses_resolution_and_new_scopes(self) -> None:
        """After close(), get and create_scope raise ScopeError; close is idempotent."""
        provider = ServiceCollection().add_singleton(Clock).build_provider()
        provider.get(Clock)
        provider.close()
        provider.close()
        assert CLOSED == ["Clock"]
        with pytest.raises(ScopeError, match="this provider is closed"):
            provider.get(Clock)
        with pytest.raises(ScopeError, match="no new scope can be created"):
            provider.create_scope()


class TestValidation:
    def test_captive_chain_through_a_hosted_service_is_refused_at_build(self) -> None:
        """A hosted service reaching a scoped service fails build() naming the chain and the fix."""
        builder = HostBuilder()
        builder.services.add_scoped(DbSession).add_transient(ReportRepository)
        builder.add_hosted_service(ReportWorker)
        with pytest.raises(CaptiveDependencyError) as info:
            builder.build()
        message = str(info.value)
        assert "captive dependency: ReportWorker -> ReportRepository -> DbSession (scoped)" in message
        assert "take the scope factory (a parameter typed ServiceProvider) in ReportWorker" in message
        assert "create a scope per unit of work" in message
        assert isinstance(info.value, TypeError)

    def test_singleton_holding_a_scoped_service_directly_is_refused(self) -> None:
        """A singleton with a scoped constructor parameter fails validation."""
        services = ServiceCollection().add_scoped(DbSession).add_singleton(ReportRepository)
        with pytest.raises(CaptiveDependencyError, match=r"ReportRepository -> DbSession \(scoped\)"):
            services.build_provider()

    def test_captive_chain_starting_below_a_scoped_root_names_the_singleton(self) -> None:
        """The chain starts at the singleton that holds the scoped service, not at a scoped consumer."""
        # ReportService (scoped) is registered, and so walked, first.
        services = ServiceCollection().add_scoped(ReportService).add_singleton(ReportRepository)
        services.add_scoped(DbSession)
        with pytest.raises(CaptiveDependencyError) as info:
            services.build_provider()
        assert "captive dependency: ReportRepository -> DbSession (scoped)" in str(info.value)

    def test_singleton_taking_the_current_scope_is_refused(self) -> None:
        """A singleton whose constructor takes Scope is a captive too."""
        services = ServiceCollection().add_singleton(NeedsScope)
        with pytest.raises(CaptiveDependencyError, match=r"NeedsScope -> Scope \(the current scope\)"):
            services.build_provider()

    def test_singleton_may_use_a_transient(self) -> None:
        """As in .NET, a singleton holding a transient (that holds no scoped service) is allowed."""
        services = ServiceCollection().add_transient(Formatter).add_singleton(Mailer)
        assert isinstance(services.build_provider().get(Mailer).formatter, Formatter)

    def test_scoped_service_from_the_root_provider_raises(self) -> None:
        """Resolving a scoped service (or a transient needing one) without a scope raises ScopeError."""
        services = scoped_graph().add_transient(Mailer).add_transient(Formatter)
        provider = services.build_provider()
        with pytest.raises(ScopeError) as info:
            provider.get(DbSession)
        assert "DbSession is scoped and cannot be resolved from the root provider" in str(info.value)
        assert "with provider.create_scope() as scope: scope.get(DbSession)" in str(info.value)
        with pytest.raises(ScopeError, match=r"DbSession is scoped .* \(needed by ReportRepository\)"):
            ServiceCollection().add_scoped(DbSession).add_transient(ReportRepository).build_provider().get(
                ReportRepository
            )

    def test_missing_registration_names_the_consumer(self) -> None:
        """A dependency nobody registered fails build() naming who needs it and the parameter."""
        services = ServiceCollection().add_singleton(NeedsMissing)
        with pytest.raises(ServiceNotFoundError) as info:
            services.build_provider()
        assert "NeedsMissing (parameter 'mailer') needs Mailer, which is not registered" in str(info.value)
        assert "register it with services.add_singleton/add_scoped/add_transient" in str(info.value)
        assert isinstance(info.value, LookupError)

    def test_missing_registration_deep_in_a_chain_names_its_direct_consumer(self) -> None:
        """The consumer named is the one whose parameter cannot be filled."""
        services = ServiceCollection().add_singleton(NeedsMissing).add_singleton(Mailer)
        with pytest.raises(ServiceNotFoundError, match=r"Mailer \(parameter 'formatter'\) needs Formatter"):
            services.build_provider()

    def test_unregistered_key_at_resolution_says_so(self) -> None:
        """Asking for an unregistered key raises ServiceNotFoundError naming it."""
        with pytest.raises(ServiceNotFoundError, match="Clock was requested, but it is not registered"):
            ServiceCollection().build_provider().get(Clock)

    def test_parameter_without_type_hint_is_reported(self) -> None:
        """A constructor parameter with neither hint nor default fails build()."""
        with pytest.raises(ServiceNotFoundError, match=r"Untyped \(parameter 'thing'\) has no type hint"):
            ServiceCollection().add_transient(Untyped).build_provider()

    def test_unevaluable_type_hint_is_reported(self) -> None:
        """A hint naming something that does not exist is reported with the evaluation error."""

        class Bad:
            def __init__(self, dep: NoSuchThing) -> None:  # type: ignore[name-defined]  # noqa: F821
                self.dep = dep

        with pytest.raises(ServiceNotFoundError) as info:
            ServiceCollection().add_transient(Bad).build_provider()
        assert "Bad (parameter 'dep') has the type hint 'NoSuchThing', which cannot be evaluated" in str(info.value)
        assert "NameError" in str(info.value)

    def test_cycle_is_named(self) -> None:
        """A dependency cycle fails build() naming every step of the cycle."""
        services = ServiceCollection().add_transient(CycleA).add_transient(CycleB).add_transient(CycleC)
        with pytest.raises(CircularDependencyError) as info:
            services.build_provider()
        assert "circular dependency: CycleA -> CycleB -> CycleC -> CycleA" in str(info.value)

    def test_validation_can_be_deferred(self) -> None:
        """``validate=False`` builds anyway; the error comes at the first resolution that meets it."""
        provider = ServiceCollection().add_singleton(NeedsMissing).build_provider(validate=False)
        with pytest.raises(ServiceNotFoundError, match="NeedsMissing needs Mailer, but it is not registered"):
            provider.get(NeedsMissing)

    def test_wide_shared_graph_validates_quickly(self) -> None:
        """Validation checks each service once: 30 layers that each use all of the layer below finish."""
        services = ServiceCollection()
        below: list[type] = []
        for layer in range(30):
            current = []
            for i in range(3):
                deps = {f"d{j}": cls for j, cls in enumerate(below)}
                ns: dict[str, Any] = {}
                params = ", ".join(f"d{j}: T{j}" for j in range(len(below)))
                exec(f"def __init__(self, {params}): pass" if params else "def __init__(self): pass", ns)
                init = ns["__init__"]
                init.__annotations__ = deps
                cls = type(f"L{layer}_{i}", (), {"__init__": init})
                services.add_transient(cls)
                current.append(cls)
            below = current
        services.build_provider()  # 3^30 paths if not memoized


class TestThreads:
    @pytest.mark.parametrize("threads", [32])
    def test_singleton_created_exactly_once_under_concurrent_first_resolution(self, threads: int) -> None:
        """Many threads resolving a singleton at the same moment all get one instance, made once."""
        made: list[object] = []
        calling: list[int] = []
        release = threading.Event()

        class Slow:
            def __init__(self) -> None:
                # Hold the first maker inside the factory until every thread has asked,
                # so the others race for the same missing singleton.
                release.wait(10)
                made.append(self)

        provider = ServiceCollection().add_singleton(Slow).build_provider()
        barrier = threading.Barrier(threads)
        results: list[object] = [None] * threads

        def work(i: int) -> None:
            barrier.wait(10)
            calling.append(i)
            results[i] = provider.get(Slow)

        pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        assert wait_until(lambda: len(calling) == threads, timeout=20)
        release.set()
        for t in pool:
            t.join(20)
        assert len(made) == 1
        assert all(r is made[0] for r in results)

    def test_scopes_in_different_threads_never_share_scoped_instances(self) -> None:
        """Each thread's scope has its own scoped instances; within a scope they are shared."""
        provider = scoped_graph().build_provider()
        threads = 16
        barrier = threading.Barrier(threads)
        sessions: list[DbSession] = []
        lock = threading.Lock()

        def work() -> None:
            barrier.wait(10)
            for _ in range(50):
                with provider.create_scope() as scope:
                    session = scope.get(DbSession)
                    assert scope.get(ReportService).repo.session is session
                    with lock:
                        sessions.append(session)

        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(30)
        assert len(sessions) == threads * 50
        assert len({id(s) for s in sessions}) == len(sessions)  # all alive in the list: ids are unique
        assert all(s.closed for s in sessions)


class Flusher(BackgroundService):
    """One unit of work per tick, each in its own scope: the one-line pattern."""

    def __init__(self, provider: ServiceProvider) -> None:
        self.provider = provider
        self.sessions: list[DbSession] = []
        self.fail_on = 3

    def execute(self, stopping: CancellationToken) -> None:
        for tick in PeriodicTimer(0.01, stopping):
            try:
                self.provider.run_in_scope(self.flush, tick)
            except RuntimeError:
                pass  # tick `fail_on` raises on purpose; its scope must still be closed

    def flush(self, tick: int, repo: ReportRepository, scope: Scope) -> None:
        assert scope.get(DbSession) is repo.session
        self.sessions.append(repo.session)
        if tick == self.fail_on:
            raise RuntimeError("unit of work failed")


class TestRunInScope:
    def test_background_service_gets_a_fresh_scope_per_tick(self) -> None:
        """``provider.run_in_scope(self.flush, tick)`` gives each iteration its own scope, closed after it."""
        builder = HostBuilder()
        builder.services.add_scoped(DbSession).add_scoped(ReportRepository)
        builder.add_hosted_service(Flusher)
        host = builder.build()
        with host:
            worker = next(r.service for r in host.service_records())
            assert isinstance(worker, Flusher)
            assert wait_until(lambda: len(worker.sessions) >= 5, timeout=20)
        sessions = list(worker.sessions)
        assert len({s.n for s in sessions}) == len(sessions)
        assert all(s.closed for s in sessions)  # the failing third tick's too

    def test_exception_propagates_and_the_scope_is_closed(self) -> None:
        """The unit of work's exception reaches the caller; its scope is closed first."""
        provider = scoped_graph().build_provider()
        seen: list[DbSession] = []

        def unit(session: DbSession) -> None:
            seen.append(session)
            raise LookupError("no such report")

        with pytest.raises(LookupError, match="no such report"):
            provider.run_in_scope(unit)
        assert seen[0].closed

    def test_given_arguments_pass_through_and_defaults_stay(self) -> None:
        """Positional and keyword arguments are passed; unregistered optional parameters keep defaults."""
        provider = scoped_graph().build_provider()

        def unit(a: int, session: DbSession, *, b: str, clock: Optional[Clock] = None) -> tuple[Any, ...]:  # noqa: UP045
            return a, b, session.n, clock

        assert provider.run_in_scope(unit, 1, b="x") == (1, "x", 1, None)
        assert provider.run_in_scope(unit, a=2, b="y") == (2, "y", 2, None)

    def test_each_decorated_or_loop_made_function_gets_its_own_parameters(self) -> None:
        """Functions that share code (``functools.wraps`` wrappers, lambdas made in a loop) inject correctly."""
        services = scoped_graph().add_singleton(Clock)
        provider = services.build_provider()

        def traced(fn: Any) -> Any:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return fn(*args, **kwargs)

            return wrapper

        @traced
        def needs_session(session: DbSession) -> str:
            return type(session).__name__

        @traced
        def needs_clock(clock: Clock) -> str:
            return type(clock).__name__

        assert provider.run_in_scope(needs_session) == "DbSession"
        assert provider.run_in_scope(needs_clock) == "Clock"
        results = [provider.run_in_scope(lambda session, n=n: (n, session), session=DbSession()) for n in range(3)]
        assert [n for n, _ in results] == [0, 1, 2]

    def test_uninjectable_parameter_is_named(self) -> None:
        """A parameter with no registered type and no value raises, naming the function and parameter."""
        provider = scoped_graph().build_provider()

        def unit(mailer: Mailer) -> None:
            pass

        with pytest.raises(ServiceNotFoundError) as info:
            provider.run_in_scope(unit)
        assert "run_in_scope(" in str(info.value) and "unit): parameter 'mailer' needs Mailer" in str(info.value)


def _make_label(prefix: str) -> Any:
    def factory(clock: Clock) -> str:
        return f"{prefix}:{type(clock).__name__}"

    return factory


class TestPickling:
    def test_collection_survives_dill_and_rebuilds_in_another_provider(self) -> None:
        """Class, factory (lambda and closure) and instance registrations survive dill; the copy builds."""
        services = scoped_graph(HostServiceCollection())
        services.add_singleton(Clock)
        services.add_singleton(Settings, instance=Settings("shipped"))
        services.add_transient(str, factory=_make_label("clock"))
        services.add_transient(int, factory=lambda: 41 + 1)
        services.add_scope_hooks(on_end=lambda: None)
        services.add_hosted_service(ReportWorker, placement="process")
        copy = dill.loads(dill.dumps(services))
        provider = copy.build_provider()
        assert provider.get(str) == "clock:Clock"
        assert provider.get(int) == 42
        assert provider.get(Settings).name == "shipped"
        assert provider.get(Clock) is provider.get(Clock)  # still a class registration, not an instance
        assert provider.get(Clock) is not ServiceCollection().add_singleton(Clock).build_provider().get(Clock)
        with provider.create_scope() as scope:
            scope.get(ReportService)
        assert CLOSED == ["ReportRepository", "DbSession#1"]
        assert [r.service for r in copy.hosted] == [ReportWorker]

    def test_registrations_for_a_service_are_what_its_child_rebuilds(self) -> None:
        """``registrations_for(key)`` holds the key, its dependencies and the scope hooks, and survives dill."""
        ended: list[int] = []
        services = scoped_graph().add_singleton(Clock).add_singleton(Cache).add_transient(Formatter)
        services.add_scope_hooks(on_end=lambda: ended.append(1))
        provider = services.build_provider()
        subset = provider.registrations_for(Cache)
        assert {d.key for d in subset} == {Cache, Clock}
        child = dill.loads(dill.dumps(subset)).build_provider()
        assert isinstance(child.get(Cache).clock, Clock)
        assert {d.key for d in provider.registrations_for(ReportService)} == {
            ReportService,
            ReportRepository,
            DbSession,
        }
        with dill.loads(dill.dumps(provider.registrations_for(ReportService))).build_provider().create_scope() as s:
            s.get(ReportService)
        assert CLOSED == ["ReportRepository", "DbSession#1"]

    def test_singletons_are_per_provider(self) -> None:
        """Each provider built from the (pickled) registrations has its own singletons, as each process does."""
        services = ServiceCollection().add_singleton(Clock)
        here = services.build_provider()
        there = dill.loads(dill.dumps(services)).build_provider()
        assert here.get(Clock) is not there.get(Clock)

    def test_repr_counts(self) -> None:
        """Collections, providers and scopes say what they hold."""
        assert repr(scoped_graph()) == "<ServiceCollection singleton=0 scoped=3 transient=0>"
        services = scoped_graph(HostServiceCollection()).add_singleton(Clock)
        assert repr(services) == "<HostServiceCollection singleton=1 scoped=3 transient=0 hosted=0>"
        provider = services.build_provider()
        provider.get(Clock)
        assert repr(provider) == "<ServiceProvider open registrations=4 singletons=1 to_close=1>"
        with provider.create_scope() as scope:
            scope.get(ReportRepository)
            assert repr(scope) == "<Scope open instances=2 to_close=2>"
        assert repr(scope) == "<Scope closed instances=0 to_close=0>"


class TestGenericContainer:
    """The container knows nothing about hosting; the host's collection adds hosted services."""

    def test_container_imports_no_hosting_module(self) -> None:
        """Importing the container loads neither the hosted-service registrations nor the services."""
        code = (
            "import sys, hostkit._di; "
            "print(sorted(m for m in ('hostkit._registration', 'hostkit._services', 'hostkit._hosting') "
            "if m in sys.modules))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
        assert out.stdout.strip() == "[]"

    def test_plain_collection_points_to_the_host_collection_for_hosted_services(self) -> None:
        """A ServiceCollection() has no add_hosted_service; the error names where it went."""
        with pytest.raises(AttributeError, match=r"HostBuilder\(\)\.services \(a hostkit\.HostServiceCollection\)"):
            ServiceCollection().add_hosted_service(ReportWorker)  # type: ignore[attr-defined]
        with pytest.raises(AttributeError, match="has no attribute 'add_singletn'"):
            ServiceCollection().add_singletn(Clock)  # type: ignore[attr-defined]

    def test_builder_services_register_hosted_services(self) -> None:
        """builder.services is a HostServiceCollection; the builder shortcut has its signature, returns the builder."""
        builder = HostBuilder()
        assert isinstance(builder.services, HostServiceCollection)
        assert builder.add_hosted_service(ReportWorker, name="w") is builder
        assert [r.name for r in builder.services.hosted] == ["w"]
        shortcut = inspect.signature(HostBuilder.add_hosted_service)
        method = inspect.signature(HostServiceCollection.add_hosted_service)
        assert list(shortcut.parameters) == list(method.parameters)
        with pytest.raises(TypeError, match="plcement"):
            builder.add_hosted_service(ReportWorker, plcement="process")  # type: ignore[call-arg]

    def test_copy_only_keeps_the_named_registrations_and_the_scope_hooks(self) -> None:
        """copy(only=keys) is a plain collection with those registrations (no hosted services) and every hook."""
        services = scoped_graph(HostServiceCollection()).add_singleton(Clock)
        services.add_scope_hooks(on_end=lambda: None)
        services.add_hosted_service(ReportWorker)
        subset = services.copy(only=[Clock, DbSession, Formatter])
        assert type(subset) is ServiceCollection
        assert {d.key for d in subset} == {Clock, DbSession}
        assert len(subset.scope_hooks) == 1
        full = services.copy()
        assert type(full) is HostServiceCollection
        assert [r.service for r in full.hosted] == [ReportWorker]

    def test_remove_drops_a_registration(self) -> None:
        """remove(key) returns the registration it dropped, or None."""
        services = ServiceCollection().add_singleton(Clock)
        removed = services.remove(Clock)
        assert removed is not None and removed.key is Clock
        assert Clock not in services
        assert services.remove(Clock) is None

    def test_registration_says_whether_it_is_a_background_service(self) -> None:
        """A registration says what it is, rather than the host reading it from placement."""

        class Warm(HostedService):
            def start(self, token: CancellationToken) -> None:
                pass

            def stop(self, token: CancellationToken) -> None:
                pass

        services = HostServiceCollection()
        hosted = services.add_hosted_service(Warm)
        background = services.add_hosted_service(ReportWorker)
        assert (hosted.kind, hosted.is_background) == ("hosted", False)
        assert (background.kind, background.is_background) == ("background", True)
