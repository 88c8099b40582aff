"""hostkit's main demo: a worker with a hosted warm-up and two background loops.

Run it from the repository root, watch the loops log, then stop it with Ctrl+C
or ``kill -TERM <pid>``: every service stops within the shutdown budget and the
process exits with code 0::

    python3 examples/worker.py

What runs:

* ``WarmCache``, a hosted service: fills the shared ``PriceCache`` before
  anything else starts, and logs what it loaded.
* ``Reporter``, a background loop on a ``PeriodicTimer``: logs a summary every
  two seconds, without drift.
* ``InboxPoller``, a second background loop: polls an inbox for jobs and
  handles them; its sleep is ``stopping.wait()``, so a stop wakes it at once.
"""

from __future__ import annotations

import itertools
import threading

from loguru import logger

from hostkit import (
    BackgroundService,
    CancellationToken,
    Host,
    HostBuilder,
    HostedService,
    HostOptions,
    PeriodicTimer,
)


class PriceCache:
    """Shared state (a singleton): filled by the warm-up, read by the loops."""

    def __init__(self) -> None:
        self.prices: dict[str, float] = {}


class Inbox:
    """Stands in for a table or an API that has new jobs now and then."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.handled = 0

    def fetch(self) -> list[int]:
        with self._lock:
            job = next(self._ids)
        # Every third poll finds nothing, as a real inbox often would.
        return [] if job % 3 == 0 else [job]


class WarmCache(HostedService):
    """Start-up work: runs once, before the loops start; the host waits for it."""

    def __init__(self, cache: PriceCache) -> None:
        self.cache = cache

    def start(self, token: CancellationToken) -> None:
        self.cache.prices = {f"SKU-{n:03d}": 9.99 + n for n in range(250)}
        logger.info("Cache warmed: {} prices loaded", len(self.cache.prices))

    def stop(self, token: CancellationToken) -> None:
        self.cache.prices.clear()
        logger.info("Cache cleared")


class Reporter(BackgroundService):
    """A periodic loop: one summary line every two seconds."""

    def __init__(self, cache: PriceCache, inbox: Inbox) -> None:
        self.cache = cache
        self.inbox = inbox

    def execute(self, stopping: CancellationToken) -> None:
        for tick in PeriodicTimer(2.0, stopping):
            logger.info(
                "Report {}: {} prices cached, {} jobs handled", tick, len(self.cache.prices), self.inbox.handled
            )


class InboxPoller(BackgroundService):
    """A polling loop: fetch, handle, sleep; the sleep ends at once on stop."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    def execute(self, stopping: CancellationToken) -> None:
        while not stopping.wait(0.5):
            for job in self.inbox.fetch():
                self.inbox.handled += 1
                logger.info("Handled job {}", job)


def create_builder() -> HostBuilder:
    """Register the services (``hostkit run examples.worker:create_builder`` runs it too)."""
    builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
    builder.services.add_singleton(PriceCache)
    builder.services.add_singleton(Inbox)
    builder.services.add_hosted_service(WarmCache)
    builder.services.add_hosted_service(Reporter)
    builder.services.add_hosted_service(InboxPoller)
    return builder


def build_host() -> Host:
    """The demo's host, built and ready to ``run()``."""
    return create_builder().build()


if __name__ == "__main__":
    raise SystemExit(build_host().run())
