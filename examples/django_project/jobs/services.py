"""The project's background services and the builder settings.HOSTKIT['BUILDER'] names.

``TickRecorder`` does one unit of work every half second, each in its own DB scope:
``add_django_db`` makes every hostkit scope drop stale connections when it opens and
when it closes, as Django does around each request. A long-lived background thread
thus never holds a connection the database has timed out ("server has gone away").
A ``TickWriter`` (scoped: one per unit of work) does the writing.
"""

from __future__ import annotations

import os

from django.db import transaction

from hostkit import BackgroundService, CancellationToken, HostBuilder, ServiceProvider
from hostkit.django.db import add_django_db

from .models import Tick


class TickWriter:
    """One unit of work's database access (scoped)."""

    def record_tick(self) -> None:
        with transaction.atomic():
            Tick.objects.create(pid=os.getpid())


class TickRecorder(BackgroundService):
    """Records a Tick every 0.5 s, one DB scope per unit of work."""

    def __init__(self, provider: ServiceProvider) -> None:
        self.provider = provider

    def execute(self, stopping: CancellationToken) -> None:
        print(f"TickRecorder running in pid {os.getpid()}", flush=True)
        while not stopping.wait(0.5):
            self.provider.run_in_scope(self.record)  # a new scope: fresh connection, closed at its end

    def record(self, writer: TickWriter) -> None:
        writer.record_tick()


def make_builder() -> HostBuilder:
    builder = HostBuilder()
    builder.options.shutdown_timeout = 10
    add_django_db(builder.services)
    builder.services.add_scoped(TickWriter)
    builder.add_hosted_service(TickRecorder)
    return builder
