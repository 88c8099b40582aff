"""``manage.py hostkit_run``: the project's host as a standalone worker service.

The same ``settings.HOSTKIT['BUILDER']`` the web processes embed, run on its own:
``Host.run()`` owns the main thread, so SIGTERM and SIGINT stop it gracefully, and
the exit code is the host's (non-zero when a background service failed), which is
what systemd's ``Restart=on-failure`` and container restart policies need. The stop
budget is ``--shutdown-timeout``, else ``settings.HOSTKIT['SHUTDOWN_TIMEOUT']`` (as for
the embedded host), else the builder's ``HostOptions.shutdown_timeout``.

.. versionadded:: 0.1
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    BaseCommand,
    CommandError,
    CommandParser,
)

from ...._options import seconds_option
from ...._resolve import resolve_host
from ....exceptions import ConfigurationError
from ...apps import host_settings

__all__ = ["Command"]


class Command(BaseCommand):  # type: ignore[misc,unused-ignore]
    help = (
        "Run the host described by settings.HOSTKIT['BUILDER'] as a standalone worker service "
        "(stops on SIGTERM/SIGINT; exits with the host's exit code)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--shutdown-timeout",
            type=float,
            default=None,
            metavar="SECONDS",
            help=(
                "the stop budget (default: settings.HOSTKIT['SHUTDOWN_TIMEOUT'], else the builder's "
                "HostOptions.shutdown_timeout)"
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        timeout: float | None = options["shutdown_timeout"]
        if timeout is not None:
            # The same check as `hostkit run --shutdown-timeout` and HostOptions, before anything is built.
            try:
                timeout = seconds_option(timeout, "--shutdown-timeout")
            except ConfigurationError as err:
                raise CommandError(str(err)) from None
        conf = host_settings()
        if timeout is None:
            timeout = conf["SHUTDOWN_TIMEOUT"]  # checked by host_settings(); None: the builder's own
        made = resolve_host(conf["BUILDER"], what="settings.HOSTKIT['BUILDER']", shutdown_timeout=timeout)
        code = made.run()
        if code:
            raise SystemExit(code)
