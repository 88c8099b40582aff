"""The log bridge: a child's records travel to the host, which writes them through its own loguru sinks.

Child side: at bootstrap the child routes stdlib ``logging`` into loguru (as the
host does), replaces the sinks it may have inherited through fork with one
forwarding sink (under fork, a handler the host built once, before its first
fork: :func:`prepare_for_fork`), and sends each record over the result pipe as a
:class:`~hostkit._process.protocol.LogRecord`, built by :func:`capture` only.
The child does not import loguru for that: if its service never logs, it never
pays loguru's import. The sink is installed at once if loguru is already imported
(the fork server or the forking host had it), else the moment anything in the
child imports it (:mod:`hostkit._lateloguru`); the first stdlib record imports it.

Host side: the supervising thread reads the records in the order the child wrote
them and :func:`reemit` logs each one through loguru, with the child's time,
module, function, line, thread and process, so the host's sinks and filters treat
it as one of their own.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .._fastadd import add_sink, remembered_paths
from .._lateloguru import when_imported
from .protocol import LogRecord

if TYPE_CHECKING:
    from datetime import datetime

__all__ = ["ChildLog", "capture", "prepare_for_fork", "reemit"]


class _Sender(Protocol):
    def send(self, message: Any) -> None: ...


def capture(
    *,
    level: str,
    levelno: int,
    message: str,
    time: datetime | float,
    name: str,
    function: str,
    line: int,
    file_path: str,
    process_name: str,
    extra: dict[str, object],
    exception: str | None = None,
) -> LogRecord:
    """The one place a :class:`LogRecord` is made; thread and file fields come from here."""
    base = os.path.basename(file_path)
    thread = threading.current_thread()
    return LogRecord(
        level=level,
        levelno=levelno,
        message=message,
        time=time,
        name=name,
        function=function,
        line=line,
        module=os.path.splitext(base)[0],
        file_name=base,
        file_path=file_path,
        thread_id=thread.ident,
        thread_name=thread.name,
        process_name=process_name,
        extra=extra,
        exception=exception,
    )


def _plain(value: object) -> object:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


class ChildLog:
    """The child's end of the bridge: every loguru and stdlib record goes to the host, in order."""

    def __init__(self, channel: _Sender, service: str, process_name: str) -> None:
        self.channel = channel
        self.service = service
        self.pid = os.getpid()
        # Named once: every record carries it, and it does not change in this process.
        self.process_name = process_name

    def install(self, stdlib_level: int) -> None:
        """Forward every loguru record; route stdlib records through loguru, as in the host."""
        when_imported(self._install_sink)
        root = logging.getLogger()
        # The handler built where this module was imported (the host, the fork server):
        # built here, its lock and logging's registries would be written in each child.
        root.handlers = [_FIRST_RECORD]
        # Under fork the root's level is the host's, usually this one: setLevel would
        # clear the cache of every logger of the process all the same, a copy-on-write
        # page fault for each (a web app has hundreds of loggers).
        if root.level != stdlib_level:
            root.setLevel(stdlib_level)

    def _install_sink(self) -> None:
        from loguru import logger

        # Under fork the parent's sinks were copied into the child: writing to them here
        # would bypass the parent (and its in-memory sinks would swallow the lines). A
        # loguru imported late in the child added its default stderr sink: removed too.
        # Forked from a host that prepared the forwarding handler: it replaces them
        # (prepare_for_fork says why). Otherwise remove() and add_sink: the memo is
        # filled (by the fork server, the forking host, or as loguru was imported
        # here), so this costs a fraction of a millisecond instead of loguru's ~7 ms.
        if not _put_prepared(logger, self._sink):
            logger.remove()
            add_sink(self._sink, level=0, format="{message}", enqueue=False, catch=True)
        logger.configure(extra={"service": self.service, "pid": self.pid})
        # hostkit disables its own logger; the parent filters by module name when it
        # re-emits, so enable everything here and let the parent's settings decide.
        logger.enable("")

    def _sink(self, message: Any) -> None:
        record = message.record
        exc_text = None
        if record["exception"] is not None:
            etype, evalue, etb = record["exception"]
            exc_text = "".join(traceback.format_exception(etype, evalue, etb))
        self.channel.send(
            capture(
                level=record["level"].name,
                levelno=record["level"].no,
                message=record["message"],
                time=record["time"],
                name=record["name"] or "__main__",
                function=record["function"],
                line=record["line"],
                file_path=record["file"].path,
                process_name=self.process_name,
                extra={str(k): _plain(v) for k, v in record["extra"].items()},
                exception=exc_text,
            )
        )

    def warning(self, message: str, exc: BaseException | None = None) -> None:
        """hostkit's own line from the child, named after the caller."""
        caller = sys._getframe(1)
        self.channel.send(
            capture(
                level="WARNING",
                levelno=logging.WARNING,
                message=message,
                time=time.time(),
                name=__name__,
                function=caller.f_code.co_name,
                line=caller.f_lineno,
                file_path=__file__,
                process_name=self.process_name,
                extra={"service": self.service, "pid": self.pid},
                exception="".join(traceback.format_exception(exc)) if exc is not None else None,
            )
        )

    def complete(self) -> None:
        loguru = sys.modules.get("loguru")
        if loguru is not None:  # never imported: no record can be pending in it
            loguru.logger.complete()


