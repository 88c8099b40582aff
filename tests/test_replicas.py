"""replicas=N: N supervised services from one registration, in children or threads.

Services are module-level so forkserver children can import them. A child tells
the test what it is through files in a folder the test owns: its replica index,
its count and its pid.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from hostkit import (
    BackgroundService,
    CancellationToken,
    HostBuilder,
    HostedService,
    HostOptions,
    OncePerDeployment,
    Replica,
    RestartPolicy,
    ServiceState,
)
from hostkit.exceptions import ConfigurationError, ServicePicklingError
from tests.conftest import fetch_json, wait_until

pytestmark = pytest.mark.timeout(90)


@dataclass(frozen=True)
class Folder:
    """Where the children write what they are."""

    path: str


class Reports(BackgroundService):
    """Writes ``started-<index>-<count>-<pid>`` when it runs, then waits for the stop."""

    def __init__(self, folder: Folder) -> None:
        self.folder = folder

    def execute(self, stopping: CancellationToken) -> None:
        replica = self.replica
        assert replica is not None
        (Path(self.folder.path) / f"started-{replica.index}-{replica.count}-{os.getpid()}").touch()
        stopping.wait()


class StopsTogether(BackgroundService):
    """On its stop request, waits until every replica has had its own before it ends.

    If the host asked one replica only after another had ended, the first would wait
    here until the host's budget ran out and it was killed.
    """

    def __init__(self, folder: Folder) -> None:
        self.folder = folder

    def execute(self, stopping: CancellationToken) -> None:
        replica = self.replica
        assert replica is not None
        folder = Path(self.folder.path)
        (folder / f"started-{replica.index}-{replica.count}-{os.getpid()}").touch()
        stopping.wait()
        (folder / f"stopping-{replica.index}").touch()
        deadline = time.monotonic() + 60
        while len(list(folder.glob("stopping-*"))) < replica.count and time.monotonic() < deadline:
            time.sleep(0.01)
        (folder / f"ended-{replica.index}-saw-{len(list(folder.glob('stopping-*')))}").touch()


class Stubborn(BackgroundService):
    """Ignores its stop request: only the host's escalation ends it."""

    def __init__(self, folder: Folder) -> None:
        self.folder = folder

    def execute(self, stopping: CancellationToken) -> None:
        replica = self.replica
        assert replica is not None
        (Path(self.folder.path) / f"started-{replica.index}-{replica.count}-{os.getpid()}").touch()
        while True:
            time.sleep(0.05)


class Idle(BackgroundService):
    def execute(self, stopping: CancellationToken) -> None:
        stopping.wait()


class Start(HostedService):
    pass


def started(folder: Path) -> dict[int, list[int]]:
    """Replica index -> the pids that ran it, from the ``started-*`` files; each must name the same count."""
    seen: dict[int, list[int]] = {}
    for f in folder.glob("started-*"):
        _, index, _count, pid = f.name.split("-")
        seen.setdefault(int(index), []).append(int(pid))
    return seen


def counts(folder: Path) -> set[int]:
    return {int(f.name.split("-")[2]) for f in folder.glob("started-*")}


def running(host, names: list[str]) -> bool:  # type: ignore[no-untyped-def]
    status = host.status()
    return all(status[n].state is ServiceState.RUNNING and status[n].pid not in (None, os.getpid()) for n in names)


def builder_for(tmp_path: Path, **options: object) -> HostBuilder:
    builder = HostBuilder(options=HostOptions(**options))  # type: ignore[arg-type]
    # per_process: each child builds its own (a frozen path), as this test means it to.
    builder.services.add_singleton(Folder, instance=Folder(str(tmp_path)), per_process=True)
    return builder


NAMES = [f"Reports[{i}]" for i in range(4)]


