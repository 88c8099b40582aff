"""The consumer: a background service that leases, handles, and settles messages.

Each of ``concurrency`` threads loops: lease up to ``prefetch`` messages, run the
handler for each inside a fresh DI scope, then settle it: ack on success; on
failure release it with a tenacity back-off delay (the delay is stored in the
queue, so it survives a crash), or dead-letter it once it has failed
``max_attempts`` deliveries. The service's own thread renews the leases of the
messages in hand every third of ``lease_time``, so a slow handler keeps its
message while a dead consumer's messages come back after one ``lease_time``.

Settlements are batched for fast handlers: each outcome (ack, retry, dead letter)
waits with the others of its batch and goes in one ``Queue.settle`` call (one
transaction or one script), at most ``ACK_DELAY`` (50 ms) later; after a handler
slower than ``FAST`` (5 ms) they go at once. Those of a batch's end travel with the
next lease (``Queue.settle_and_lease``: one transaction or round trip for both). A
message is settled only after its handler returned; a crash before the settle
means a re-delivery (at least once), never a loss.

Settling is claimed exactly once per delivery (``_claim``): at a stop, a handler
still running when ``drain_timeout`` (or the host's budget) runs out has its
message released back to the queue, and if the handler finishes later it finds the
claim taken and does not ack. So a message is acked or released, never both.

Leases go through a link to the broker (``_outage.Link``): when the broker cannot
be reached, at start-up or mid-run, one thread retries with a capped back-off and
logs one line per try while the others wait; the consumer reports itself not ready
(``readiness()``, the host's status detail) until a lease succeeds again.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import tenacity
from loguru import logger

from .._backoff import wait_after, wait_or_seconds
from .._di import Scope, ServiceCollection, ServiceProvider
from .._runners._base import runner_for
from .._services import BackgroundService
from .._summary import format_failure, summarize_exception
from .._token import CancellationToken, CancellationTokenSource
from .._validate import describe, to_seconds
from ..exceptions import ConfigurationError
from ..health import HealthCheckResult, HealthChecks
from ._base import Message, Queue, Settlement, check_positive_int
from ._outage import DETAIL_PREFIXES, Link, default_reconnect
from ._settling import ACK_DELAY, FAST, Pending, SettlementBatches

if TYPE_CHECKING:
    from .._host import Host

__all__ = ["Handler", "QueueConsumer"]

#: A message handler: ``handler(message, scope)``; raise to fail the delivery.
Handler = Callable[[Message, Scope], object]


class QueueConsumer(SettlementBatches, BackgroundService):
    """Consumes a durable :class:`~hostkit.queues.Queue`: ``handler(message, scope)`` per message.

    Args:
        queue: the queue to consume.
        handler: called as ``handler(message, scope)`` inside a new DI scope per
            message; raise to fail the delivery. Defaults to :meth:`handle`
            (override it in a subclass).
        provider: the host's :class:`~hostkit.ServiceProvider` (declare it as a
            constructor parameter of a subclass to have it injected); scoped
            services resolved from ``scope`` are closed after each message.
            Without one, the scope is empty.
        concurrency: consumer threads in this process (>= 1). For more CPU, run
            more worker processes (replicas) on the same queue.
        prefetch: messages leased per round trip by each thread (>= 1). Higher is
            faster for short handlers; all are leased (and renewed) together.
        max_attempts: deliveries a message may fail before it is dead-lettered.
        max_deliveries: deliveries a message may get in all, counting those whose
            consumer died or hung before settling it; past it the message is
            dead-lettered without running the handler, so a message that crashes
            its consumer every time cannot cycle forever. Default: twice
            ``max_attempts``.
        backoff: the delay before a failed message is delivered again: a tenacity
            wait strategy (called with the attempt number) or seconds. Default:
            exponential, 1 s doubling to 60 s.
        reconnect_backoff: the wait between tries while the queue's broker cannot
            be reached (a Redis server down, a SQLite write lock held past
            ``busy_timeout``): a tenacity wait strategy (called with the try
            number) or seconds. Default: 0.1 s doubling to 5 s, each step cut by
            up to a fifth at random. One thread tries; the others wait for it.
        drain_timeout: at stop, how long handlers in progress may run on; what
            has not finished then is released back to the queue (not acked).
        poll_interval: the longest a consumer waits for new messages before
            checking for a stop; also the stop latency of an idle consumer.
        name: for threads, logs and the consumer ids given to the queue.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        queue: Queue,
        handler: Handler | None = None,
        *,
        provider: ServiceProvider | None = None,
        concurrency: int = 1,
        prefetch: int = 1,
        max_attempts: int = 5,
        max_deliveries: int | None = None,
        backoff: tenacity.wait.wait_base | float | None = None,
        reconnect_backoff: tenacity.wait.wait_base | float | None = None,
        drain_timeout: float | timedelta = 10.0,
        poll_interval: float | timedelta = 0.5,
        name: str | None = None,
    ) -> None:
        if not isinstance(queue, Queue):  # type: ignore[redundant-expr,unused-ignore]
            msg = (  # type: ignore[unreachable,unused-ignore]
                f"queue must be a hostkit.queues.Queue (SQLiteQueue, RedisStreamQueue), not: {describe(queue)}"
            )
            raise ConfigurationError(msg)
        if handler is not None and not callable(handler):
            msg = f"handler must be callable as handler(message, scope), not: {describe(handler)}"  # type: ignore[unreachable,unused-ignore]
            raise ConfigurationError(msg)
        if provider is not None and not isinstance(provider, ServiceProvider):  # type: ignore[redundant-expr,unused-ignore]
            msg = f"provider must be a hostkit.ServiceProvider, not: {describe(provider)}"  # type: ignore[unreachable,unused-ignore]
            raise ConfigurationError(msg)
        self.queue = queue
        self._handler = handler
        self._provider = provider
        self.concurrency = check_positive_int(concurrency, "concurrency")
        self.prefetch = check_positive_int(prefetch, "prefetch")
        self.max_attempts = check_positive_int(max_attempts, "max_attempts")
        self.max_deliveries = 2 * max_attempts if max_deliveries is None else max_deliveries
        check_positive_int(self.max_deliveries, "max_deliveries")
        if self.max_deliveries < self.max_attempts:
            msg = f"max_deliveries ({self.max_deliveries}) must be >= max_attempts ({self.max_attempts})"
            raise ConfigurationError(msg)
        self.backoff = wait_or_seconds(
            backoff, "backoff", default=tenacity.wait_exponential(multiplier=1, min=1, max=60)
        )
        self.reconnect_backoff = wait_or_seconds(reconnect_backoff, "reconnect_backoff", default=default_reconnect())
        self.drain_timeout = to_seconds(drain_timeout, "drain_timeout")
        self.poll_interval = to_seconds(poll_interval, "poll_interval")
        self.name = name or f"queue-{queue.name}"
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], Message] = {}
        self._budget: threading.Event | None = None
        # Settlements claimed but not sent yet, per consumer thread (see _flush).
        self._pending: dict[str, list[Pending]] = {}
        self._counts = {"handled": 0, "failed": 0, "retried": 0, "dead_lettered": 0, "released": 0, "lease_lost": 0}
        self._crash: tuple[str, BaseException] | None = None
        # The link to the broker while execute() runs (a new one per run), else None.
        self._link: Link | None = None

    _RUNTIME = ("_lock", "_held", "_budget", "_pending", "_counts", "_crash", "_link")

    def __getstate__(self) -> dict[str, Any]:
        # placement="process": the consumer crosses to its child without its locks and
        # in-hand messages; the child starts with fresh ones (and the queue reconnects).
        return {k: v for k, v in super().__getstate__().items() if k not in self._RUNTIME}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_runtime()

    # -- what users override or call -------------------------------------------------

    def handle(self, message: Message, scope: Scope) -> None:
        """Handle one message; override it, or pass ``handler=``. Raise to fail the delivery."""
        msg = f"{type(self).__qualname__} has no handler: pass handler= or override handle(message, scope)"
        raise NotImplementedError(msg)

    def stats(self) -> dict[str, int]:
        """Counts since start: handled, failed, retried, dead_lettered, released, lease_lost, in_hand."""
        with self._lock:
            return {**self._counts, "in_hand": len(self._held)}

    def readiness(self) -> HealthCheckResult:
        """Whether this consumer gets messages now: healthy while it reaches its queue's broker.

        Unhealthy before it runs, while it first connects, and while the broker
        cannot be reached, with why and when the next try is: ``"broker unavailable:
        ConnectionError, next try in 0.8 s"``. When the host has health checks
        (:func:`hostkit.health.use_health`) and the consumer runs in a thread, it is
        registered as the ``ready`` check ``<service name>.broker``; add it to your
        own registry otherwise. An outage never fails liveness: restarting the
        process would not bring the broker back.
        """
        link = self._link
        if link is None:
            return HealthCheckResult.unhealthy(f"queue consumer {self.name!r} is not running", state="stopped")
        return link.readiness()

    def attach_host(self, host: Host) -> None:
        """:class:`~hostkit.HostAware`: add the queue's gauges and the broker readiness check.

        Called when the host is built, on a host with health checks. The queue's
        depth, in-flight count, dead letters and oldest waiting age go on
        ``/metrics`` and ``/health`` for any placement (the host reads them from the
        queue's storage itself). The readiness check only for a thread-placed
        consumer: a process-placed consumer's link lives in its child, and this
        copy never connects.
        """
        record = next((r for r in host.service_records() if r.service is self), None)
        if record is None or HealthChecks not in host.services.collection:
            return
        checks = host.services.get(HealthChecks)
        checks.add_queue(self.queue)
        if record.placement == "thread":
            checks.add(f"{record.name}.broker", self.readiness, tags=("ready",))

    def _set_detail(self, detail: str | None) -> None:
        """Show the broker's state as the service's status detail (thread placement)."""
        # In a process-placed consumer's child the runner stand-in has no record: the
        # detail stays in the log lines, which the child forwards to the host.
        runner = runner_for(self)
        record = None if runner is None else runner.record
        if record is None:
            return
        if detail is None and not (record.detail or "").startswith(DETAIL_PREFIXES):
            return  # someone else's note (a stale heartbeat): not ours to clear
        record.update(detail=detail)

    def backoff_for(self, attempts: int) -> float:
        """Seconds before a message that failed its ``attempts``-th delivery is delivered again."""
        # The queue counts a message's deliveries, across processes: no retry loop is
        # alive to ask, so the strategy is asked for that attempt number directly.
        return wait_after(self.backoff, attempts)

    # -- the service -----------------------------------------------------------------

    def stop(self, token: CancellationToken) -> None:
        # Remember the host's budget token so the drain in execute() ends when the
        # host's shared shutdown budget runs out, even before drain_timeout.
        self._budget = token
        super().stop(token)

    def execute(self, stopping: CancellationToken) -> None:
        log = logger.bind(service=self.name, pid=os.getpid())
        handler: Handler = self._handler if self._handler is not None else self.handle
        provider = self._provider if self._provider is not None else ServiceCollection().build_provider()
        base = f"{socket.gethostname()}-{os.getpid()}-{self.name}"
        replica = self.replica
        if replica is not None:
            # Thread-placed replicas share the process and the consumer's name: the queue
            # must still tell them apart (a Redis consumer that retires at its stop drops
            # its pending entries, which would be another replica's messages in hand).
            base = f"{base}-r{replica.index}"
        link = self._link = Link(self.queue, self.reconnect_backoff, self.name, self._set_detail)
        # The consumer threads watch `halt`, not `stopping` directly: it is also set when
        # one of them dies, so the others wind down and the service fails visibly
        # instead of renewing the dead thread's leases forever. Threads waiting for the
        # link to the broker wait on the link, so the stop wakes them there too.
        try:
            with (
                CancellationTokenSource(stopping, name=f"{self.name}-halt") as halt,
                halt.token.register(link.wake),
            ):
                self._run(halt, base, handler, provider, log)
        finally:
            self._link = None
            self._set_detail(None)
        if self._crash is not None:
            thread_name, exc = self._crash
            msg = f"queue consumer {self.name!r}: thread {thread_name} died: {summarize_exception(exc)}"
            raise RuntimeError(msg) from exc
        log.info("Queue consumer {!r} stopped: {}", self.name, self.stats())

    def _run(
        self, halt: CancellationTokenSource, base: str, handler: Handler, provider: ServiceProvider, log: Any
    ) -> None:
        token = halt.token
        threads = [
            threading.Thread(
                target=self._consume,
                args=(f"{base}-{n + 1}", handler, provider, halt, log),
                name=f"hostkit-{self.name}-{n + 1}",
                daemon=True,  # a handler stuck past the budget must not keep the process alive
            )
            for n in range(self.concurrency)
        ]
        log.info(
            "Queue consumer {!r} started on {!r}: concurrency={}, prefetch={}, max_attempts={}",
            self.name,
            self.queue,
            self.concurrency,
            self.prefetch,
            self.max_attempts,
        )
        for t in threads:
            t.start()
        renew_every = self.queue.lease_time / 3
        # This thread renews the leases of every message in hand until the threads end.
        while not token.wait(min(renew_every, 1.0)):
            self._renew(log, only_if_due=True)
        deadline = time.monotonic() + self.drain_timeout
        while any(t.is_alive() for t in threads):
            budget_gone = self._budget is not None and self._budget.is_set()
            left = deadline - time.monotonic()
            if left <= 0 or budget_gone:
                break
            for t in threads:
                t.join(min(left, renew_every, 0.1))
            self._renew(log, only_if_due=True)
        stuck = [t.name for t in threads if t.is_alive()]
        for consumer in list(self._pending):
            self._flush(consumer, log)  # settlements a stuck thread had not sent yet
        # Messages of a stuck or dead thread go back. A death counts as a failed
        # delivery (as a crashed process would), a stop does not.
        released = self._release_all(log, count_attempt=self._crash is not None)
        if stuck:
            log.warning(
                "Queue consumer {!r}: {} handler(s) still running after drain_timeout ({} s): {}; "
                "their {} message(s) went back to the queue and will not be acked here",
                self.name,
                len(stuck),
                self.drain_timeout,
                ", ".join(stuck),
                released,
            )
        for n, t in enumerate(threads):
            # Only ended threads: one still inside a lease call could receive messages
            # under an id that Redis would then forget (DELCONSUMER drops its pending list).
            if t.is_alive():
                continue
            try:
                self.queue.retire(f"{base}-{n + 1}")
            except Exception as exc:
                self._log_failure(
                    log,
                    exc,
                    "WARNING",
                    "Queue consumer {!r}: retiring consumer id {} failed",
                    self.name,
                    f"{base}-{n + 1}",
                )

    _last_renew = 0.0

    def _renew(self, log: Any, *, only_if_due: bool = False) -> None:
        now = time.monotonic()
        if only_if_due and now - self._last_renew < self.queue.lease_time / 3:
            return
        self._last_renew = now
        with self._lock:
            held = list(self._held.values())
        if not held:
            return
        try:
            self.queue.renew(held)
        except Exception as exc:
            # Not fatal: if renewals keep failing the leases expire and the messages
            # are delivered again (at least once), which is the queue's promise.
            self._log_failure(
                log,
                exc,
                "WARNING",
                "Queue consumer {!r}: renewing {} lease(s) failed",
                self.name,
                len(held),
            )

    def _hold(self, messages: list[Message]) -> None:
        with self._lock:
            for m in messages:
                self._held[(m.id, m.receipt)] = m

    def _claim(self, message: Message) -> bool:
        """Take the right to settle ``message``; ``True`` for exactly one caller per delivery."""
        with self._lock:
            return self._held.pop((message.id, message.receipt), None) is not None

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _release_all(self, log: Any, *, count_attempt: bool = False) -> int:
        """Release every message still in hand, in one settle call; return how many went back."""
        with self._lock:
            held, self._held = list(self._held.values()), {}
            self._pending[""] = [
                Pending(Settlement(m, "release", count_attempt=count_attempt), "released") for m in held
            ]
            before = self._counts["released"]
        self._flush("", log)
        return self._counts["released"] - before

    def _consume(
        self, consumer: str, handler: Handler, provider: ServiceProvider, halt: CancellationTokenSource, log: Any
    ) -> None:
        try:
            self._consume_loop(consumer, handler, provider, halt.token, log)
        except BaseException as exc:  # SystemExit from a handler, a bug here: never die silently
            with self._lock:
                if self._crash is None:
                    self._crash = (threading.current_thread().name, exc)
            log.opt(exception=exc).critical(
                "Queue consumer {!r}: thread {} died; stopping the consumer", self.name, threading.current_thread().name
            )
            halt.cancel()

    def _consume_loop(
        self, consumer: str, handler: Handler, provider: ServiceProvider, stopping: CancellationToken, log: Any
    ) -> None:
        with self._lock:
            self._pending[consumer] = []
        link = self._link
        assert link is not None  # set by execute() before the threads start

        # When this thread's oldest unsent settlement was decided (0.0: none unsent).
        since = [0.0]

        def lease(wait: float) -> list[Message]:
            if since[0] and self.queue.hold_settlements:
                # Each settle costs a disk sync here: settlements younger than ACK_DELAY
                # wait for company while leasing goes on, then go together.
                left = ACK_DELAY - (time.monotonic() - since[0])
                if left > 0:
                    got = self.queue.lease(consumer, max_messages=self.prefetch, wait=min(wait, left), token=stopping)
                    if got or stopping.is_set():
                        return got
            # The unsent settlements go with this lease: one call for both.
            with self._lock:
                batch, self._pending[consumer] = self._pending[consumer], []
            since[0] = 0.0
            if not batch:
                return self.queue.lease(consumer, max_messages=self.prefetch, wait=wait, token=stopping)
            try:
                settled, messages = self.queue.settle_and_lease(
                    [p.settlement for p in batch], consumer, max_messages=self.prefetch, wait=wait, token=stopping
                )
            except Exception as exc:
                self._settle_failed(batch, exc, log)
                raise  # and the link treats it as a failed lease: back-off, one line per try
            self._settled(batch, settled, log)
            return messages

        while not stopping.is_set():
            batch = link.lease(lease, self.poll_interval, stopping, log)
            if not batch:
                continue
            self._hold(batch)
            for index, message in enumerate(batch):
                if stopping.is_set():
                    # Stop requested: messages of the batch not started yet go straight
                    # back, without counting a delivery against them.
                    for rest in batch[index:]:
                        if self._claim(rest):
                            self._defer(consumer, Pending(Settlement(rest, "release", count_attempt=False), "released"))
                    break
                began = time.monotonic()
                self._handle_one(consumer, message, handler, provider, log)
                ended = time.monotonic()
                since[0] = since[0] or ended
                if ended - began > FAST or ended - since[0] > ACK_DELAY:
                    since[0] = 0.0
                    if not self._flush(consumer, log):
                        self._abandon(batch[index + 1 :], log)
                        break
        self._flush(consumer, log)

    def _abandon(self, messages: list[Message], log: Any) -> None:
        """Leave the rest of a batch unhandled: the broker cannot take settlements now."""
        # Handling them would be work whose acks fail too, done again when the
        # messages come back; left as they are, they come back after their lease.
        left = [m.id for m in messages if self._claim(m)]
        if left:
            log.debug(
                "Queue consumer {!r}: {} leased message(s) left unhandled while the broker is unreachable; "
                "they will be delivered again after their lease expires: {}",
                self.name,
                len(left),
                ", ".join(left),
            )

    def _handle_one(
        self, consumer: str, message: Message, handler: Handler, provider: ServiceProvider, log: Any
    ) -> None:
        """Run the handler and queue the message's settlement (ack, retry or dead letter)."""
        name, mid = self.queue.name, message.id
        if message.attempts > self.max_deliveries:
            # Delivered again and again without being settled: each time its consumer
            # died or hung (a message that crashes the process?). Stop the cycle.
            error = (
                f"delivered {message.attempts} times (max_deliveries {self.max_deliveries}) without being settled: "
                f"its consumer died or hung each time; the handler was not run again"
            )
            if self._claim(message):
                line = "Queue {!r}: message {} dead-lettered: {}"
                settlement = Settlement(message, "dead_letter", error=error)
                self._defer(consumer, Pending(settlement, "dead_lettered", ("ERROR", None, line, name, mid, error)))
            return
        try:
            with provider.create_scope() as scope:
                handler(message, scope)
        except Exception as exc:
            summary, text = format_failure(exc)
            self._count("failed")
            if not self._claim(message):
                return
            note: tuple[Any, ...]
            if message.attempts >= self.max_attempts:
                line = "Queue {!r}: message {} failed {} time(s) and was dead-lettered: {}"
                note = ("ERROR", exc, line, name, mid, message.attempts, summary)
                self._defer(consumer, Pending(Settlement(message, "dead_letter", error=text), "dead_lettered", note))
                return
            delay = self.backoff_for(message.attempts)
            line = "Queue {!r}: message {} failed (attempt {}/{}), retrying in {:.3g} s: {}"
            note = ("WARNING", exc, line, name, mid, message.attempts, self.max_attempts, delay, summary)
            self._defer(consumer, Pending(Settlement(message, "release", delay=delay), "retried", note))
            return
        if self._claim(message):
            self._defer(consumer, Pending(Settlement(message, "ack")))

    def __repr__(self) -> str:
        s = self.stats()
        link = self._link
        return (
            f"<QueueConsumer {self.name!r} queue={self.queue.name!r} concurrency={self.concurrency} "
            f"broker={link.state if link is not None else 'stopped'!r} "
            f"handled={s['handled']} failed={s['failed']} dead_lettered={s['dead_lettered']} in_hand={s['in_hand']}>"
        )
