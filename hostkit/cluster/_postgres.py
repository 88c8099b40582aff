"""The PostgreSQL lock: a session advisory lock on a connection its holder owns, and a token row.

The holder's own connection takes ``pg_try_advisory_lock(K)`` (``K``: 64 bits of a
hash of the key). PostgreSQL releases a session lock the moment the session ends:
the holder's process died, its connection dropped, the server restarted, or the
server ended it because it sat idle longer than ``ttl`` (``idle_session_timeout``,
set on that connection, so a holder paused or cut off loses the lock after ``ttl``
even where TCP has not noticed). The server does not ask the holder first: a holder
cut off may still be running when another instance takes over. Its writes are then
kept out by the fencing token, which only the lock holder can raise::

    hostkit_fencing (name text primary key, token bigint)            -- +1 at every takeover
    hostkit_slots (name, schedule, completed timestamptz, begun timestamptz)

Both tables are created on first use (under a transaction-level advisory lock, so
two first holders of different keys do not race on ``CREATE TABLE``). A ledger write
is one statement that locks the fencing row (``FOR SHARE``) where its token is the
caller's, and writes only if it found it.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from loguru import logger

from .._ledger import SlotState
from .._util import describe, to_seconds
from ..exceptions import ConfigurationError
from ._base import Holder, Lease, LockBackend, check_timings, slot_text, state_of

__all__ = ["PostgresLock"]

# A fixed key for the transaction lock around CREATE TABLE ("hostkit" in ASCII).
_SCHEMA_LOCK = 0x686F73746B6974

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {fencing} (name text PRIMARY KEY, token bigint NOT NULL);
CREATE TABLE IF NOT EXISTS {slots} (
    name text NOT NULL, schedule text NOT NULL, completed timestamptz, begun timestamptz,
    PRIMARY KEY (name, schedule));
"""

_TAKE_TOKEN = """
INSERT INTO {fencing} (name, token) VALUES (%(name)s, 1)
ON CONFLICT (name) DO UPDATE SET token = {fencing}.token + 1
RETURNING token
"""

# Still ours: the advisory lock is held by this session, and the token row is this holder's.
_STILL_HELD = """
SELECT EXISTS (
    SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
    AND classid = %(classid)s::oid AND objid = %(objid)s::oid AND objsubid = 1
) AND EXISTS (SELECT 1 FROM {fencing} WHERE name = %(name)s AND token = %(token)s)
"""

_HOLDER = """
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
AND l.classid = %(classid)s::oid AND l.objid = %(objid)s::oid AND l.objsubid = 1
"""

_BEGIN = """
WITH current AS (SELECT 1 FROM {fencing} WHERE name = %(name)s AND token = %(token)s FOR SHARE)
INSERT INTO {slots} (name, schedule, begun) SELECT %(name)s, %(schedule)s, %(slot)s FROM current
ON CONFLICT (name, schedule) DO UPDATE SET begun = EXCLUDED.begun
RETURNING 1
"""

_COMPLETE = """
WITH current AS (SELECT 1 FROM {fencing} WHERE name = %(name)s AND token = %(token)s FOR SHARE)
INSERT INTO {slots} (name, schedule, completed) SELECT %(name)s, %(schedule)s, %(slot)s FROM current
ON CONFLICT (name, schedule) DO UPDATE SET completed = EXCLUDED.completed,
    begun = CASE WHEN {slots}.begun = EXCLUDED.completed THEN NULL ELSE {slots}.begun END
RETURNING 1
"""

_STATE = "SELECT completed, begun FROM {slots} WHERE name = %(name)s AND schedule = %(schedule)s"

# Settings of a Django database's OPTIONS that are Django's or psycopg's own, not libpq's.
_DJANGO_ONLY = {"isolation_level", "server_side_binding", "assume_role", "pool", "cursor_factory", "autocommit"}


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        msg = "PostgresLock needs psycopg 3, which is not installed: pip install 'pyhostkit[postgres]'"
        raise ImportError(msg) from None
    return psycopg