class TestProcessReplicas:
    @pytest.mark.parametrize("registered_as", ["class", "instance"])
    def test_each_replica_is_a_child_of_its_own_with_its_index(self, tmp_path: Path, registered_as: str) -> None:
        """replicas=4: four children, distinct pids, indexes 0-3, one status entry each, all stopped at the end."""
        builder = builder_for(tmp_path, shutdown_timeout=20)
        service = Reports if registered_as == "class" else Reports(Folder(str(tmp_path)))
        builder.services.add_hosted_service(service, placement="process", replicas=4)
        host = builder.build()
        with host:
            assert wait_until(lambda: running(host, NAMES) and len(started(tmp_path)) == 4, timeout=60)
            status = host.status()
            assert [s.name for s in status.services] == NAMES
            pids = started(tmp_path)
            assert sorted(pids) == [0, 1, 2, 3]
            assert counts(tmp_path) == {4}
            for i, name in enumerate(NAMES):
                # The child that reported index i is the one the status entry i names.
                assert pids[i] == [status[name].pid]
                assert status[name].replica == Replica(i, 4)
                assert status[name].placement == "process"
            assert len({status[n].pid for n in NAMES}) == 4
        assert [s.state for s in host.status().services] == [ServiceState.STOPPED] * 4

    def test_a_crashed_replica_restarts_alone(self, tmp_path: Path) -> None:
        """SIGKILL of one replica's child: it is restarted under the policy, the others keep their child."""
        builder = builder_for(tmp_path, shutdown_timeout=20)
        policy = RestartPolicy(max_restarts=3, backoff=0.05, jitter=0)
        builder.services.add_hosted_service(Reports, placement="process", replicas=3, restart=policy)
        names = NAMES[:3]
        host = builder.build()
        with host:
            assert wait_until(lambda: running(host, names) and len(started(tmp_path)) == 3, timeout=60)
            before = {n: host.status()[n].pid for n in names}
            os.kill(before["Reports[1]"], signal.SIGKILL)

            def restarted() -> bool:
                s = host.status()["Reports[1]"]
                return (
                    s.restarts == 1
                    and s.state is ServiceState.RUNNING
                    and s.pid not in (None, before["Reports[1]"])
                    and len(started(tmp_path).get(1, [])) == 2
                )

            assert wait_until(restarted, timeout=60)
            status = host.status()
            assert "SIGKILL" in (status["Reports[1]"].error or "")
            for name in ("Reports[0]", "Reports[2]"):
                assert status[name].pid == before[name]
                assert status[name].restarts == 0
                assert status[name].state is ServiceState.RUNNING
                assert psutil.pid_exists(before[name])
            runs = started(tmp_path)
            assert runs[0] == [before["Reports[0]"]] and runs[2] == [before["Reports[2]"]]
            assert sorted(runs[1]) == sorted([before["Reports[1]"], status["Reports[1]"].pid])
            assert counts(tmp_path) == {3}

    def test_replicas_are_asked_to_stop_together(self, tmp_path: Path) -> None:
        """Every replica gets its stop request before any has ended: all stop within the one budget."""
        builder = builder_for(tmp_path, shutdown_timeout=30)
        builder.services.add_hosted_service(StopsTogether, placement="process", replicas=3)
        names = [f"StopsTogether[{i}]" for i in range(3)]
        host = builder.build()
        with host:
            assert wait_until(lambda: running(host, names) and len(started(tmp_path)) == 3, timeout=60)
        # Each replica, as it ended, saw all three stop requests.
        assert sorted(f.name for f in tmp_path.glob("ended-*")) == [f"ended-{i}-saw-3" for i in range(3)]
        assert [s.state for s in host.status().services] == [ServiceState.STOPPED] * 3

    def test_stuck_replicas_share_one_budget(self, tmp_path: Path, logs) -> None:  # type: ignore[no-untyped-def]
        """Three replicas that ignore the stop are each escalated at the one deadline, not one budget each."""
        budget = 3.0
        builder = builder_for(tmp_path, shutdown_timeout=budget)
        builder.services.add_hosted_service(Stubborn, placement="process", replicas=3)
        names = [f"Stubborn[{i}]" for i in range(3)]
        host = builder.build()
        host.start()
        try:
            assert wait_until(lambda: running(host, names) and len(started(tmp_path)) == 3, timeout=60)
        finally:
            began = time.monotonic()
            host.stop()
            elapsed = time.monotonic() - began
        for name in names:
            assert host.status()[name].state is ServiceState.TIMED_OUT
            assert logs.find(f"Background service {name!r} did not stop within the shutdown budget", "ERROR")
        # One budget each would be 9 s; one shared budget, plus a margin for a loaded machine, is 6.
        assert elapsed < 2 * budget

    def test_an_unpicklable_instance_is_refused_at_build(self) -> None:
        """Each replica of an instance is a copy made as its child gets it: a lock in it fails build()."""

        class HoldsLock(BackgroundService):
            def __init__(self) -> None:
                self.guard = threading.Lock()

            def execute(self, stopping: CancellationToken) -> None:
                stopping.wait()

        builder = HostBuilder()
        builder.services.add_hosted_service(HoldsLock(), placement="process", replicas=2)
        with pytest.raises(ServicePicklingError, match=r"'HoldsLock\[1\]'.*attribute 'guard'"):
            builder.build()


