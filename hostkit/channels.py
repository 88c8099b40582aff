"""A bounded, thread-safe in-process channel, and a background service that consumes one.

A request handler hands work to a background service through a :class:`Channel`
without blocking: ``channel.put(item, timeout=0)`` either accepts the item or
says at once what happened to it (dropped, refused). :class:`QueuedWorkService`
consumes the channel with N consumer threads, or hands each item to N worker
processes. At a graceful stop the channel is closed (no new items), what was
accepted is drained, and whatever cannot be finished within ``drain_timeout`` is
counted as dropped and logged: an accepted item is never lost silently.

Every count (accepted, dropped, refused, taken, done, failed) is in
:meth:`Channel.stats` and :meth:`QueuedWorkService.stats`.
"""

from __future__ import annotations

import collections
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, Generic, Literal, TypeVar

from loguru import logger

from ._services import BackgroundService
from ._token import CancellationToken
from ._validate import describe, positive_int, to_seconds
from .exceptions import ChannelClosedError, ChannelFullError, ConfigurationError

__all__ = ["Channel", "ChannelStats", "FullMode", "QueuedWorkService"]

T = TypeVar("T")
V = TypeVar("V")

#: What :meth:`Channel.put` does when the channel is full.
FullMode = Literal["wait", "drop_oldest", "drop_newest", "raise"]
_FULL_MODES: tuple[FullMode, ...] = ("wait", "drop_oldest", "drop_newest", "raise")


@dataclass(frozen=True)
class ChannelStats:
    """Counts of a channel since it was made.

    Attributes:
        capacity: the most items it holds.
        size: items waiting now.
        accepted: items ``put`` accepted.
        dropped: accepted items later discarded (``drop_oldest``, or not drained at stop).
        refused: items ``put`` did not accept (``drop_newest``, ``raise``, a ``wait`` timeout, closed).
        taken: items ``get`` handed out.
        closed: whether :meth:`Channel.close` was called.

    .. versionadded:: 0.1
    """

    capacity: int
    size: int
    accepted: int
    dropped: int
    refused: int
    taken: int
    closed: bool

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


