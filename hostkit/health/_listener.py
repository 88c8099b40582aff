"""The probe listener: one thread, a selector over its connections, HTTP or TCP."""

from __future__ import annotations

import contextlib
import errno
import math
import selectors
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, cast

from loguru import logger

from .._util import describe
from ..exceptions import ConfigurationError, HostStateError, ProbeListenerError
from ._http import answer, is_loopback, response
from ._model import HealthStatus
from ._switch import process_switch_interval

if TYPE_CHECKING:
    from ._registry import HealthChecks

_log = logger.bind(service="health")

ProbeMode = Literal["http", "tcp"]

# A request is its headers (GET and HEAD have no body); past this size it is answered as it stands.
_MAX_REQUEST = 8192
# Every socket call gives the GIL away and may wait a switch interval to get it back, so
# read all that is there in one recv().
_RECV_SIZE = 65536
# For the same reason a connection is not made non-blocking (setblocking() is one more call
# that gives the GIL away): each recv() and send() is, with MSG_DONTWAIT (Linux, macOS,
# BSD). Where that flag is missing (Windows), the connection is made non-blocking instead.
_NOWAIT: int = getattr(socket, "MSG_DONTWAIT", 0)


@dataclass(eq=False)
class _Connection:
    """One accepted HTTP connection: what it sent so far, what is left to send."""

    sock: socket.socket
    deadline: float  # time.monotonic() by which the whole request must be answered
    inbox: bytearray = field(default_factory=bytearray)
    outbox: memoryview | None = None  # the answer still to send; None while reading
    events: int = 0  # what it is registered for in the selector (0: not registered)


