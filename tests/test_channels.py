"""Channel full-modes, close and drain; QueuedWorkService with threads and processes."""

from __future__ import annotations

import threading

import pytest

from hostkit import HostBuilder
from hostkit.channels import Channel, QueuedWorkService
from hostkit.exceptions import ChannelClosedError, ChannelFullError, ConfigurationError
from tests.conftest import wait_until


def _square(item: int) -> int:
    return item * item


class TestFullModes:
    def test_wait_mode_blocks_until_room(self) -> None:
        """In 'wait' mode a put on a full channel returns once a consumer takes an item."""
        ch: Channel[int] = Channel(1, full_mode="wait")
        ch.put(1)
        done = threading.Event()

        def producer() -> None:
            ch.put(2)
            done.set()

        t = threading.Thread(target=producer)
        t.start()
        assert not done.wait(0.2)
        assert ch.get() == 1
        assert done.wait(10)
        t.join()
        assert ch.get() == 2

    def test_wait_mode_times_out_with_full_error(self) -> None:
        """A 'wait' put that finds no room within its timeout raises ChannelFullError and counts a refusal."""
        ch: Channel[int] = Channel(1, full_mode="wait", name="jobs")
        ch.put(1)
        with pytest.raises(ChannelFullError, match=r"channel 'jobs' is full \(1 items\) and stayed full for 0.05 s"):
            ch.put(2, timeout=0.05)
        assert ch.stats().refused == 1
        assert ch.stats().accepted == 1

    def test_drop_oldest_keeps_newest(self, logs) -> None:
        """'drop_oldest' accepts the new item, discards the oldest, counts and logs it."""
        ch: Channel[int] = Channel(2, full_mode="drop_oldest", name="events")
        for i in range(5):
            assert ch.put(i, timeout=0) is True
        assert [ch.get(0), ch.get(0)] == [3, 4]
        assert ch.stats().dropped == 3
        assert logs.find("Channel 'events' is full (2 items) and dropped its oldest item", level="WARNING")

    def test_drop_newest_refuses(self) -> None:
        """'drop_newest' refuses the new item: put returns False and the item is counted as refused."""
        ch: Channel[int] = Channel(1, full_mode="drop_newest")
        assert ch.put(1) is True
        assert ch.put(2) is False
        assert ch.get(0) == 1
        assert ch.stats().refused == 1

    def test_raise_mode(self) -> None:
        """'raise' mode raises ChannelFullError at once (it is also a queue.Full)."""
        import queue

        ch: Channel[int] = Channel(1, full_mode="raise", name="q")
        ch.put(1)
        with pytest.raises(queue.Full, match="channel 'q' is full"):
            ch.put(2)

    def test_bad_arguments(self) -> None:
        """Wrong capacity or full_mode is refused at construction, naming the value."""
        with pytest.raises(ConfigurationError, match=r"capacity must be an int >= 1, not: 0 \(int\)"):
            Channel(0)
        with pytest.raises(ConfigurationError, match=r"full_mode must be one of 'wait', .*not: 'block'"):
            Channel(1, full_mode="block")  # type: ignore[arg-type]


class TestClose:
    def test_close_refuses_puts_and_drains_gets(self) -> None:
        """After close(), put raises ChannelClosedError; get still hands out what is left, then raises."""
        ch: Channel[str] = Channel(4, name="c")
        ch.put("a")
        ch.close()
        with pytest.raises(ChannelClosedError, match="channel 'c' is closed; it accepts no more items"):
            ch.put("b")
        assert ch.get(0) == "a"
        with pytest.raises(ChannelClosedError, match="closed and empty"):
            ch.get(0)
        assert list(ch) == []

    def test_close_wakes_waiting_consumer(self) -> None:
        """A consumer blocked in get() wakes with ChannelClosedError when the channel closes."""
        ch: Channel[int] = Channel(1)
        got: list[BaseException] = []
        started = threading.Event()

        def consumer() -> None:
            started.set()
            try:
                ch.get()
            except ChannelClosedError as exc:
                got.append(exc)

        t = threading.Thread(target=consumer)
        t.start()
        started.wait()
        ch.close()
        t.join(10)
        assert len(got) == 1

    def test_get_timeout(self) -> None:
        """get() on an empty open channel raises TimeoutError after its timeout."""
        ch: Channel[int] = Channel(1, name="e")
        with pytest.raises(TimeoutError, match=r"no item on channel 'e' within 0\.05 s"):
            ch.get(0.05)


