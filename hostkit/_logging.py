"""Logging through loguru: hostkit's sinks, stdlib routing, the service tag.

hostkit never adds a sink on import (``logger.disable("hostkit")`` in the package).
:func:`configure_logging` is the one place that does; ``Host.run()`` calls it when
nothing was configured, ``hostkit run`` always does. Every record carries
``extra["service"]``: the host binds it on its own lines, and each service's
thread runs under ``logger.contextualize(service=...)``, so lines from the
service's own code (loguru or stdlib ``logging``) are tagged too.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from types import FrameType
from typing import Any, TextIO

from loguru import logger

from ._util import describe
from .exceptions import ConfigurationError, ConfigurationTypeError

__all__ = ["InterceptHandler", "configure_logging", "logging_configured"]

_handler_ids: list[int] = []
_configured = False

# syslog priorities for journald's "<N>" prefix (sd-daemon(3)).
_PRIORITY = {"TRACE": 7, "DEBUG": 7, "INFO": 6, "SUCCESS": 5, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class InterceptHandler(logging.Handler):
    """A stdlib ``logging`` handler that re-emits records through loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        # Find the caller of the stdlib logging call: skip this frame, then every
        # frame inside the logging module (Handler.handle, Logger._log, ...).
        frame: FrameType | None = inspect.currentframe()
        depth = 0
        while frame is not None and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame = frame.f_back
            depth += 1
        logger.opt(depth=depth, exception=record.exc_info).bind(logger_name=record.name).log(level, record.getMessage())


def _journald_stream(stream: TextIO) -> bool:
    """``True`` if ``stream`` is the journal socket systemd named in ``JOURNAL_STREAM``."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == device and st.st_ino == inode


def _formatter(journald: bool, colorize: bool) -> Any:
    prefix = "{time:YYYY-MM-DD HH:mm:ss.SSS} | "
    level = "{level: <8}" if not colorize else "<level>{level: <8}</level>"

    def fmt(record: Any) -> str:
        extra = record["extra"]
        extra.setdefault("service", "-")
        # The priority goes in as literal digits: loguru does not unescape "\<" before
        # a "{field}" ("\<{extra[p]}>" came out as "\<6>"), only before plain text.
        head = f"\\<{_PRIORITY.get(record['level'].name, 6)}>" if journald else prefix
        return head + level + " | {extra[service]} | {process} | {message}\n{exception}"

    return fmt


def configure_logging(
    level: str | int = "INFO",
    *,
    json: bool = False,
    sink: TextIO | None = None,
    journald: bool | None = None,
    stdlib: bool = True,
) -> list[int]:
    """Add hostkit's log sink and route stdlib ``logging`` into loguru.

    Calling it again replaces the sink it added before. loguru's default stderr
    sink is removed (it would print every line twice); sinks you added are kept.

    Args:
        level: the lowest level written.
        json: one JSON object per line (loguru's ``serialize``).
        sink: where to write (default ``sys.stderr``).
        journald: prefix lines with a syslog ``<N>`` priority; ``None`` detects it
            from ``JOURNAL_STREAM``.
        stdlib: route the standard library's ``logging`` into loguru.

    Returns:
        the loguru handler ids added.

    .. versionadded:: 0.1
    """
    global _configured
    # Check the level before touching any sink, so a typo leaves logging as it was.
    level_no = _level_number(level)
    stream = sink if sink is not None else sys.stderr
    for handler_id in _handler_ids:
        try:
            logger.remove(handler_id)
        except ValueError:
            pass
    _handler_ids.clear()
    try:
        logger.remove(0)  # loguru's default sink
    except ValueError:
        pass
    if journald is None:
        journald = _journald_stream(stream)
    colorize = bool(getattr(stream, "isatty", lambda: False)()) and not journald and not json
    if json:
        _handler_ids.append(logger.add(stream, level=level, serialize=True, enqueue=False))
    else:
        _handler_ids.append(
            logger.add(stream, level=level, format=_formatter(journald, colorize), colorize=colorize, enqueue=False)
        )
    logger.enable("hostkit")
    if stdlib:
        root = logging.getLogger()
        if not any(isinstance(h, InterceptHandler) for h in root.handlers):
            root.addHandler(InterceptHandler())
        # loguru's level numbers are the stdlib's (TRACE 5 and SUCCESS 25 sit between them).
        root.setLevel(level_no)
    _configured = True
    return list(_handler_ids)


def _level_number(level: object) -> int:
    if isinstance(level, bool) or not isinstance(level, (str, int)):
        msg = f"configure_logging(level=...) must be a level name like 'INFO' or a number, not: {describe(level)}"
        raise ConfigurationTypeError(msg)
    if isinstance(level, int):
        if level < 0:
            msg = f"configure_logging(level=...) must be >= 0, not: {describe(level)}"
            raise ConfigurationError(msg)
        return level
    try:
        return logger.level(level).no
    except ValueError:
        known = ", ".join(_PRIORITY)
        msg = f"configure_logging(level=...) got an unknown level name {level!r}; use one of {known}"
        raise ConfigurationError(msg) from None


def logging_configured() -> bool:
    """``True`` once :func:`configure_logging` was called in this process."""
    return _configured