class _Forwarder:
    """The sink of the forwarding handler a forking host prepares: inert until a child names its target."""

    def __init__(self) -> None:
        self.target: Callable[[Any], None] | None = None

    def __call__(self, message: Any) -> None:
        target = self.target
        if target is not None:
            target(message)


#: The forwarding handler, its sink, its level and the pid of the host that built them,
#: once :func:`prepare_for_fork` has run in a host that forks its children; every
#: forked child inherits them built.
_prepared: tuple[Any, _Forwarder, int, int] | None = None
#: The handlers a forked child inherited from the host, kept referenced (see _put_prepared).
_inherited: list[object] = []


def prepare_for_fork() -> None:
    """In a host about to fork a child: build the child's forwarding loguru handler now, once per host process.

    A forked child must swap the host's sinks for one that forwards to the host.
    Done with ``remove()`` and ``add()`` in each child, that swap cost 0.5-0.8 ms of a
    fork start (a third of a bare fork child's whole start): a fresh fork pays a
    copy-on-write page fault for nearly every page those calls write (the handlers
    they free, the objects they build). And ``remove()`` stops the host's handlers in
    the child: a file sink with ``compression`` and no ``rotation`` is compressed when
    it stops, so each forked child moved the host's live log file into an archive and
    the host's later lines went to a removed file. Built here, in a private loguru
    core the host never logs to (so it never receives a host record), the handler is
    inherited by every fork as plain memory, and the child only puts it in place
    (``_put_prepared``), stopping nothing.

    This reaches into loguru's ``Core``/``Logger`` (loguru has no public way to build
    a handler apart from the logger); if they are not as expected (another loguru
    version), nothing is prepared and each child takes the public ``remove()`` and
    ``add()`` route, as before: slower, and it stops the inherited handlers.
    """
    global _prepared
    if _prepared is not None:
        return
    forwarder = _Forwarder()
    try:
        internals: Any = importlib.import_module("loguru._logger")
        # As loguru builds its own ``logger``: a fresh core, default options.
        private = internals.Logger(internals.Core(), None, 0, False, False, False, False, True, [], {})
        with remembered_paths():
            handler_id = private.add(forwarder, level=0, format="{message}", colorize=False, enqueue=False, catch=True)
        handler = private._core.handlers[handler_id]
        levelno = handler.levelno
    except (ImportError, TypeError, AttributeError, KeyError):
        return  # not this loguru's layout: children take the public route
    _prepared = (handler, forwarder, levelno, os.getpid())