class Seen:
    """What the thread replicas report: (replica, id of the instance, native thread id)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[Replica | None, int, int]] = []

    def add(self, item: tuple[Replica | None, int, int]) -> None:
        with self.lock:
            self.items.append(item)


class Counts(BackgroundService):
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    def execute(self, stopping: CancellationToken) -> None:
        self.seen.add((self.replica, id(self), threading.get_native_id()))
        stopping.wait()


class TestThreadReplicas:
    def test_each_replica_is_a_thread_and_an_instance_of_its_own(self) -> None:
        """placement='thread', replicas=3: the container builds three instances, each on its own thread."""
        seen = Seen()
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_singleton(Seen, instance=seen)
        builder.services.add_hosted_service(Counts, replicas=3)
        builder.services.add_hosted_service(Counts, name="single")
        host = builder.build()
        with host:
            assert wait_until(lambda: len(seen.items) == 4)
            status = host.status()
            names = [s.name for s in status.services]
            assert names == ["Counts[0]", "Counts[1]", "Counts[2]", "single"]
            services = [r.service for r in host.service_records()]
            assert len({id(s) for s in services}) == 4
            by_replica = {item[0]: item for item in seen.items}
            assert set(by_replica) == {Replica(0, 3), Replica(1, 3), Replica(2, 3), None}
            assert len({item[1] for item in seen.items}) == 4
            assert len({item[2] for item in seen.items}) == 4
            for i in range(3):
                s = status[f"Counts[{i}]"]
                assert s.replica == Replica(i, 3) and s.pid == os.getpid() and s.placement == "thread"
                # The instance that reported replica i is the one the status entry i runs.
                assert by_replica[Replica(i, 3)][1] == id(services[i])
                assert by_replica[Replica(i, 3)][2] == s.thread_id
            assert status["single"].replica is None
        assert all(s.state is ServiceState.STOPPED for s in host.status().services)

    def test_replica_is_none_outside_a_host(self) -> None:
        assert Counts(Seen()).replica is None

    def test_a_service_may_keep_an_attribute_of_that_name(self) -> None:
        """A service that already had its own ``self.replica`` keeps it: hostkit's is only read, never set."""

        class Reader(BackgroundService):
            def __init__(self) -> None:
                self.replica = "db-replica-2"  # type: ignore[assignment]

            def execute(self, stopping: CancellationToken) -> None:
                stopping.wait()

        builder = HostBuilder()
        builder.services.add_hosted_service(Reader, replicas=2)
        host = builder.build()
        assert [r.service.replica for r in host.service_records()] == ["db-replica-2"] * 2
        assert [s.replica for s in host.status().services] == [Replica(0, 2), Replica(1, 2)]


class TestValidation:
    @pytest.mark.parametrize("value", [0, -1, True, 2.5, "3", [2]])
    def test_bad_counts_are_refused(self, value: object) -> None:
        builder = HostBuilder()
        with pytest.raises(ConfigurationError, match=r"replicas must be an int >= 1 .*, not: "):
            builder.services.add_hosted_service(Idle, placement="process", replicas=value)  # type: ignore[arg-type]
        assert builder.services.hosted == []

    def test_a_hosted_service_has_no_replicas(self) -> None:
        with pytest.raises(ConfigurationError, match="replicas= applies to BackgroundService only; Start is a"):
            HostBuilder().services.add_hosted_service(Start, replicas=2)

    def test_a_thread_placed_instance_is_refused(self) -> None:
        with pytest.raises(ConfigurationError, match=r"placement='thread' needs the class, not an instance"):
            HostBuilder().services.add_hosted_service(Idle(), replicas=2)
        # One replica of an instance is that instance: nothing to copy.
        HostBuilder().services.add_hosted_service(Idle(), replicas=1)

    def test_once_per_deployment_is_refused(self) -> None:
        with pytest.raises(ConfigurationError, match=r"replicas=3 with OncePerDeployment.*2 of the 3 replicas"):
            HostBuilder().services.add_hosted_service(OncePerDeployment(Idle()), placement="process", replicas=3)

    def test_names_stay_unique(self) -> None:
        services = HostBuilder().services
        services.add_hosted_service(Idle, replicas=2, name="pool")
        with pytest.raises(ConfigurationError, match=r"'pool\[1\]' is already registered"):
            services.add_hosted_service(Idle, name="pool[1]")
        with pytest.raises(ConfigurationError, match=r"'pool' is already registered"):
            services.add_hosted_service(Idle, name="pool")
        services.add_hosted_service(Idle)
        # The class name is taken (by "Idle"): the replicas are numbered past it.
        services.add_hosted_service(Idle, replicas=2)
        assert [r.name for r in services.hosted] == ["pool", "Idle", "Idle-2"]
        with pytest.raises(ConfigurationError, match=r"'Idle-2\[0\]', 'Idle-2\[1\]' is already registered"):
            services.add_hosted_service(Idle, name="Idle-2", replicas=2)
        host = HostBuilder()
        host.services.add_hosted_service(Idle, replicas=1)
        assert [s.name for s in host.build().status().services] == ["Idle[0]"]