def lock_id(key: str) -> int:
    """The advisory-lock number of ``key``: a signed 64-bit slice of its SHA-256."""
    return int.from_bytes(hashlib.sha256(f"hostkit:{key}".encode()).digest()[:8], "big", signed=True)


def _identifier(name: str, what: str) -> str:
    if not name.replace("_", "").isalnum() or not name[0].isalpha():
        msg = f"PostgresLock {what} must be a plain SQL name (letters, digits, _), not: {describe(name)}"
        raise ConfigurationError(msg)
    return name


class PostgresLock(LockBackend):
    """A PostgreSQL session advisory lock: once per cluster, on the database the application already has.

    Give exactly one of ``dsn`` and ``connect``, or use :meth:`from_django`. The lock
    needs a connection of its own (a session lock lives as long as its session, so
    it must never be a pooled connection that someone else may close or reuse):
    ``connect`` must return a new psycopg 3 connection at each call.

    Args:
        dsn: a libpq connection string or URL (``postgresql://app@db/app``).
        connect: a function returning a new ``psycopg.Connection``.
        key: the lock's name; default: the wrapped service's class name.
        ttl: how long the server keeps the lock of a holder that went silent (its
            ``idle_session_timeout``; default 15 s). A holder that dies or whose
            connection closes loses it at once.
        renew_interval: how often the holder checks it still holds the lock (default
            ``ttl / 3``; less than ``ttl / 2``).
        table: the fencing-token table (the slot table is ``<table>_slots``).

    Unlike a Redis lease, the server releases the lock without the holder knowing:
    a holder cut off from the server may still run its service for up to one
    renewal period after another instance took over. Writes that must not land
    from a stale holder carry the fencing token (``current_lease().token``); see
    the docs, "Fenced writes".

    Needs psycopg 3: ``pip install 'pyhostkit[postgres]'``.

    .. versionadded:: 0.2
    """

    kind = "postgres"

    def __init__(
        self,
        dsn: str | None = None,
        *,
        connect: Callable[[], Any] | None = None,
        key: str | None = None,
        ttl: float | timedelta = 15.0,
        renew_interval: float | timedelta | None = None,
        table: str = "hostkit_fencing",
    ) -> None:
        psycopg = _psycopg()
        if (dsn is None) == (connect is None):
            msg = "PostgresLock needs exactly one of dsn= (a connection string) and connect= (a connection factory)"
            raise ConfigurationError(msg)
        self.ttl = seconds = to_seconds(ttl, "PostgresLock ttl", allow_zero=False)
        if seconds < 1:
            # idle_session_timeout counts whole milliseconds; below a second, scheduling noise dominates.
            msg = f"PostgresLock ttl must be at least 1 second, not: {describe(ttl)}"
            raise ConfigurationError(msg)
        interval = (
            seconds / 3
            if renew_interval is None
            else to_seconds(renew_interval, "PostgresLock renew_interval", allow_zero=False)
        )
        check_timings(seconds, interval, "PostgresLock")
        self.renew_interval = interval
        if key is not None and (not isinstance(key, str) or not key):
            msg = f"PostgresLock key must be a non-empty string, not: {describe(key)}"
            raise ConfigurationError(msg)
        self.key = key
        self.table = _identifier(table, "table")
        self.dsn = dsn
        self.connect = connect
        if dsn is not None:
            if not isinstance(dsn, str):
                msg = f"PostgresLock dsn must be a connection string, not: {describe(dsn)}"  # type: ignore[unreachable]
                raise ConfigurationError(msg)
            try:
                params = psycopg.conninfo.conninfo_to_dict(dsn)
            except psycopg.ProgrammingError as err:
                msg = f"PostgresLock dsn is not a connection string libpq accepts: {str(err).strip()}"
                raise ConfigurationError(msg) from None
            host = params.get("host") or params.get("hostaddr") or "localhost"
            port = params.get("port") or 5432
            user = f"{params['user']}@" if params.get("user") else ""
            self.where = f"postgresql://{user}{host}:{port}/{params.get('dbname') or ''}"
        else:
            if not callable(connect):
                msg = (
                    "PostgresLock connect must be a function returning a new psycopg connection, "
                    f"not: {describe(connect)}"
                )
                raise ConfigurationError(msg)
            self.where = f"postgresql via {getattr(connect, '__qualname__', repr(connect))}()"

    @classmethod
    def from_django(cls, alias: str = "default", **options: Any) -> PostgresLock:
        """A lock on the database of Django's ``DATABASES[alias]``, on a connection of its own.

        The connection string is built from the alias's settings (``NAME``, ``USER``,
        ``PASSWORD``, ``HOST``, ``PORT`` and libpq's ``OPTIONS``); Django's own
        connection is not used, since Django closes and reuses its connections.

        Raises:
            ConfigurationError: no such alias, or it is not a PostgreSQL database.
        """
        from django.db import connections  # type: ignore[import-untyped,import-not-found,unused-ignore]

        try:
            settings = connections.settings[alias]
        except Exception as err:
            msg = f"PostgresLock.from_django: no database alias {alias!r} in DATABASES ({err})"
            raise ConfigurationError(msg) from None
        engine = str(settings.get("ENGINE", ""))
        if "postgresql" not in engine and "postgis" not in engine:
            msg = f"PostgresLock.from_django: DATABASES[{alias!r}] is {engine!r}, not a PostgreSQL database"
            raise ConfigurationError(msg)
        params: dict[str, Any] = {
            k: v
            for k, v in (settings.get("OPTIONS") or {}).items()
            if k not in _DJANGO_ONLY and isinstance(v, (str, int))
        }
        for setting, name in (
            ("NAME", "dbname"),
            ("USER", "user"),
            ("PASSWORD", "password"),
            ("HOST", "host"),
            ("PORT", "port"),
        ):
            if settings.get(setting):
                params[name] = str(settings[setting])
        return cls(_psycopg().conninfo.make_conninfo(**params), **options)

    def lease(self, key: str) -> _PostgresLease:
        return _PostgresLease(self, self.key or key)

    def open_connection(self) -> Any:
        """A new autocommit connection for a lease, with the lease's timeouts set on its session."""
        psycopg = _psycopg()
        # A statement that cannot finish within half a renewal period counts as a failed
        # renewal (libpq's connect_timeout counts whole seconds, at least 2).
        half_ms = max(int(self.renew_interval * 500), 1)  # type: ignore[operator]
        if self.dsn is not None:
            conn = psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=max(2, int(self.renew_interval or 0) + 1),
                tcp_user_timeout=half_ms,
            )
        else:
            assert self.connect is not None
            conn = self.connect()
            conn.autocommit = True
        try:
            conn.execute(f"SET statement_timeout = {half_ms}")
            conn.execute(f"SET application_name = 'hostkit {os.getpid()} {socket.gethostname()[:40]}'")
            # The server ends the session (and releases the lock) of a holder silent for ttl.
            try:
                conn.execute(f"SET idle_session_timeout = {int((self.ttl or 0) * 1000)}")
            except psycopg.errors.UndefinedObject:
                # PostgreSQL before 14: a silent holder keeps the lock until TCP gives up on it.
                logger.warning(
                    "PostgreSQL server {} has no idle_session_timeout (it is older than 14): a holder that is "
                    "paused or cut off keeps the lock until the server's TCP keepalives end its session",
                    self.where,
                )
        except BaseException:
            conn.close()
            raise
        return conn

    def __repr__(self) -> str:
        return f"<PostgresLock {self.where} key={self.key!r} ttl={self.ttl:g}s renew_interval={self.renew_interval:g}s>"