def _put_prepared(logger: Any, sink: Callable[[Any], None]) -> bool:
    """In a forked child: make the prepared handler, forwarding to ``sink``, the logger's only one.

    ``False`` if the host prepared none (not forked, or another loguru version).
    The inherited handlers are replaced, not stopped: stopping would only close or
    flush the child's copies of the host's files and streams, which the child must not
    write anyway. They stay referenced so that nothing is freed here either: freeing
    them would write to memory the child still shares with the host, page by page.
    """
    prepared = _prepared
    # Never in the host that built it: its own sinks stay.
    if prepared is None or prepared[3] == os.getpid():
        return False
    handler, forwarder, levelno, _ = prepared
    forwarder.target = sink
    core = logger._core
    with core.lock:
        _inherited.append(core.handlers)
        handler_id = core.handlers_count
        core.handlers_count += 1
        core.handlers = {handler_id: handler}
        core.min_level = levelno
    return True


class _LoguruOnFirstRecord(logging.Handler):
    """The child's stdlib route until its first record: that record imports loguru, then takes the host's route.

    Importing loguru installs the forwarding sink (``ChildLog._install_sink``); this
    handler then gives its place to hostkit's ``InterceptHandler`` and hands it the
    record, so every stdlib record goes through loguru as in the host.
    """

    def emit(self, record: logging.LogRecord) -> None:
        from .._logging import InterceptHandler

        real = InterceptHandler(self.level)
        root = logging.getLogger()
        root.handlers = [real if handler is self else handler for handler in root.handlers]
        # InterceptHandler finds the stdlib caller past this emit too (a handler's emit).
        real.emit(record)


#: The stdlib route of every child of this process until its first record (a child
#: replaces it with its own ``InterceptHandler``): built once, inherited by forks.
_FIRST_RECORD = _LoguruOnFirstRecord()


# -- host side ----------------------------------------------------------------------------

_EMIT_SOURCE = "def emit(log, level, message):\n    log.log(level, message)\n"
_emitters: dict[str, Callable[[Any, Any, str], None]] = {}


def _emitter(module_name: str) -> Callable[[Any, Any, str], None]:
    """A function whose module is ``module_name``.

    loguru's ``enable``/``disable`` filter on the calling frame's ``__name__``; calling
    ``logger.log`` from a function with the child's module name keeps those settings
    working for a child's records exactly as for the host's own.
    """
    fn = _emitters.get(module_name)
    if fn is None:
        namespace: dict[str, Any] = {"__name__": module_name}
        exec(compile(_EMIT_SOURCE, f"<hostkit child {module_name}>", "exec"), namespace)
        fn = namespace["emit"]
        _emitters[module_name] = fn
    return fn


def reemit(record: LogRecord, pid: int, service: str) -> None:
    """Log a child's record in the host, with its own fields, ``service`` and the child's ``pid``."""
    from loguru import logger  # the host has imported it (``import hostkit``): a lookup

    when = record.time

    def patch(target: Any) -> None:
        if isinstance(when, float):  # a stdlib record's timestamp
            target["time"] = type(target["time"]).fromtimestamp(when, tz=target["time"].tzinfo)
        else:
            target["time"] = when
        target["function"] = record.function
        target["line"] = record.line
        target["module"] = record.module
        target["name"] = record.name
        target["file"] = type(target["file"])(record.file_name, record.file_path)
        target["thread"] = type(target["thread"])(record.thread_id, record.thread_name)
        target["process"] = type(target["process"])(pid, record.process_name)

    extra = dict(record.extra)
    extra.setdefault("service", service)
    extra["pid"] = pid
    try:
        level: Any = logger.level(record.level).name
    except ValueError:
        level = record.levelno
    message = record.message
    if record.exception:
        message = f"{message}\n{record.exception.rstrip()}"
    _emitter(record.name or "__main__")(logger.patch(patch).bind(**extra), level, message)