def test_health_and_top_show_each_replica(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The health JSON and `hostkit top` list every replica with its own child; one faulted replica is its own."""
    from hostkit.cli import main as cli_main
    from hostkit.contention import ContentionMonitor, snapshot_path
    from hostkit.health import HealthStatus, use_health

    builder = builder_for(tmp_path, shutdown_timeout=20, on_background_error="ignore")
    builder.services.add_hosted_service(Reports, placement="process", replicas=3)
    checks = use_health(builder, port=0)
    host = builder.build()
    names = NAMES[:3]
    monitor = ContentionMonitor(host, interval=0.05, probe=False, log_every=None, publish=True)
    path = snapshot_path(os.getpid())
    with host, monitor:
        assert wait_until(lambda: running(host, names), timeout=60)
        pids = {n: host.status()[n].pid for n in names}
        port = next(r.service for r in host.service_records() if r.name == "health").listener.port
        body = fetch_json(f"http://127.0.0.1:{port}/health/live")
        assert body is not None and body["status"] == "healthy"
        assert body["checks"]["services"]["data"]["services"] == {
            **dict.fromkeys(names, "running"),
            "health": "running",
        }
        assert body["checks"]["children"]["data"]["children"] == pids

        def published() -> list[dict]:  # type: ignore[type-arg]
            if not Path(path).exists():
                return []
            data = json.loads(Path(path).read_text())
            return [
                s
                for s in data["services"]
                if s["name"] in names and s["pid"] == pids[s["name"]] and s["state"] == "running"
            ]

        assert wait_until(lambda: len(published()) == 3, timeout=20)
        assert cli_main(["top", str(os.getpid()), "--once"]) == 0
        table = capsys.readouterr().out
        for name in names:
            row = next(line for line in table.splitlines() if line.startswith(name))
            assert f" {pids[name]} " in row and "process" in row and "running" in row

        # One replica dies for good (no restart policy; on_background_error="ignore"): it alone is faulted.
        os.kill(pids["Reports[2]"], signal.SIGKILL)
        assert wait_until(lambda: host.status()["Reports[2]"].state is ServiceState.FAULTED, timeout=30)
        report = checks.run("ready")
        assert report.status is HealthStatus.UNHEALTHY
        services = report["services"].result
        assert services.data["services"] == {
            "Reports[0]": "running",
            "Reports[1]": "running",
            "Reports[2]": "faulted",
            "health": "running",
        }
        assert services.description.startswith("Reports[2] is faulted (")
        assert all(host.status()[n].pid == pids[n] for n in names[:2])


def test_queue_consumer_replicas_lease_under_names_of_their_own(tmp_path: Path) -> None:
    """Thread-placed replicas of a queue consumer share a pid and a name; the queue still sees distinct consumers."""
    from hostkit.queues import Message, QueueConsumer, SQLiteQueue

    class Recording(SQLiteQueue):
        def __init__(self, path: Path) -> None:
            super().__init__(path, "jobs")
            self.consumers: set[str] = set()

        def lease(self, consumer: str, **options: object) -> list[Message]:
            self.consumers.add(consumer)
            return super().lease(consumer, **options)  # type: ignore[arg-type]

    class Jobs(QueueConsumer):
        def __init__(self, queue: Recording) -> None:
            super().__init__(queue, lambda m, s: None, poll_interval=0.02, name="jobs")

    queue = Recording(tmp_path / "q.db")
    builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
    builder.services.add_singleton(Recording, instance=queue)
    builder.services.add_hosted_service(Jobs, replicas=2)
    try:
        with builder.build():
            assert wait_until(lambda: len(queue.consumers) >= 2, timeout=20)
    finally:
        queue.close()
    assert {c.rsplit("-", 2)[1] for c in queue.consumers} == {"r0", "r1"}


class ThumbnailRendererForTenantUploads(BackgroundService):
    def execute(self, stopping: CancellationToken) -> None:
        stopping.wait()


def test_top_keeps_the_index_of_a_long_replica_name(capsys: pytest.CaptureFixture[str]) -> None:
    """A name wider than top's column is cut before its `[index]`, so each replica keeps a row of its own."""
    from hostkit.cli import main as cli_main
    from hostkit.contention import ContentionMonitor, snapshot_path

    builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
    builder.services.add_hosted_service(ThumbnailRendererForTenantUploads, replicas=2)
    host = builder.build()
    monitor = ContentionMonitor(host, interval=0.05, probe=False, log_every=None, publish=True)
    with host, monitor:
        assert wait_until(lambda: Path(snapshot_path(os.getpid())).exists())
        assert cli_main(["top", str(os.getpid()), "--once"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ThumbnailRenderer")]
    assert [row.split()[0] for row in rows] == ["ThumbnailRendererForTenan[0]", "ThumbnailRendererForTenan[1]"]
