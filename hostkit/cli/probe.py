"""``hostkit probe URL``: exit 0 when healthy, 1 when not (exec probes, Docker HEALTHCHECK)."""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import urllib.parse
from typing import Any

from .._validate import to_seconds
from . import CliError, debug_option

__all__ = ["probe", "register"]

_DESCRIPTION = """\
Ask a hostkit probe listener whether the host is healthy; exit 0 if it is, 1 if
it is not (or does not answer within --timeout). Prints one line.

  http://HOST:PORT/PATH   GET PATH; healthy is a 2xx answer
                          (/health/live for liveness, /health/ready for readiness)
  tcp://HOST:PORT         healthy is a connection that is accepted (the port of
                          `hostkit run --probe-mode tcp` is closed while unhealthy)

exit codes: 0 healthy, 1 unhealthy or unreachable, 2 bad URL
"""


def register(subparsers: Any) -> None:
    """Add the ``probe`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "probe",
        help="exit 0 if a probe URL says healthy, 1 if not",
        description=_DESCRIPTION,
        epilog="example (Dockerfile):\n  HEALTHCHECK CMD hostkit probe http://127.0.0.1:8081/health/live",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("url", metavar="URL", help="http://127.0.0.1:8081/health/live or tcp://127.0.0.1:8081")
    parser.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS", help="give up after (default 2)")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing; the exit code says it all")
    debug_option(parser)
    parser.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    try:
        to_seconds(args.timeout, "--timeout", allow_zero=False)
    except ValueError as err:
        raise CliError(str(err)) from None
    healthy, line = probe(args.url, timeout=args.timeout)
    if not args.quiet:
        print(line, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def probe(url: str, *, timeout: float = 2.0) -> tuple[bool, str]:
    """Probe ``url`` once; return (healthy, one line saying why).

    Raises:
        CliError: the URL is not ``http://host:port/path`` or ``tcp://host:port``.
    """
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "tcp") or not parts.hostname or port is None:
        msg = f"URL must be http://HOST:PORT/PATH or tcp://HOST:PORT, not: {url!r}"
        raise CliError(msg)
    host = parts.hostname
    if parts.scheme == "tcp":
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                try:
                    answer = sock.recv(256).decode("utf-8", "replace").strip()
                except OSError:
                    answer = ""
        except OSError as err:
            return False, f"unhealthy: cannot connect to {host}:{port}: {_why(err)}"
        if answer.startswith("unhealthy"):
            return False, f"unhealthy: {host}:{port} said {answer!r}"
        return True, f"healthy: {host}:{port} accepted the connection" + (f" ({answer})" if answer else "")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "hostkit-probe"})
        response = conn.getresponse()
        body = response.read(65536)
    except (OSError, http.client.HTTPException) as err:
        return False, f"unhealthy: {url} did not answer: {_why(err)}"
    finally:
        conn.close()
    summary = _summary(body)
    if 200 <= response.status < 300:
        return True, f"healthy: {response.status} {summary}".rstrip()
    return False, f"unhealthy: {response.status} {summary}".rstrip()


def _why(err: BaseException) -> str:
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "timed out"
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def _summary(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace").strip()
    if not isinstance(data, dict):
        return ""
    failing = [
        f"{name}: {check.get('description') or check.get('status')}"
        for name, check in (data.get("checks") or {}).items()
        if isinstance(check, dict) and check.get("status") != "healthy"
    ]
    return str(data.get("status", "")) + (f" ({'; '.join(failing)})" if failing else "")
