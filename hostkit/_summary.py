"""How a failure and a heartbeat are shown: one formatter each, for logs, status and health.

A service's failure appears in a log line, in its status (``error``), in a health
check and in a ``SupervisorError``; written in one place, they all read the same.
"""

from __future__ import annotations

import time
import traceback

__all__ = ["format_failure", "heartbeat_age", "summarize_exception"]


def summarize_exception(exc: BaseException) -> str:
    """``"Type: message"`` for an exception, or ``"Type"`` when its message is empty.

    Never raises: an exception whose ``__str__`` raises is shown with a note instead
    of its message, since this runs where an error would end a supervising thread or
    hide the failure being reported.
    """
    try:
        message = str(exc)
    except Exception:
        message = "<exception str() failed>"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def format_failure(exc: BaseException) -> tuple[str, str]:
    """``(summarize_exception(exc), traceback text)``, chained causes included; never raises."""
    return summarize_exception(exc), "".join(traceback.format_exception(exc))


def heartbeat_age(last_beat: float | None, since: float | None, now: float | None = None) -> float | None:
    """Seconds since a service's last heartbeat (Unix times), or ``None`` when unknown.

    With no beat yet the age counts from ``since`` (when the service began running):
    the time before that, its start-up, is no hang. ``None`` when neither is known.
    A beat of 0 counts as none (a shared-memory slot not written yet reads as 0).
    """
    start = last_beat or since
    if not start:
        return None
    return (time.time() if now is None else now) - start
