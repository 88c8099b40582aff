"""Settings shared by the web-framework integrations (Flask config, Django settings), read once.

Flask's ``HOSTKIT_CONTENTION`` / ``HOSTKIT_LATENCY`` and Django's
``HOSTKIT['CONTENTION']`` / ``HOSTKIT['LATENCY']`` mean the same and are checked here,
so both integrations accept and refuse the same values with the same messages.
This module imports nothing of the monitor: an app that measures nothing never
loads it (nor psutil).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._validate import describe
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from .contention import LatencyRecorder

__all__ = ["contention_options", "latency_recorder"]


def contention_options(value: object, key: str) -> dict[str, Any] | None:
    """The :class:`~hostkit.contention.ContentionMonitor` options a setting asks for; ``None``: no monitor.

    ``True`` means a monitor with its default options, a dict gives the options
    (checked when the embedded host is made), ``False`` none.

    Raises:
        ConfigurationError: anything else, naming ``key`` (the setting as the user wrote it).
    """
    if value is True:
        return {}
    if value is False:
        return None
    if not isinstance(value, dict):
        msg = f"{key} must be True, False or a dict of ContentionMonitor options, not: {describe(value)}"
        raise ConfigurationError(msg)
    return value


def latency_recorder(enabled: object) -> LatencyRecorder | None:
    """A recorder of request latency for the monitor when the latency setting is on, else ``None``."""
    if not enabled:
        return None
    from .contention import LatencyRecorder

    return LatencyRecorder()
