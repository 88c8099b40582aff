"""``hostkit run MODULE:ATTR``: run a worker service in the foreground."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .._host import Host
from .._logging import configure_logging
from .._resolve import resolve_host
from .._token import CancellationToken
from .._util import to_seconds
from ..exceptions import ConfigurationError, HostkitError, ProbeListenerError, SystemdNotifyError
from ..health import HealthChecks, HealthService, ProbeListener
from ..systemd import Notifier, SystemdService
from . import CliError, debug_option

__all__ = ["load_host", "register"]

_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")

_DESCRIPTION = """\
Run a worker service: import MODULE, take ATTR from it, and run the host until
SIGTERM or SIGINT (or until a background service fails for good). SIGHUP reloads:
every service that defines reload() has it called (systemctl reload), and the
host runs on.

ATTR is one of:
  a Host                      host = builder.build()
  a HostBuilder               builder = HostBuilder()   (built here, after the options below)
  a callable returning one    def create_builder(): ...

MODULE is imported the way `python -m` would: the current directory comes first
on sys.path, so `hostkit run worker:host` finds ./worker.py.

Under systemd (NOTIFY_SOCKET set) the host sends READY=1, STATUS=, STOPPING=1,
EXTEND_TIMEOUT_USEC during a long stop, WATCHDOG=1 while liveness passes, and
RELOADING=1 then READY=1 around a reload.
With --probe-port, /health/live and /health/ready answer on that port.

exit codes:
  0  stopped on request (signal, stop_application(), stop())
  1  a background service failed (on_background_error="stop_host")
  2  bad command line or input (module, attribute, port in use, NOTIFY_SOCKET)
  3  a service's start failed
  130  a second SIGINT during the stop
"""

_EPILOG = """\
examples:
  hostkit run myworker.app:create_builder
  hostkit run myworker.app:host --shutdown-timeout 45 --log-level DEBUG --json-logs
  hostkit run myworker.app:create_builder --probe-port 8081 --probe-host 0.0.0.0   (in a container)
"""


def register(subparsers: Any) -> None:
    """Add the ``run`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "run",
        help="run a worker service (MODULE:ATTR is a Host, a HostBuilder, or a callable returning one)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="MODULE:ATTR", help="where the host is, e.g. myworker.app:create_builder")
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        metavar="SECONDS",
        help="the one budget the whole stop shares (default: the host's HostOptions, 30 s)",
    )
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=_LEVELS, help="lowest level logged (default INFO)"
    )
    parser.add_argument("--json-logs", action="store_true", help="one JSON object per log line")
    parser.add_argument(
        "--probe-port",
        type=int,
        metavar="PORT",
        help="serve /health/live and /health/ready on this port (0: any free port; the log says which)",
    )
    parser.add_argument(
        "--probe-host", default="127.0.0.1", metavar="ADDRESS", help="address of the probe port (default 127.0.0.1)"
    )
    parser.add_argument(
        "--probe-mode",
        default="http",
        choices=("http", "tcp"),
        help="http: JSON health endpoints; tcp: a port that is open only while the host is live",
    )
    parser.add_argument(
        "--probe-error-messages",
        choices=("show", "hide"),
        help="whether /health shows exception messages or only their type "
        "(default: shown only when --probe-host is a loopback address)",
    )
    parser.add_argument("--no-systemd", action="store_true", help="ignore NOTIFY_SOCKET even when it is set")
    debug_option(parser)
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Load the host, wire systemd and probes, run it; return its exit code."""
    configure_logging(args.log_level, json=args.json_logs)
    if args.shutdown_timeout is not None:
        try:
            to_seconds(args.shutdown_timeout, "--shutdown-timeout")
        except (TypeError, ValueError) as err:
            raise CliError(str(err)) from None
    host = load_host(args.target, shutdown_timeout=args.shutdown_timeout)
    manual: list[SystemdService | HealthService] = []
    try:
        health = _wire_health(host, args, manual)
        if not args.no_systemd:
            _wire_systemd(host, health, manual)
        for service in manual:
            # Started by hand: the target may be a Host that was already built, so
            # they cannot be registered; they still follow its lifetime callbacks.
            service.start(CancellationToken.none())
        return host.run()
    except HostkitError as err:
        raise CliError(str(err)) from err
    finally:
        for service in reversed(manual):
            service.close()


def _find(host: Host, cls: type[Any]) -> Any:
    for record in host.service_records():
        if isinstance(record.service, cls):
            return record.service
    return None


def _wire_health(host: Host, args: argparse.Namespace, manual: list[SystemdService | HealthService]) -> HealthChecks:
    service: HealthService | None = _find(host, HealthService)
    checks = service.checks if service is not None else HealthChecks().attach(host)
    if args.probe_port is not None:
        shown = None if args.probe_error_messages is None else args.probe_error_messages == "show"
        listener = ProbeListener(
            checks, port=args.probe_port, host=args.probe_host, mode=args.probe_mode, show_error_messages=shown
        )
        if service is None:
            service = HealthService(checks, listener)
            service.attach(host)
            manual.append(service)
        else:
            service.listener = listener
    if service is not None and service.listener is not None:
        try:
            service.listener.bind()  # now, so a port in use is a one-line error before anything starts
        except ProbeListenerError as err:
            msg = f"{err} (--probe-port)"
            raise CliError(msg) from None
    return checks


def _wire_systemd(host: Host, health: HealthChecks, manual: list[SystemdService | HealthService]) -> None:
    service: SystemdService | None = _find(host, SystemdService)
    if service is None:
        try:
            notifier = Notifier.from_environment()
        except HostkitError as err:
            raise CliError(str(err)) from None
        if notifier is None:
            return
        service = SystemdService(notifier, health=health)
        service.attach(host)
        manual.append(service)
    if service.notifier is not None:
        try:
            service.notifier.connect()
        except SystemdNotifyError as err:
            raise CliError(str(err)) from None


def load_host(target: str, *, shutdown_timeout: float | None = None) -> Host:
    """Import ``MODULE:ATTR`` and turn it into a :class:`~hostkit.Host`.

    Raises:
        CliError: the target is malformed, cannot be imported, or is not a host.
    """
    module_name, sep, attr = target.partition(":")
    if sep and attr and (module_name.endswith(".py") or "/" in module_name):
        hint = module_name.removesuffix(".py").replace("/", ".").strip(".")
        msg = f"MODULE is a module name, not a file: use {hint}:{attr!s} from the directory that holds it"
        raise CliError(msg)
    # `python -m` puts the current directory first; users expect `hostkit run` to
    # find ./worker.py the same way (the console script's sys.path[0] is its bin dir).
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return resolve_host(
            target,
            searched=f"in the current directory {cwd} and on sys.path",
            shutdown_timeout=shutdown_timeout,
            explain_failures=True,
        )
    except ConfigurationError as err:
        raise CliError(str(err)) from err