class ProbeListener:
    """Serves health probes on its own thread and port (loopback by default).

    Args:
        checks: the registry to run.
        port: the TCP port; ``0`` picks a free one (read :attr:`port` after :meth:`bind`).
        host: the address to bind (``"127.0.0.1"`` unless told otherwise).
        mode: ``"http"`` (``/health/live``, ``/health/ready``, ``/health``, ``/metrics``)
            or ``"tcp"`` (the port is open while live checks pass, closed while not).
        switch_interval: opt-in: while the listener runs, lower ``sys.setswitchinterval``
            to this many seconds (if it is higher) so a CPU-bound thread-placed service
            hands the GIL to the probe sooner (``0.001`` is a good value). ``None`` (the
            default) leaves the process-wide interval alone. Shared by every listener in
            the process that asks: the lowest interval asked for wins, and the interval
            is restored when the last one that lowered it closes.
        tcp_interval: in ``"tcp"`` mode, how often liveness is re-evaluated.
        request_timeout: in ``"http"`` mode, the seconds a client has from its
            connection to the end of its answer; one that takes longer is dropped
            (with a 408 if it has not finished its request).
        max_connections: in ``"http"`` mode, how many connections may be open at
            once; at the limit, a new connection closes the oldest that has not
            finished its request.
        show_error_messages: whether the JSON reports show the messages of
            exceptions (``"check raised OSError: ..."``) or only their type
            (``"check raised OSError"``). ``None`` (the default): only when the
            listener is bound to a loopback address, since an error's text can hold
            a password or an internal address.

    HTTP requests are served by one thread with a selector over non-blocking
    sockets: a request is answered as soon as it is complete, whatever other
    clients are doing, so a client that is slow or silent delays no one. Each
    connection gets :attr:`request_timeout` for the whole exchange, however it
    trickles its bytes. A context manager; :meth:`close` is idempotent.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        checks: HealthChecks,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        mode: ProbeMode = "http",
        switch_interval: float | None = None,
        tcp_interval: float = 1.0,
        request_timeout: float = 2.0,
        max_connections: int = 64,
        show_error_messages: bool | None = None,
    ) -> None:
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            msg = f"probe port must be an int from 0 to 65535 (0 picks a free port), not: {describe(port)}"
            raise ConfigurationError(msg)
        if mode not in ("http", "tcp"):
            msg = f"probe mode must be 'http' or 'tcp', not: {describe(mode)}"
            raise ConfigurationError(msg)
        if switch_interval is not None and not (isinstance(switch_interval, (int, float)) and switch_interval > 0):
            msg = f"switch_interval must be a number of seconds > 0 or None, not: {describe(switch_interval)}"
            raise ConfigurationError(msg)
        if (
            not isinstance(request_timeout, (int, float))
            or isinstance(request_timeout, bool)
            or not 0 < request_timeout < math.inf
        ):
            msg = f"request_timeout must be a finite number of seconds > 0, not: {describe(request_timeout)}"
            raise ConfigurationError(msg)
        if not isinstance(max_connections, int) or isinstance(max_connections, bool) or max_connections < 1:
            msg = f"max_connections must be an int >= 1, not: {describe(max_connections)}"
            raise ConfigurationError(msg)
        if show_error_messages is not None and not isinstance(cast(object, show_error_messages), bool):
            msg = (
                "show_error_messages must be True, False, or None (shown on a loopback address only), "
                f"not: {describe(show_error_messages)}"
            )
            raise ConfigurationError(msg)
        self.checks = checks
        self.host = host
        self.mode = mode
        self.switch_interval = switch_interval
        self.tcp_interval = tcp_interval
        self.request_timeout = float(request_timeout)
        self.max_connections = max_connections
        self._show_error_messages = show_error_messages
        self._requested_port = port
        self._port: int | None = None
        self._bound_address: str | None = None
        self._redact = True  # decided at bind(), from the address bound
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._lowered_switch: float | None = None
        #: Requests answered so far.
        self.requests = 0
        #: Connections closed unanswered: past their request_timeout, or the oldest at max_connections.
        self.dropped = 0

    @property
    def port(self) -> int:
        """The bound port (after :meth:`bind`)."""
        if self._port is None:
            msg = "the probe listener is not bound yet; call bind() or start() first"
            raise HostStateError(msg)
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` (or ``tcp://host:port``)."""
        return f"{self.mode}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """``True`` while its thread serves."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def shows_error_messages(self) -> bool:
        """Whether answers show exception messages: ``show_error_messages`` if given, else
        whether the bound address (the configured one before :meth:`bind`) is loopback."""
        if self._show_error_messages is not None:
            return self._show_error_messages
        return is_loopback(self._bound_address if self._bound_address is not None else self.host)

    def bind(self) -> int:
        """Bind and listen now (idempotent), so a port in use fails at once; return the port.

        Raises:
            ProbeListenerError: the port is in use or the address cannot be bound.
        """
        with self._lock:
            if self._sock is not None:
                return self.port
            if self._closing.is_set():
                msg = "the probe listener was closed; make a new ProbeListener"
                raise HostStateError(msg)
            self._sock = self._listen(self._requested_port)
            address = self._sock.getsockname()
            self._bound_address, self._port = address[0], address[1]
            self._redact = not self.shows_error_messages
            return self._port

    def _listen(self, port: int) -> socket.socket:
        try:
            infos = socket.getaddrinfo(self.host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            msg = f"probe listener: cannot resolve address {self.host!r}: {err.strerror}"
            raise ProbeListenerError(msg) from None
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # SO_REUSEADDR lets a restarted worker re-bind its probe port while old
            # connections sit in TIME_WAIT; it does not allow two live listeners.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except OSError as err:
            sock.close()
            if err.errno == errno.EADDRINUSE:
                msg = (
                    f"probe port {self.host}:{port} is already in use (another process listens there); "
                    f"choose another port, or 0 for any free port"
                )
            else:
                msg = f"probe listener cannot listen on {self.host}:{port}: {err.strerror or err}"
            raise ProbeListenerError(msg) from None
        return sock

    def start(self) -> None:
        """Bind (if not yet) and start serving on a thread named ``hostkit-health-probe``."""
        self.bind()
        with self._lock:
            if self._thread is not None:
                return
            if self.switch_interval is not None:
                # A CPU-bound thread keeps the GIL for a whole switch interval before it
                # must hand it over; each of the probe's socket calls waits for one such
                # hand-over. 1 ms instead of 5 ms keeps the probe's p99 low under load
                # (benchmarks/probe.py), at a small cost in switching overhead. It is the
                # whole process's setting, so only when asked for.
                process_switch_interval.lower(self.switch_interval)
                self._lowered_switch = self.switch_interval
            target = self._serve_http if self.mode == "http" else self._serve_tcp
            self._thread = threading.Thread(target=target, name="hostkit-health-probe", daemon=True)
            self._thread.start()
        _log.info("Health probe listening on {}", self.url)

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and release the port; idempotent."""
        with self._lock:
            if self._closing.is_set():
                return
            self._closing.set()
            sock, thread = self._sock, self._thread
        if thread is not None and thread.is_alive() and self._port is not None:
            # A thread blocked in accept() (or in poll() on the listening socket) is not
            # woken by close() on Linux; a connection to ourselves is the portable way
            # to wake it: it sees _closing and leaves.
            with contextlib.suppress(OSError), socket.create_connection((self.host, self._port), timeout=1.0):
                pass
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                _log.warning("Health probe thread did not stop within {:.1f} s", timeout)
        if sock is not None:
            sock.close()
        with self._lock:
            self._sock = None
            if self._lowered_switch is not None:
                process_switch_interval.release(self._lowered_switch)
                self._lowered_switch = None

    def __enter__(self) -> ProbeListener:
        self.start()
        return self

    def __del__(self) -> None:
        thread = getattr(self, "_thread", None)
        if thread is not None and thread.is_alive() and not self._closing.is_set():
            warnings.warn(
                f"{self!r} was garbage-collected while serving; call close() or use it as a context manager",
                ResourceWarning,
                stacklevel=1,
            )

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._port is not None else "unbound"
        return (
            f"<ProbeListener {self.mode} {where} running={self.running} "
            f"requests={self.requests} dropped={self.dropped}>"
        )

    # -- http ------------------------------------------------------------------------------
    #
    # One thread, non-blocking I/O. Why this shape: under a CPU-bound thread the GIL is
    # the probe's enemy, and every socket call costs a GIL hand-over, so a request should
    # cost as few calls as possible; and no client may hold the thread, so nothing may
    # wait on one client. A probe's request arrives with its connection, so while no
    # other client is waiting the thread blocks in accept() itself, and accept, recv,
    # send, close answer it in one pass: the four calls of a one-client-at-a-time
    # server. A connection whose request is not complete waits in a selector, and the
    # thread then waits in the selector instead (listening socket included), until
    # every such connection has completed its request or passed its deadline. The
    # selector is poll() (select() where there is none): registering a socket is then
    # bookkeeping in Python, not a system call (epoll and kqueue make one per change),
    # and with at most max_connections sockets the scan poll() does costs nothing.

    def _serve_http(self) -> None:
        listening = self._sock
        assert listening is not None
        selector = selectors.PollSelector() if hasattr(selectors, "PollSelector") else selectors.SelectSelector()
        selector.register(listening, selectors.EVENT_READ, None)
        # Insertion order is accept order, so deadline order: the first one expires first.
        open_: dict[_Connection, None] = {}
        # The listening socket's mode, changed only when connections start or stop waiting.
        # Set here too: socket.setdefaulttimeout() may have given it a timeout.
        listening.setblocking(True)
        blocking = True
        try:
            while not self._closing.is_set():
                if not open_:
                    if not blocking:
                        listening.setblocking(True)
                        blocking = True
                    self._accept(listening, selector, open_)
                    continue
                if blocking:
                    listening.setblocking(False)
                    blocking = False
                timeout = max(0.0, next(iter(open_)).deadline - time.monotonic())
                for key, events in selector.select(timeout):
                    if key.data is None:
                        self._accept(listening, selector, open_)
                        continue
                    conn = cast(_Connection, key.data)
                    if conn in open_:  # not dropped earlier in this pass
                        self._advance(conn, events, selector, open_)
                self._expire(selector, open_)
        except Exception:  # the probe must never die silently: say why it stops answering
            _log.opt(exception=True).critical("Health probe listener failed; probes will not be answered")
        finally:
            for conn in list(open_):
                conn.sock.close()
            selector.close()

    def _accept(
        self, listening: socket.socket, selector: selectors.BaseSelector, open_: dict[_Connection, None]
    ) -> None:
        try:
            sock, _ = listening.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another wake-up took it, or the client gave up first
        except OSError as err:
            if self._closing.is_set():
                return
            # Out of file descriptors (EMFILE): the listening socket stays readable, so
            # pause rather than spin; dropping our oldest client frees one for a probe.
            _log.warning("Health probe: cannot accept a connection: {}", err)
            if open_:
                self._drop(next(iter(open_)), selector, open_, answer=False)
            self._closing.wait(0.1)
            return
        if self._closing.is_set():  # close() woke us with a connection of its own
            sock.close()
            return
        if not _NOWAIT or sock.gettimeout() is not None:  # a timeout: socket.setdefaulttimeout()
            sock.setblocking(False)
        conn = _Connection(sock, time.monotonic() + self.request_timeout)
        # Read at once: the request is usually there already, and answered in this pass.
        if not self._read(conn):
            sock.close()
            return
        if len(open_) >= self.max_connections:
            oldest = next((c for c in open_ if c.outbox is None), next(iter(open_)))
            self._drop(oldest, selector, open_, answer=False)
        open_[conn] = None
        self._watch(conn, selector)

    def _advance(
        self, conn: _Connection, events: int, selector: selectors.BaseSelector, open_: dict[_Connection, None]
    ) -> None:
        if conn.outbox is None:
            still_open = self._read(conn) if events & selectors.EVENT_READ else True
        else:
            still_open = self._write(conn)
        if still_open:
            self._watch(conn, selector)  # answered but not all sent: now it waits to write
        else:
            self._close(conn, selector, open_)

    def _read(self, conn: _Connection) -> bool:
        """Read what the client sent; answer when the request is complete.

        Returns whether the connection is still needed (reading, or writing its answer).
        """
        try:
            chunk = conn.sock.recv(_RECV_SIZE, _NOWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if chunk:
            seen = len(conn.inbox)
            conn.inbox += chunk
            start = max(0, seen - 3)
            done = (
                conn.inbox.find(b"\r\n\r\n", start) >= 0
                or conn.inbox.find(b"\n\n", start) >= 0
                or len(conn.inbox) >= _MAX_REQUEST
            )
            if not done:
                return True
        elif not conn.inbox:  # closed without a word
            return False
        # Complete, or the client closed its side after a partial request: answer what came.
        conn.outbox = memoryview(self._respond(bytes(conn.inbox)))
        conn.inbox.clear()
        return self._write(conn)

    def _write(self, conn: _Connection) -> bool:
        """Send what is left of the answer; returns whether some is still left."""
        assert conn.outbox is not None
        try:
            sent = conn.sock.send(conn.outbox, _NOWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return False
        conn.outbox = conn.outbox[sent:]
        return len(conn.outbox) > 0

    def _watch(self, conn: _Connection, selector: selectors.BaseSelector) -> None:
        events = selectors.EVENT_READ if conn.outbox is None else selectors.EVENT_WRITE
        if conn.events == events:
            return
        if conn.events:
            selector.modify(conn.sock, events, conn)
        else:
            selector.register(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn: _Connection, selector: selectors.BaseSelector, open_: dict[_Connection, None]) -> None:
        # Out of the selector first: once closed, its fd number can be reused at once.
        if conn.events:
            selector.unregister(conn.sock)
            conn.events = 0
        open_.pop(conn, None)
        conn.sock.close()

    def _drop(
        self, conn: _Connection, selector: selectors.BaseSelector, open_: dict[_Connection, None], *, answer: bool
    ) -> None:
        """Close a connection unanswered (its deadline passed, or room is needed)."""
        self.dropped += 1
        if answer and conn.outbox is None:
            # One try, never waited on: a slow but honest client learns why.
            body = {"error": f"request not complete within request_timeout={self.request_timeout:g} s"}
            with contextlib.suppress(OSError):
                conn.sock.send(response(408, body), _NOWAIT)
        self._close(conn, selector, open_)
        _log.debug("Health probe: dropped a connection ({})", "timed out" if answer else "oldest at max_connections")

    def _expire(self, selector: selectors.BaseSelector, open_: dict[_Connection, None]) -> None:
        now = time.monotonic()
        while open_:
            first = next(iter(open_))
            if first.deadline > now:
                return
            self._drop(first, selector, open_, answer=True)

    def _respond(self, request: bytes) -> bytes:
        """The whole answer to one request (never raises: a failure is a 500)."""
        self.requests += 1
        try:
            return answer(request, self.checks, redact=self._redact)
        except Exception as exc:
            _log.opt(exception=True).warning("Health probe: answering a request failed")
            kind = type(exc).__name__
            text = f"{kind}: {exc}" if self.shows_error_messages else kind
            return response(500, {"error": f"answering the probe failed: {text}"})

    # -- tcp -------------------------------------------------------------------------------

    def _serve_tcp(self) -> None:
        sock: socket.socket | None = self._sock
        assert sock is not None
        # accept() with a timeout, so liveness is re-checked every tcp_interval even
        # when nobody connects.
        sock.settimeout(self.tcp_interval)
        port = self.port
        while not self._closing.is_set():
            report = self.checks.run("live")
            if report.status is HealthStatus.UNHEALTHY:
                if sock is not None:
                    _log.warning("Liveness failed ({}); closing TCP probe port {}", report.unhealthy_summary(), port)
                    sock.close()
                    sock = None
                    with self._lock:
                        self._sock = None
                self._closing.wait(self.tcp_interval)
                continue
            if sock is None:
                try:
                    sock = self._listen(port)
                except ProbeListenerError as err:
                    _log.warning("Health is back but the TCP probe port cannot be re-opened: {}", err)
                    self._closing.wait(self.tcp_interval)
                    continue
                sock.settimeout(self.tcp_interval)
                with self._lock:
                    self._sock = sock
                _log.info("Liveness is back; TCP probe port {} re-opened", port)
            try:
                conn, _ = sock.accept()
            except (TimeoutError, socket.timeout):  # noqa: UP041 - socket.timeout differs on 3.10
                continue
            except OSError:
                continue
            with contextlib.closing(conn):
                self.requests += 1
                with contextlib.suppress(OSError):
                    conn.sendall(f"{report.status.value}\n".encode())