class Channel(Generic[T]):
    """A bounded FIFO of items between threads.

    Args:
        capacity: the most items it holds (>= 1).
        full_mode: what :meth:`put` does when it is full: ``"wait"`` for room (up
            to ``timeout``, then raise :class:`~hostkit.exceptions.ChannelFullError`),
            ``"drop_oldest"`` (accept, discard the oldest waiting item),
            ``"drop_newest"`` (refuse this item: ``put`` returns ``False``), or
            ``"raise"`` (:class:`~hostkit.exceptions.ChannelFullError` at once).
        name: for logs and ``repr``.

    Every discarded or refused item is counted (:meth:`stats`) and logged at
    WARNING, at most once per second per channel, with the running totals.

    .. versionadded:: 0.1
    """

    def __init__(self, capacity: int, *, full_mode: FullMode = "wait", name: str = "channel") -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            msg = f"capacity must be an int >= 1, not: {describe(capacity)}"
            raise ConfigurationError(msg)
        if full_mode not in _FULL_MODES:
            msg = f"full_mode must be one of {', '.join(map(repr, _FULL_MODES))}, not: {describe(full_mode)}"
            raise ConfigurationError(msg)
        self.capacity = capacity
        self.full_mode: FullMode = full_mode
        self.name = name
        self._items: collections.deque[T] = collections.deque()
        # One lock, two conditions over it: producers wait for room, consumers for items.
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._not_empty = threading.Condition(self._lock)
        self._closed = False
        self._accepted = 0
        self._dropped = 0
        self._refused = 0
        self._taken = 0
        self._last_warning = 0.0
        self._log = logger.bind(service=name)

    # -- producer side ---------------------------------------------------------------

    def put(self, item: T, timeout: float | timedelta | None = None) -> bool:
        """Offer ``item``. Returns ``True`` if accepted, ``False`` if refused (``drop_newest``).

        ``timeout`` applies to ``full_mode="wait"`` only (``None`` waits as long as it
        takes; ``0`` never blocks, which is what a request handler wants).

        Raises:
            ChannelFullError: full, with ``full_mode="raise"``, or ``"wait"`` timed out.
            ChannelClosedError: the channel was closed.
        """
        wait_for = None if timeout is None else to_seconds(timeout, "timeout")
        with self._lock:
            self._check_open_for_put()
            if len(self._items) >= self.capacity:
                if self.full_mode == "wait":
                    deadline = None if wait_for is None else time.monotonic() + wait_for
                    while len(self._items) >= self.capacity and not self._closed:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            self._refused += 1
                            msg = (
                                f"channel {self.name!r} is full ({self.capacity} items) and stayed full for "
                                f"{wait_for} s; consume faster, raise capacity, or pick another full_mode"
                            )
                            raise ChannelFullError(msg)
                        self._not_full.wait(left)
                    self._check_open_for_put()
                elif self.full_mode == "drop_oldest":
                    self._items.popleft()
                    self._dropped += 1
                    self._warn_locked("dropped its oldest item")
                elif self.full_mode == "drop_newest":
                    self._refused += 1
                    self._warn_locked("refused a new item")
                    return False
                else:
                    self._refused += 1
                    msg = f"channel {self.name!r} is full ({self.capacity} items; full_mode='raise')"
                    raise ChannelFullError(msg)
            self._items.append(item)
            self._accepted += 1
            self._not_empty.notify()
            return True

    def _check_open_for_put(self) -> None:
        if self._closed:
            self._refused += 1
            msg = f"channel {self.name!r} is closed; it accepts no more items (the service consuming it is stopping)"
            raise ChannelClosedError(msg)

    def _warn_locked(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            self._log.warning(
                "Channel {!r} is full ({} items) and {} (full_mode={!r}); totals: dropped={}, refused={}",
                self.name,
                self.capacity,
                what,
                self.full_mode,
                self._dropped,
                self._refused,
            )

    # -- consumer side ---------------------------------------------------------------

    def get(self, timeout: float | timedelta | None = None, *, token: threading.Event | None = None) -> T:
        """Take the oldest item, waiting up to ``timeout`` (``None``: until one comes).

        A closed channel still hands out what it holds; once it is closed *and*
        empty, ``get`` raises :class:`~hostkit.exceptions.ChannelClosedError`.

        Args:
            timeout: seconds to wait for an item.
            token: also stop waiting when this event is set (``TimeoutError`` then).

        Raises:
            TimeoutError: no item within ``timeout``, or ``token`` was set.
            ChannelClosedError: closed and empty.
        """
        wait_for = None if timeout is None else to_seconds(timeout, "timeout")
        deadline = None if wait_for is None else time.monotonic() + wait_for
        registration = token.register(self._wake_all) if isinstance(token, CancellationToken) else None
        try:
            with self._lock:
                while not self._items:
                    if self._closed:
                        msg = f"channel {self.name!r} is closed and empty"
                        raise ChannelClosedError(msg)
                    if token is not None and token.is_set():
                        msg = f"stopped waiting on channel {self.name!r}: the token was set"
                        raise TimeoutError(msg)
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        msg = f"no item on channel {self.name!r} within {wait_for} s"
                        raise TimeoutError(msg)
                    # A plain Event cannot wake us: poll it at 0.1 s when no CancellationToken was given.
                    if token is not None and registration is None:
                        left = 0.1 if left is None else min(left, 0.1)
                    self._not_empty.wait(left)
                item = self._items.popleft()
                self._taken += 1
                self._not_full.notify()
                return item
        finally:
            if registration is not None:
                registration.unregister()

    def _wake_all(self) -> None:
        with self._lock:
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def __iter__(self) -> Iterator[T]:
        """Yield items until the channel is closed and empty."""
        while True:
            try:
                yield self.get()
            except ChannelClosedError:
                return

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Accept no more items; consumers still get what is waiting. Idempotent."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def discard(self) -> int:
        """Drop every waiting item, counting them as dropped; return how many."""
        with self._lock:
            n = len(self._items)
            self._items.clear()
            self._dropped += n
            self._not_full.notify_all()
            return n

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def stats(self) -> ChannelStats:
        """The channel's counts now."""
        with self._lock:
            return ChannelStats(
                capacity=self.capacity,
                size=len(self._items),
                accepted=self._accepted,
                dropped=self._dropped,
                refused=self._refused,
                taken=self._taken,
                closed=self._closed,
            )

    def __repr__(self) -> str:
        s = self.stats()
        state = "closed" if s.closed else "open"
        return (
            f"<Channel {self.name!r} {state} {s.size}/{s.capacity} full_mode={self.full_mode!r} "
            f"accepted={s.accepted} dropped={s.dropped} refused={s.refused}>"
        )


def _call(handler: Callable[[Any], object], item: Any) -> None:
    handler(item)


def _renamed(old: str, old_value: V | None, new: str, new_value: V | None, default: V) -> V:
    """The value of an option given by its new name or its deprecated one (warning), or ``default``."""
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        msg = f"{old}= is the deprecated spelling of {new}=: give {new}= only"
        raise ConfigurationError(msg)
    warnings.warn(
        f"QueuedWorkService({old}=) is deprecated and will be removed in the next release: use {new}=",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value


class QueuedWorkService(BackgroundService, Generic[T]):
    """Consumes a :class:`Channel`: each item goes to ``handler(item)``.

    Register it like any background service (``placement="thread"``): its consumers
    run in the host's process, because the channel is in-process.

    Args:
        channel: the channel to consume.
        handler: called with each item. Defaults to :meth:`process` (override it).
        concurrency: how many items are worked on at once (>= 1), as for
            :class:`~hostkit.queues.QueueConsumer`.
        placement: where the handler runs, as for a service's registration:
            ``"thread"``: ``concurrency`` threads call it; ``"process"``:
            ``concurrency`` threads hand each item to a pool of as many child
            processes (for CPU-heavy handlers; handler and items must pickle with dill).
        drain_timeout: at stop, how long to keep working through the items already
            accepted; what is left then is counted as dropped and logged.
        start_method: the process pool's start method (``placement="process"``).
        consumers: deprecated spelling of ``concurrency``.
        workers: deprecated spelling of ``placement``.

    A handler that raises is logged with its traceback and counted as failed; the
    consumers go on with the next item.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``concurrency=`` and ``placement=`` replace ``consumers=`` and ``workers=``,
       which stay deprecated aliases for one release.
    """

    def __init__(
        self,
        channel: Channel[T],
        handler: Callable[[T], object] | None = None,
        *,
        concurrency: int | None = None,
        placement: Literal["thread", "process"] | None = None,
        drain_timeout: float | timedelta = 5.0,
        start_method: str = "forkserver",
        consumers: int | None = None,
        workers: Literal["thread", "process"] | None = None,
    ) -> None:
        if not isinstance(channel, Channel):  # type: ignore[redundant-expr,unused-ignore]
            msg = f"channel must be a hostkit.channels.Channel, not: {describe(channel)}"  # type: ignore[unreachable]
            raise ConfigurationError(msg)
        concurrency = _renamed("consumers", consumers, "concurrency", concurrency, 1)
        placement = _renamed("workers", workers, "placement", placement, "thread")
        positive_int(concurrency, "concurrency")
        if placement not in ("thread", "process"):
            msg = f"placement must be 'thread' or 'process', not: {describe(placement)}"
            raise ConfigurationError(msg)
        if handler is not None and not callable(handler):
            msg = f"handler must be callable, not: {describe(handler)}"  # type: ignore[unreachable]
            raise ConfigurationError(msg)
        self.channel = channel
        self._handler = handler
        self.concurrency = concurrency
        self.placement = placement
        self.drain_timeout = to_seconds(drain_timeout, "drain_timeout")
        self.start_method = start_method
        self._count_lock = threading.Lock()
        self._done = 0
        self._failed = 0

    @property
    def consumers(self) -> int:
        """Deprecated: :attr:`concurrency`."""
        warnings.warn("QueuedWorkService.consumers is deprecated: use .concurrency", DeprecationWarning, stacklevel=2)
        return self.concurrency

    @property
    def workers(self) -> str:
        """Deprecated: :attr:`placement`."""
        warnings.warn("QueuedWorkService.workers is deprecated: use .placement", DeprecationWarning, stacklevel=2)
        return self.placement

    def process(self, item: T) -> None:
        """Work on one item; override it, or pass ``handler=``."""
        msg = f"{type(self).__qualname__} has no handler: pass handler= or override process(item)"
        raise NotImplementedError(msg)

    def stats(self) -> dict[str, Any]:
        """The channel's counts plus ``done`` and ``failed``."""
        data = self.channel.stats().to_dict()
        with self._count_lock:
            data.update(done=self._done, failed=self._failed)
        return data

    def execute(self, stopping: CancellationToken) -> None:
        name = self.channel.name
        log = logger.bind(service=name)
        handler: Callable[[T], object] = self._handler if self._handler is not None else self.process
        pool: Any = None
        if self.placement == "process":
            import multiprocess

            pool = multiprocess.get_context(self.start_method).Pool(self.concurrency)
        # Set when the drain deadline passes: consumers stop taking items.
        give_up = threading.Event()

        def consume() -> None:
            while not give_up.is_set():
                try:
                    # Until the stop, wait with the token so a stop wakes us; after it, drain
                    # what was accepted: the channel is closed, so get() ends when it is empty.
                    item = self.channel.get(token=None if stopping.is_set() else stopping)
                except TimeoutError:
                    continue
                except ChannelClosedError:
                    return
                try:
                    if pool is not None:
                        pending = pool.apply_async(_call, (handler, item))
                        # Poll, not get(): after pool.terminate() a pending result never completes,
                        # and this thread must still notice the drain deadline and end.
                        while not pending.ready():
                            if give_up.is_set():
                                return
                            pending.wait(0.1)
                        pending.get()
                    else:
                        handler(item)
                except Exception:
                    with self._count_lock:
                        self._failed += 1
                    log.opt(exception=True).error("Handling an item from channel {!r} failed", name)
                else:
                    with self._count_lock:
                        self._done += 1

        threads = [
            threading.Thread(target=consume, name=f"hostkit-{name}-consumer-{n + 1}", daemon=True)
            for n in range(self.concurrency)
        ]
        try:
            for t in threads:
                t.start()
            stopping.wait()
            self.channel.close()
            waiting = len(self.channel)
            if waiting:
                log.info(
                    "Channel {!r}: draining {} accepted item(s) (drain_timeout {} s)", name, waiting, self.drain_timeout
                )
            deadline = time.monotonic() + self.drain_timeout
            for t in threads:
                t.join(max(deadline - time.monotonic(), 0.0))
            give_up.set()
            lost = self.channel.discard()
            busy = [t.name for t in threads if t.is_alive()]
            if lost or busy:
                log.warning(
                    "Channel {!r}: {} accepted item(s) not processed within drain_timeout ({} s) were dropped; "
                    "{} consumer(s) still busy: {}",
                    name,
                    lost,
                    self.drain_timeout,
                    len(busy),
                    ", ".join(busy) or "none",
                )
            stats = self.stats()
            log.info(
                "Channel {!r} stopped: accepted={}, done={}, failed={}, dropped={}, refused={}",
                name,
                stats["accepted"],
                stats["done"],
                stats["failed"],
                stats["dropped"],
                stats["refused"],
            )
        finally:
            give_up.set()
            self.channel.close()
            if pool is not None:
                pool.terminate()
                pool.join()
            for t in threads:
                # A consumer stuck in a handler past the drain deadline is abandoned (daemon);
                # the host reports the service as timed out if this exceeds its budget.
                t.join(0.5)

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<QueuedWorkService {self.channel.name!r} concurrency={self.concurrency} placement={self.placement!r} "
            f"done={s['done']} failed={s['failed']} waiting={s['size']}>"
        )
