"""The embedded backend: a lease queue in one SQLite file (stdlib ``sqlite3``, WAL).

Why our own rather than a library: persist-queue's SQLite ack queue, the obvious
candidate, handed the same item to two processes 18 to 25 times in 10,000
(measured on a 2-core Linux machine before this module was written; its maintainer says several processes are not
supported). Several producer and consumer processes on one machine is the whole
point here, so the queue is a small table and every state change is one SQL
statement or one ``BEGIN IMMEDIATE`` transaction, which SQLite serialises across
processes.

How a message moves (one row per message; ``receipt`` is NULL unless leased)::

    enqueue ──► ready (visible_at <= now) ──lease──► leased (receipt set, visible_at = lease end)
                  ▲                                     │ ack: row deleted
                  │ release / lease expired ◄───────────┤ release: receipt cleared, visible_at = now + delay
                  │                                     │ dead_letter: dead = 1
                requeue_dead ◄── dead ◄──────────────────┘

The trick that keeps leasing one indexed range scan: a leased row's ``visible_at``
*is* its lease end, so "ready" and "lease expired" are the same condition,
``visible_at <= now``. Every settle matches on ``id`` *and* ``receipt``, so a
consumer whose lease expired (and was re-leased to another) settles nothing.

Durability (``durability=``), i.e. what a crash can lose:

* ``"full"`` (``synchronous=FULL``): nothing that returned; survives power loss.
  Enqueues and settlements wait for an fsync; leases and renewals do not (a
  lease lost in a power cut only means a re-delivery; see ``_lease_conn``), and a
  consumer holds its settlements up to 50 ms so that several share one fsync
  (``hold_settlements``).
* ``"normal"`` (default, ``synchronous=NORMAL`` in WAL): a crash of any process
  (``kill -9`` included) loses nothing; a power loss or OS crash may lose the last
  transactions before the last WAL checkpoint sync: recent enqueues vanish and
  recent acks are undone (those messages are delivered again).
* ``"off"`` (``synchronous=OFF``): as ``"normal"`` for a process crash, but a power
  loss may also corrupt the file. Benchmarks and scratch queues only.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from loguru import logger

from .._util import describe
from ..exceptions import ConfigurationError, PayloadError
from ._base import DeadLetter, Message, Queue, QueueStats, Settlement, check_positive_int
from ._codec import Codec, CodecName

__all__ = ["Durability", "SQLiteQueue"]

#: What a crash may lose; see the module docstring.
Durability = Literal["full", "normal", "off"]
_SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hostkit_queue (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue       TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    dead        INTEGER NOT NULL DEFAULT 0,
    attempts    INTEGER NOT NULL DEFAULT 0,
    visible_at  REAL    NOT NULL,
    receipt     TEXT,
    consumer    TEXT,
    enqueued_at REAL    NOT NULL,
    error       TEXT,
    failed_at   REAL
);
CREATE INDEX IF NOT EXISTS hostkit_queue_visible ON hostkit_queue (queue, dead, visible_at);
"""


