"""What the HTTP probe answers: the routing of a request, and the bytes of a response."""

from __future__ import annotations

import ipaddress
import json
from typing import TYPE_CHECKING, Any

from ._metrics import render_metrics
from ._model import Tag

if TYPE_CHECKING:
    from ._registry import HealthChecks

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def is_loopback(address: str) -> bool:
    """Whether ``address`` (an IP literal, as a socket reports its bound address) is loopback.

    ``0.0.0.0`` and ``::`` are every interface, so not loopback; a name that is not
    an IP literal is not either (the listener decides from the address it bound).
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def response(code: int, payload: dict[str, Any], *, head: bool = False) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return raw_response(code, body, "application/json", head=head)


def raw_response(code: int, body: bytes, content_type: str, *, head: bool = False) -> bytes:
    # One buffer, one sendall(): fewer blocking calls, fewer waits for the GIL.
    header = (
        f"HTTP/1.1 {code} {REASONS.get(code, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Cache-Control: no-store\r\n"
        f"Connection: close\r\n\r\n"
    ).encode()
    return header if head else header + body


def answer(request: bytes, checks: HealthChecks, *, redact: bool) -> bytes:
    """The whole answer to one complete (or cut-off) request; ``redact`` hides exception messages."""
    line = request.split(b"\n", 1)[0].decode("latin-1").strip()
    parts = line.split()
    if len(parts) < 2:
        return response(400, {"error": "bad request line"})
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return response(405, {"error": f"method {method} not allowed; use GET"})
    head = method == "HEAD"
    tag: Tag | None
    if target in ("/health/live", "/livez"):
        tag = "live"
    elif target in ("/health/ready", "/readyz"):
        tag = "ready"
    elif target in ("/health", "/health/"):
        tag = None
    elif target == "/metrics":
        return _metrics(checks, head)
    else:
        body = {"error": f"no such path {target!r}", "paths": ["/health/live", "/health/ready", "/health"]}
        return response(404, body, head=head)
    report = checks.run(tag)
    payload = report.to_dict(redact=redact)
    if tag is None and checks.queues.labels:
        # The queue gauges ride on the full report only: the live and ready probes,
        # asked every few seconds by kubelet or the watchdog, never wait on a broker.
        payload["queues"] = {s.label: s.to_dict(redact=redact) for s in checks.queue_samples()}
    return response(report.http_status, payload, head=head)


def _metrics(checks: HealthChecks, head: bool) -> bytes:
    try:
        body, content_type = render_metrics(checks)
    except ImportError:
        hint = "/metrics needs prometheus-client: pip install 'pyhostkit[prometheus]'"
        return response(404, {"error": hint}, head=head)
    return raw_response(200, body, content_type, head=head)
