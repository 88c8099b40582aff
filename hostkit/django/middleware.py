"""Django middleware recording each request's latency for the contention monitor.

::

    HOSTKIT = {..., "CONTENTION": True, "LATENCY": True}
    MIDDLEWARE = ["hostkit.django.middleware.RequestLatencyMiddleware", ...]   # first

It measures from the moment the request reaches it to the moment the response
leaves it (put it first, so it covers the other middleware). A streaming
response's body is not included: for that, wrap the WSGI application in
:class:`hostkit.contention.LatencyMiddleware` instead.

.. versionadded:: 0.1
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..exceptions import ConfigurationError
from .apps import embedded_host

__all__ = ["RequestLatencyMiddleware"]


class RequestLatencyMiddleware:
    """Records each request's duration in the project's latency recorder.

    .. versionadded:: 0.1
    """

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        recorder = embedded_host().latency
        if recorder is None:
            msg = (
                "RequestLatencyMiddleware is in MIDDLEWARE but settings.HOSTKIT['LATENCY'] is not True; "
                "set it (and 'CONTENTION') or remove the middleware"
            )
            raise ConfigurationError(msg)
        self.recorder = recorder
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        began = time.perf_counter()
        try:
            return self.get_response(request)
        finally:
            self.recorder.record(time.perf_counter() - began)