class _PostgresLease(Lease):
    backend = "postgres"

    def __init__(self, config: PostgresLock, key: str) -> None:
        super().__init__(key, f"{config.where} advisory lock {key!r}")
        self._config = config
        number = lock_id(key)
        unsigned = number & 0xFFFFFFFFFFFFFFFF
        self._params: dict[str, Any] = {"name": key, "classid": unsigned >> 32, "objid": unsigned & 0xFFFFFFFF}
        self._lock = number
        self._conn: Any = None
        self._sql = {
            name: sql.format(fencing=config.table, slots=f"{config.table}_slots")
            for name, sql in (
                ("schema", _SCHEMA),
                ("take", _TAKE_TOKEN),
                ("held", _STILL_HELD),
                ("holder", _HOLDER),
                ("begin", _BEGIN),
                ("complete", _COMPLETE),
                ("state", _STATE),
            )
        }

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = self._config.open_connection()
        return self._conn

    def is_outage(self, error: BaseException) -> bool:
        psycopg = _psycopg()
        return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError, OSError))

    def try_acquire(self) -> bool:
        if self._held:
            return True
        conn = self._connection()
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (self._lock,)).fetchone()[0]:
            row = conn.execute(self._sql["holder"], self._params).fetchone()
            parts = (row[0] if row else "").split(" ")
            if len(parts) == 3 and parts[0] == "hostkit" and parts[1].isdigit():
                self.holder = Holder(int(parts[1]), parts[2])
            else:
                self.holder = Holder()
            return False
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                conn.execute(self._sql["schema"])
            token = conn.execute(self._sql["take"], self._params).fetchone()[0]
        except BaseException:
            self._drop()
            raise
        self.token = int(token)
        self._held = True
        self.holder = Holder(os.getpid(), socket.gethostname())
        return True

    def renew(self) -> bool:
        if not self._held:
            return False
        row = self._connection().execute(self._sql["held"], {**self._params, "token": self.token}).fetchone()
        if row[0]:
            return True
        self._held = False
        return False

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._held = False
        if conn is not None:
            conn.close()

    def release(self) -> None:
        conn = self._conn
        held = self._held
        try:
            if held and conn is not None and not conn.closed and not conn.broken:
                conn.execute("SELECT pg_advisory_unlock(%s)", (self._lock,))
        except Exception as err:
            # Closing the connection below ends the session, which releases the lock too.
            logger.debug("Could not unlock {} ({}); closing its connection releases it", self.where, err)
        finally:
            self._drop()

    def is_current(self) -> bool:
        if not self._held:
            return False
        try:
            return bool(
                self._connection().execute(self._sql["held"], {**self._params, "token": self.token}).fetchone()[0]
            )
        except Exception as err:
            if self.is_outage(err):
                return False
            raise

    def slot_state(self, schedule: str) -> SlotState:
        conn = self._conn if self._conn is not None and not self._conn.closed else self._config.open_connection()
        try:
            try:
                row = conn.execute(self._sql["state"], {**self._params, "schedule": schedule}).fetchone()
            except _psycopg().errors.UndefinedTable:
                return SlotState()
        finally:
            if conn is not self._conn:
                conn.close()
        return SlotState() if row is None else state_of(row[0], row[1])

    def _slot(self, step: str, schedule: str, slot: datetime) -> bool:
        text = slot_text(slot)
        if not self._held or self._conn is None:
            return False
        try:
            row = self._conn.execute(
                self._sql[step], {**self._params, "token": self.token, "schedule": schedule, "slot": text}
            ).fetchone()
        except Exception as err:
            if not self.is_outage(err):
                raise
            # Unconfirmed is not held: the caller stops, as for a lost lock.
            logger.warning(
                "Could not record slot {} of {!r} in {} ({}); counting the lock as lost",
                text,
                schedule,
                self.where,
                err,
            )
            return False
        return row is not None

    def begin_slot(self, schedule: str, slot: datetime) -> bool:
        return self._slot("begin", schedule, slot)

    def complete_slot(self, schedule: str, slot: datetime) -> bool:
        return self._slot("complete", schedule, slot)
