"""Logging through loguru: hostkit's sinks, stdlib routing, the service tag.

hostkit never adds a sink on import (``logger.disable("hostkit")`` in the package).
:func:`configure_logging` is the one place that configures logging for a process
hostkit owns; ``Host.run()`` calls it when nothing was configured, ``hostkit run``
always does. Every record carries ``extra["service"]``: the host binds it on its
own lines, and each service's thread runs under ``logger.contextualize(service=...)``,
so lines from the service's own code (loguru or stdlib ``logging``) are tagged too.

An embedded host (``with host:``, ``host.start()``, Flask, Django, gunicorn) runs in
a process whose logging belongs to the application. While it runs, and unless
``HostOptions.embedded_logging`` is off, hostkit's own records go to the stdlib
logger ``"hostkit"`` (:func:`attach_embedded_logging`), so that the application's
``logging`` configuration (gunicorn's, Django's ``LOGGING``) decides where they go.
That happens only while loguru is as it was imported, with its default stderr sink
alone: an application that configured loguru gets nothing added.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import threading
from types import FrameType
from typing import Any, TextIO

from loguru import logger

from ._fastadd import add_sink
from ._util import describe
from .exceptions import ConfigurationError, ConfigurationTypeError

__all__ = [
    "InterceptHandler",
    "attach_embedded_logging",
    "configure_logging",
    "detach_embedded_logging",
    "logging_configured",
]

_handler_ids: list[int] = []
_configured = False

# syslog priorities for journald's "<N>" prefix (sd-daemon(3)).
_PRIORITY = {"TRACE": 7, "DEBUG": 7, "INFO": 6, "SUCCESS": 5, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


def _inside_logging(frame: FrameType) -> bool:
    code = frame.f_code
    if code.co_filename == logging.__file__:
        return True
    return code.co_name == "emit" and isinstance(frame.f_locals.get("self"), logging.Handler)


class InterceptHandler(logging.Handler):
    """A stdlib ``logging`` handler that re-emits records through loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        # Find the caller of the stdlib logging call: skip this frame, then every
        # frame inside the logging module (Handler.handle, Logger._log, ...) or in a
        # handler's emit that passed the record on (a process-placed child's first).
        frame: FrameType | None = inspect.currentframe()
        depth = 0
        while frame is not None and (depth == 0 or _inside_logging(frame)):
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
    with _route_lock:
        # loguru's default sink, or the stand-in an embedded host put in its place, and
        # the embedded route itself: this sink replaces them all.
        replaced: list[int | None] = [0, _route.default_id, _route.sink_id]
        for old_id in replaced:
            if old_id is None:
                continue
            try:
                logger.remove(old_id)
            except ValueError:
                pass
        _route.default_id = _route.sink_id = None
    if journald is None:
        journald = _journald_stream(stream)
    colorize = bool(getattr(stream, "isatty", lambda: False)()) and not journald and not json
    if json:
        _handler_ids.append(add_sink(stream, level=level, serialize=True, enqueue=False))
    else:
        _handler_ids.append(
            add_sink(stream, level=level, format=_formatter(journald, colorize), colorize=colorize, enqueue=False)
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


# -- embedded hosts: hostkit's records into the application's stdlib logging ----------------

#: The stdlib logger an embedded host's records go to.
STDLIB_LOGGER = "hostkit"

# loguru's own level names that the stdlib does not have.
_STDLIB_LEVELS = {"TRACE": logging.DEBUG, "SUCCESS": logging.INFO}
# One handler of ``repr(logger)``: "(id=0, level=10, sink=<stderr>)".
_HANDLER_REPR = re.compile(r"\(id=(\d+), level=\d+, sink=")


class _Route:
    """The state of the embedded route; guarded by ``_route_lock``."""

    def __init__(self) -> None:
        self.users = 0  # hosts (and embedding integrations) holding the route open
        self.sink_id: int | None = None  # the loguru sink that forwards to stdlib
        self.default_id: int | None = None  # our stand-in for loguru's default stderr sink
        self.enabled_hostkit = False


_route = _Route()
_route_lock = threading.Lock()
# Set on a thread while it hands a record to stdlib: an application handler that sends
# stdlib records back into loguru must not bring that record round again.
_forwarding = threading.local()


def _reinit_after_fork() -> None:
    # A lock held by another thread at fork() time would stay held forever in the child.
    global _route_lock
    _route_lock = threading.Lock()


os.register_at_fork(after_in_child=_reinit_after_fork)


def _is_hostkit(record: Any) -> bool:
    name = record["name"] or ""
    return bool(name == "hostkit" or name.startswith("hostkit."))


def _loguru_handler_ids() -> list[int] | None:
    """The ids of loguru's sinks, read from ``repr(logger)``; ``None`` if it does not look as expected.

    loguru has no public way to list its sinks; its ``repr`` lists each one as
    ``(id=N, level=N, sink=...)``. An unexpected shape reads as "configured by the
    application", so that a change in loguru can only make hostkit add nothing.
    """
    text = repr(logger)
    if not text.startswith("<loguru.logger handlers=["):
        return None
    return [int(found) for found in _HANDLER_REPR.findall(text)]


def _loguru_untouched() -> bool:
    """``True`` if loguru's only sink is its default stderr one (or our stand-in for it)."""
    ids = _loguru_handler_ids()
    return ids == [0] or (_route.default_id is not None and ids == [_route.default_id])


def _default_sink_filter(record: Any) -> bool:
    # The stand-in behaves as loguru's default sink, except that while the route is open
    # hostkit's records go to stdlib instead (on stderr too, they would show twice). A
    # record coming back from stdlib into loguru (an intercepting handler) is printed here.
    return _route.sink_id is None or not _is_hostkit(record) or getattr(_forwarding, "active", False)


def _route_filter(record: Any) -> bool:
    return _is_hostkit(record) and not getattr(_forwarding, "active", False)


class _StderrFallback(logging.StreamHandler):  # type: ignore[type-arg]
    """Where hostkit's records go when stdlib logging has no handler at all.

    stdlib's own last resort prints WARNING and up only, without time or process:
    an embedded host's start and stop (INFO) would never show. This one writes
    INFO and up to the ``sys.stderr`` of the moment, in hostkit's own line format.
    """

    def __init__(self) -> None:
        logging.Handler.__init__(self, logging.INFO)
        self.setFormatter(
            logging.Formatter(
                "%(asctime)s.%(msecs)03d | %(levelname)-8s | %(name)s | %(hostkit_service)s | %(process)d | "
                "%(message)s",
                "%Y-%m-%d %H:%M:%S",
            )
        )

    @property
    def stream(self) -> TextIO:
        return sys.stderr


_fallback = _StderrFallback()


def _to_stdlib(message: Any) -> None:
    """The route's loguru sink: one hostkit record, as a stdlib record of the ``"hostkit"`` logger."""
    record = message.record
    target = logging.getLogger(STDLIB_LOGGER)
    levelno = _STDLIB_LEVELS.get(record["level"].name, record["level"].no)
    configured = target.hasHandlers()
    if target.disabled:
        return
    if configured and not target.isEnabledFor(levelno):
        return
    if not configured and levelno < (target.level or logging.INFO):
        return
    exc_info = None
    if record["exception"] is not None and record["exception"].type is not None:
        exc = record["exception"]
        exc_info = (exc.type, exc.value, exc.traceback)
    out = logging.LogRecord(
        STDLIB_LOGGER,
        levelno,
        record["file"].path,
        record["line"],
        record["message"],
        None,
        exc_info,
        func=record["function"],
    )
    # When and where it happened, which for a child's record is the child.
    created = record["time"].timestamp()
    out.created, out.msecs = created, (created - int(created)) * 1000
    out.process, out.processName = record["process"].id, record["process"].name
    out.thread, out.threadName = record["thread"].id, record["thread"].name
    out.hostkit_service = record["extra"].get("service", "-")
    _forwarding.active = True
    try:
        if configured:
            target.handle(out)
        else:
            _fallback.handle(out)
    finally:
        _forwarding.active = False


def attach_embedded_logging() -> bool:
    """Open the embedded route: hostkit's records go to stdlib's ``"hostkit"`` logger until detached.

    Does nothing, and returns ``False``, when :func:`configure_logging` was called
    (hostkit's sink is there) or when the application configured loguru (a sink
    other than loguru's default stderr one, or the default removed). Otherwise the
    default stderr sink is swapped for one that prints the same, minus hostkit's
    records while a route is open, and the route sink is added. Every ``True``
    needs one :func:`detach_embedded_logging`; the route closes at the last one.
    """
    with _route_lock:
        if _route.users:
            _route.users += 1
            return True
        if _configured or not _loguru_untouched():
            return False
        if _route.default_id is None:
            try:
                logger.remove(0)
            except ValueError:  # removed since we looked: the application is configuring loguru
                return False
            # The same sink loguru adds at import (its defaults come from the same LOGURU_*
            # variables), with the filter above. It stays after the route closes, and is
            # recognised as loguru's default the next time.
            _route.default_id = add_sink(sys.stderr, filter=_default_sink_filter)
        # DEBUG, as loguru's default sink: a lower level would make loguru build every TRACE
        # record of the whole process (its cheap early exit is the lowest sink level).
        _route.sink_id = add_sink(_to_stdlib, level="DEBUG", format="{message}", filter=_route_filter, catch=True)
        logger.enable("hostkit")
        _route.enabled_hostkit = True
        _route.users = 1
        return True


def detach_embedded_logging() -> None:
    """Give back one route opened by :func:`attach_embedded_logging`; the last one closes it."""
    with _route_lock:
        if _route.users == 0:
            return
        _route.users -= 1
        if _route.users:
            return
        if _route.sink_id is not None:
            try:
                logger.remove(_route.sink_id)
            except ValueError:  # the application removed every sink meanwhile
                pass
            _route.sink_id = None
        if _route.enabled_hostkit and not _configured:
            logger.disable("hostkit")
        _route.enabled_hostkit = False