class SQLiteQueue(Queue):
    """A durable queue in a SQLite file: several processes on one machine, no server.

    Args:
        path: the database file (created with its directory's permissions).
        name: the queue's name; several queues may share one file.
        codec: ``"json"`` (default), ``"pickle"`` or a :class:`~hostkit.queues.Codec`.
        lease_time: seconds a leased message stays hidden before it is delivered again.
        durability: ``"normal"`` (default), ``"full"`` or ``"off"``: what a crash can
            lose (see :mod:`hostkit.queues._sqlite`). In short, ``"normal"``
            survives any process crash and may lose the last commits on power loss;
            ``"full"`` survives power loss: each enqueue and each settle call waits
            for an fsync.
        busy_timeout: seconds a statement waits for another process's write lock.

    Each thread uses its own connection; a forked or unpickled copy opens its own.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        name: str = "default",
        *,
        codec: CodecName | Codec = "json",
        lease_time: float | timedelta = 30.0,
        durability: Durability = "normal",
        busy_timeout: float = 30.0,
    ) -> None:
        super().__init__(name, codec=codec, lease_time=lease_time)
        if not isinstance(path, (str, os.PathLike)) or str(path) in ("", ":memory:"):
            msg = (
                f"path must be a file path (an in-memory database cannot be shared between connections), "
                f"not: {describe(path)}"
            )
            raise ConfigurationError(msg)
        if durability not in _SYNCHRONOUS:
            msg = f"durability must be 'full', 'normal' or 'off', not: {describe(durability)}"
            raise ConfigurationError(msg)
        self.path = Path(path)
        if not self.path.parent.is_dir():
            msg = f"the directory of the queue database does not exist: {str(self.path.parent)!r}; create it first"
            raise ConfigurationError(msg)
        self.durability: Durability = durability
        self.busy_timeout = busy_timeout
        self._init_local()
        self._conn()  # fail here, not at the first enqueue, if the file cannot be opened

    def _init_local(self) -> None:
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        # Re-entrant: a garbage collection may run a connection closer (below) on a thread holding it.
        self._conns_lock = threading.RLock()
        self._pid = os.getpid()

    @property
    def hold_settlements(self) -> bool:  # type: ignore[override]
        # At "full" every settle commit waits for an fsync: consumers batch them.
        return self.durability == "full"

    def _lease_conn(self) -> sqlite3.Connection:
        """The connection leases and renewals commit on: at most ``synchronous=NORMAL``.

        A lease is soft state: if a power loss undoes it, the message is simply
        delivered again, which at-least-once delivery allows. So at ``"full"`` a lease
        does not wait for an fsync. In WAL mode every commit appends to one log, and
        recovery keeps its valid prefix (each frame's checksum covers every frame
        before it); the fsync of the next ``FULL`` commit, such as the ack of the same
        message, makes the earlier lease frames durable with it. An ack that returned
        therefore never loses its lease and comes back; a lost lease means a re-delivery.
        """
        if self.durability != "full":
            return self._conn()
        return self._conn(slot="lease_conn", synchronous="NORMAL")

    def _conn(self, slot: str = "conn", synchronous: str | None = None) -> sqlite3.Connection:
        if self._pid != os.getpid():
            # A connection must not cross fork(): the child drops (never uses or closes)
            # the parent's connections and opens its own.
            self._init_local()
        conn: sqlite3.Connection | None = getattr(self._local, slot, None)
        if conn is None:
            # isolation_level=None: autocommit; multi-statement changes use explicit
            # BEGIN IMMEDIATE, which takes the write lock up front so two processes never
            # deadlock upgrading a read lock. check_same_thread=False only so close() may
            # close every thread's connection; each is still used by one thread.
            conn = sqlite3.connect(
                str(self.path), timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={synchronous or _SYNCHRONOUS[self.durability]}")
                conn.executescript(_SCHEMA)
            except BaseException:
                # Locked past busy_timeout, say: the next call opens a fresh connection,
                # so this one must not stay open behind it.
                conn.close()
                raise
            setattr(self._local, slot, conn)
            # A thread that used the queue and ended (a web server's request thread, a
            # metrics sample's helper) must not leave its connection open until close():
            # CPython drops a thread's thread-local values when it ends, and this closes it.
            setattr(self._local, f"{slot}_closer", _ThreadConnection(self, conn))
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _forget(self, conn: sqlite3.Connection) -> None:
        """Close one thread's connection, as that thread ended (unless close() took it already)."""
        with self._conns_lock:
            if not any(c is conn for c in self._conns):
                return
            self._conns = [c for c in self._conns if c is not conn]
        conn.close()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "_conns", "_conns_lock", "_pid")}

    def is_outage(self, error: BaseException) -> bool:
        # OperationalError: the database is locked past busy_timeout, the disk is full or
        # failing, the file cannot be opened (its volume went away).
        return isinstance(error, (sqlite3.OperationalError, OSError))

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_local()

    # -- producers -------------------------------------------------------------------

    def _put(self, encoded: list[bytes], delay: float) -> list[str]:
        now = time.time()
        conn = self._conn()
        rows = [(self.name, data, now + delay, now) for data in encoded]
        if len(rows) == 1:
            cur = conn.execute(
                "INSERT INTO hostkit_queue (queue, payload, visible_at, enqueued_at) VALUES (?, ?, ?, ?)", rows[0]
            )
            return [str(cur.lastrowid)]
        ids = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for row in rows:
                cur = conn.execute(
                    "INSERT INTO hostkit_queue (queue, payload, visible_at, enqueued_at) VALUES (?, ?, ?, ?)", row
                )
                ids.append(str(cur.lastrowid))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return ids

    # -- consumers -------------------------------------------------------------------

    def lease(
        self, consumer: str, *, max_messages: int = 1, wait: float = 0.0, token: threading.Event | None = None
    ) -> list[Message]:
        check_positive_int(max_messages, "max_messages")
        deadline = time.monotonic() + wait
        pause = 0.002
        while True:
            messages = self._lease_once(consumer, max_messages)
            if messages or time.monotonic() >= deadline:
                return messages
            # SQLite cannot notify a waiter: poll, backing off to 50 ms so an idle
            # consumer costs little, but a burst after a pause is picked up quickly.
            # Sleeping on the token lets a stop end the wait at once.
            pause_for = min(pause, max(deadline - time.monotonic(), 0.0))
            if token is not None:
                if token.wait(pause_for):
                    return []
            else:
                time.sleep(pause_for)
            pause = min(pause * 2, 0.05)

    def _lease_once(self, consumer: str, max_messages: int) -> list[Message]:
        conn = self._lease_conn()
        now = time.time()
        # A read first: in WAL mode it takes no lock, so idle consumers polling an
        # empty queue never queue up for the write lock producers need.
        if (
            conn.execute(
                "SELECT 1 FROM hostkit_queue WHERE queue = ? AND dead = 0 AND visible_at <= ? LIMIT 1", (self.name, now)
            ).fetchone()
            is None
        ):
            return []
        receipt = os.urandom(8).hex()
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = self._take(conn, consumer, max_messages, receipt, now)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return self._decode(rows, receipt)

    def _take(self, conn: sqlite3.Connection, consumer: str, max_messages: int, receipt: str, now: float) -> list[Any]:
        """Lease the rows (inside the caller's transaction)."""
        rows = conn.execute(
            "SELECT id, payload, attempts, enqueued_at FROM hostkit_queue "
            "WHERE queue = ? AND dead = 0 AND visible_at <= ? ORDER BY visible_at LIMIT ?",
            (self.name, now, max_messages),
        ).fetchall()
        if rows:
            conn.executemany(
                "UPDATE hostkit_queue SET receipt = ?, consumer = ?, visible_at = ?, attempts = attempts + 1 "
                "WHERE id = ?",
                [(receipt, consumer, now + self.lease_time, row[0]) for row in rows],
            )
        return rows

    def _decode(self, rows: list[Any], receipt: str) -> list[Message]:
        messages = []
        for r in rows:
            try:
                payload = self.codec.decode(r[1])
            except PayloadError as err:
                # A message nobody can decode would come back forever: dead-letter it now.
                self.dead_letter(Message(str(r[0]), None, r[2] + 1, receipt, r[3]), f"undecodable payload: {err}")
                logger.bind(service=f"queue-{self.name}").error(
                    "Queue {!r}: message {} cannot be decoded and was dead-lettered: {}", self.name, r[0], err
                )
                continue
            messages.append(Message(str(r[0]), payload, r[2] + 1, receipt, r[3]))
        return messages

    def ack(self, message: Message) -> bool:
        cur = self._conn().execute(
            "DELETE FROM hostkit_queue WHERE id = ? AND receipt = ?", (int(message.id), message.receipt)
        )
        return cur.rowcount == 1

    def ack_many(self, messages: list[Message]) -> int:
        if not messages:
            return 0
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.executemany(
                "DELETE FROM hostkit_queue WHERE id = ? AND receipt = ?", [(int(m.id), m.receipt) for m in messages]
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return cur.rowcount

    def release(self, message: Message, *, delay: float = 0.0, count_attempt: bool = True) -> bool:
        cur = self._conn().execute(
            "UPDATE hostkit_queue SET receipt = NULL, consumer = NULL, visible_at = ?, attempts = attempts - ? "
            "WHERE id = ? AND receipt = ? AND dead = 0",
            (time.time() + delay, 0 if count_attempt else 1, int(message.id), message.receipt),
        )
        return cur.rowcount == 1

    def dead_letter(self, message: Message, error: str) -> bool:
        cur = self._conn().execute(
            "UPDATE hostkit_queue SET dead = 1, receipt = NULL, error = ?, failed_at = ? "
            "WHERE id = ? AND receipt = ? AND dead = 0",
            (error, time.time(), int(message.id), message.receipt),
        )
        return cur.rowcount == 1

    def settle(self, settlements: list[Settlement]) -> list[bool]:
        if not settlements:
            return []
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            settled = self._settle_in(conn, settlements, time.time())
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return settled

    def _settle_in(self, conn: sqlite3.Connection, settlements: list[Settlement], now: float) -> list[bool]:
        """Apply the settlements (inside the caller's transaction), each checked against its receipt."""
        settled = []
        for s in settlements:
            key = (int(s.message.id), s.message.receipt)
            if s.outcome == "ack":
                cur = conn.execute("DELETE FROM hostkit_queue WHERE id = ? AND receipt = ?", key)
            elif s.outcome == "release":
                cur = conn.execute(
                    "UPDATE hostkit_queue SET receipt = NULL, consumer = NULL, visible_at = ?, "
                    "attempts = attempts - ? WHERE id = ? AND receipt = ? AND dead = 0",
                    (now + s.delay, 0 if s.count_attempt else 1, *key),
                )
            else:
                cur = conn.execute(
                    "UPDATE hostkit_queue SET dead = 1, receipt = NULL, error = ?, failed_at = ? "
                    "WHERE id = ? AND receipt = ? AND dead = 0",
                    (s.error, now, *key),
                )
            settled.append(cur.rowcount == 1)
        return settled

    def settle_and_lease(
        self,
        settlements: list[Settlement],
        consumer: str,
        *,
        max_messages: int = 1,
        wait: float = 0.0,
        token: threading.Event | None = None,
    ) -> tuple[list[bool], list[Message]]:
        check_positive_int(max_messages, "max_messages")
        if not settlements:
            return [], self.lease(consumer, max_messages=max_messages, wait=wait, token=token)
        # One transaction, so one fsync at "full", for the settlements and the next lease.
        conn = self._conn()
        now = time.time()
        receipt = os.urandom(8).hex()
        conn.execute("BEGIN IMMEDIATE")
        try:
            settled = self._settle_in(conn, settlements, now)
            rows = self._take(conn, consumer, max_messages, receipt, now)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        messages = self._decode(rows, receipt)
        if not rows and wait > 0:
            # Settled and nothing waiting: poll for new messages as lease() does.
            messages = self.lease(consumer, max_messages=max_messages, wait=wait, token=token)
        return settled, messages

    def renew(self, messages: list[Message]) -> int:
        if not messages:
            return 0
        until = time.time() + self.lease_time
        cur = self._lease_conn().executemany(
            "UPDATE hostkit_queue SET visible_at = ? WHERE id = ? AND receipt = ? AND dead = 0",
            [(until, int(m.id), m.receipt) for m in messages],
        )
        return cur.rowcount

    # -- operations ------------------------------------------------------------------

    def stats(self) -> QueueStats:
        conn = self._conn()
        now = time.time()
        row = conn.execute(
            "SELECT COALESCE(SUM(dead = 0 AND receipt IS NULL), 0), "
            "COALESCE(SUM(dead = 0 AND receipt IS NOT NULL), 0), COALESCE(SUM(dead = 1), 0) "
            "FROM hostkit_queue WHERE queue = ?",
            (self.name,),
        ).fetchone()
        # The index orders live rows by visible_at; ready rows (visible_at <= now) come
        # before leased ones (visible_at is their lease end, in the future), so this
        # scan stops at the first row, or after the few expired leases ahead of it.
        first = conn.execute(
            "SELECT visible_at FROM hostkit_queue WHERE queue = ? AND dead = 0 AND receipt IS NULL "
            "ORDER BY visible_at LIMIT 1",
            (self.name,),
        ).fetchone()
        oldest = max(now - first[0], 0.0) if first is not None else 0.0
        return QueueStats(self.name, int(row[0]), int(row[1]), int(row[2]), oldest)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        check_positive_int(limit, "limit")
        rows = (
            self._conn()
            .execute(
                "SELECT id, payload, attempts, error, failed_at FROM hostkit_queue WHERE queue = ? AND dead = 1 "
                "ORDER BY failed_at, id LIMIT ?",
                (self.name, limit),
            )
            .fetchall()
        )
        return [DeadLetter(str(r[0]), self.codec.decode(r[1]), r[2], r[3] or "", r[4] or 0.0) for r in rows]

    def requeue_dead(self, ids: Iterable[str] | None = None) -> int:
        conn = self._conn()
        now = time.time()
        if ids is None:
            cur = conn.execute(
                "UPDATE hostkit_queue SET dead = 0, attempts = 0, error = NULL, failed_at = NULL, visible_at = ? "
                "WHERE queue = ? AND dead = 1",
                (now, self.name),
            )
        else:
            # Ids here are row numbers: any other string names no message of this queue.
            rows = [(now, self.name, int(i)) for i in ids if str(i).isdigit()]
            if not rows:
                return 0
            cur = conn.executemany(
                "UPDATE hostkit_queue SET dead = 0, attempts = 0, error = NULL, failed_at = NULL, visible_at = ? "
                "WHERE queue = ? AND dead = 1 AND id = ?",
                rows,
            )
        return cur.rowcount

    def purge(self) -> int:
        return self._conn().execute("DELETE FROM hostkit_queue WHERE queue = ?", (self.name,)).rowcount

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        if self._pid == os.getpid():
            for conn in conns:
                conn.close()
        self._local = threading.local()

    def __repr__(self) -> str:
        return (
            f"<SQLiteQueue {self.name!r} path={str(self.path)!r} durability={self.durability!r} "
            f"codec={self.codec.name!r} lease_time={self.lease_time}>"
        )


class _ThreadConnection:
    """Held in a thread's local storage: closes that thread's connection when the thread ends."""

    __slots__ = ("conn", "pid", "queue")

    def __init__(self, queue: SQLiteQueue, conn: sqlite3.Connection) -> None:
        # A weak reference: a thread that outlives the queue object must not keep it alive.
        self.queue = weakref.ref(queue)
        self.conn = conn
        self.pid = os.getpid()

    def __del__(self) -> None:
        queue = self.queue()
        # Never in a forked child: a connection must not cross fork(), not even to be closed.
        if queue is not None and self.pid == os.getpid():
            queue._forget(self.conn)