class TestQueuedWorkService:
    def test_consumes_with_n_threads(self) -> None:
        """Items put by producers are handled by N consumer threads, named after the channel."""
        ch: Channel[int] = Channel(100, name="work")
        seen: list[tuple[int, str]] = []
        lock = threading.Lock()

        def handle(item: int) -> None:
            with lock:
                seen.append((item, threading.current_thread().name))

        service = QueuedWorkService(ch, handle, concurrency=3)
        host = HostBuilder().add_hosted_service(service).build()
        with host:
            for i in range(30):
                ch.put(i, timeout=0)
            assert wait_until(lambda: len(seen) == 30, timeout=20)
        assert sorted(i for i, _ in seen) == list(range(30))
        assert {n for _, n in seen} <= {f"hostkit-work-consumer-{k}" for k in (1, 2, 3)}
        assert service.stats()["done"] == 30

    def test_graceful_stop_drains_accepted_items(self, logs) -> None:
        """At stop, every item accepted before the stop is still handled (drained), none lost."""
        ch: Channel[int] = Channel(50, name="drain")
        gate = threading.Event()
        done: list[int] = []

        def handle(item: int) -> None:
            gate.wait(10)
            done.append(item)

        service = QueuedWorkService(ch, handle, concurrency=1, drain_timeout=20)
        host = HostBuilder().add_hosted_service(service).build()
        host.start()
        for i in range(10):
            ch.put(i)
        stopper = threading.Thread(target=host.stop)
        stopper.start()
        assert wait_until(lambda: ch.closed, timeout=10)
        with pytest.raises(ChannelClosedError):
            ch.put(99, timeout=0)
        gate.set()
        stopper.join(30)
        assert done == list(range(10))
        stats = service.stats()
        assert stats["done"] == 10 and stats["dropped"] == 0 and stats["refused"] == 1
        assert logs.find("Channel 'drain' stopped: accepted=10, done=10, failed=0, dropped=0, refused=1")

    def test_items_left_after_drain_timeout_are_counted_and_logged(self, logs) -> None:
        """Items that cannot be finished within drain_timeout are counted as dropped and logged."""
        ch: Channel[int] = Channel(50, name="slow")
        release = threading.Event()
        started = threading.Event()

        def handle(item: int) -> None:
            started.set()
            release.wait(10)

        service = QueuedWorkService(ch, handle, concurrency=1, drain_timeout=0.3)
        host = HostBuilder().add_hosted_service(service).build()
        host.start()
        for i in range(5):
            ch.put(i)
        assert started.wait(10)

        def unblock_later() -> None:
            # Let the drain deadline pass first, then release the handler so the thread ends.
            wait_until(lambda: service.stats()["dropped"] > 0, timeout=10)
            release.set()

        helper = threading.Thread(target=unblock_later)
        helper.start()
        host.stop()
        helper.join(10)
        stats = service.stats()
        assert stats["dropped"] == 4
        assert stats["done"] + stats["dropped"] == 5
        assert logs.find("4 accepted item(s) not processed within drain_timeout (0.3 s) were dropped", "WARNING")

    def test_failing_handler_is_logged_and_counted(self, logs) -> None:
        """A handler that raises is logged with its traceback; the consumer goes on."""
        ch: Channel[int] = Channel(10, name="f")
        ok: list[int] = []

        def handle(item: int) -> None:
            if item == 1:
                raise ValueError("bad item 1")
            ok.append(item)

        service = QueuedWorkService(ch, handle)
        with HostBuilder().add_hosted_service(service).build():
            for i in range(3):
                ch.put(i)
            assert wait_until(lambda: service.stats()["done"] + service.stats()["failed"] == 3, timeout=10)
        assert ok == [0, 2]
        rec = logs.find("Handling an item from channel 'f' failed", "ERROR")
        assert rec and "bad item 1" in str(rec[0]["exception"])

    @pytest.mark.timeout(90)
    def test_process_workers(self) -> None:
        """placement='process' runs each item's handler in a child process and counts them done."""
        ch: Channel[int] = Channel(10, name="cpu")
        service = QueuedWorkService(ch, _square, concurrency=2, placement="process")
        with HostBuilder().add_hosted_service(service).build():
            for i in range(6):
                ch.put(i)
            assert wait_until(lambda: service.stats()["done"] == 6, timeout=60)

    def test_bad_arguments(self) -> None:
        """Wrong concurrency/placement are refused with the value in the message."""
        ch: Channel[int] = Channel(1)
        with pytest.raises(ConfigurationError, match=r"concurrency must be an int >= 1, not: 0"):
            QueuedWorkService(ch, print, concurrency=0)
        with pytest.raises(ConfigurationError, match=r"placement must be 'thread' or 'process', not: 'fiber'"):
            QueuedWorkService(ch, print, placement="fiber")  # type: ignore[arg-type]
