"""Fenced writes on PostgreSQL: a per-resource record of the highest fencing token that wrote.

A holder that lost its lock without knowing it (paused, cut off) still believes its
token is current. The resource itself must refuse it: before writing, the writer
raises the resource's fence to its token, in the same transaction, and only if the
fence is not higher already. The upsert's row lock makes the check and the write
atomic against a newer holder's transaction.
"""

from __future__ import annotations

from typing import Any

from .._util import describe
from ..exceptions import ConfigurationError

__all__ = ["fence_postgres"]

_PASS = """
INSERT INTO {table} (resource, token) VALUES (%(resource)s, %(token)s)
ON CONFLICT (resource) DO UPDATE SET token = EXCLUDED.token WHERE {table}.token <= EXCLUDED.token
RETURNING token
"""

# "hostkit" in ASCII: the lock around CREATE TABLE (the lock backends use the same number).
_SCHEMA_LOCK = 0x686F73746B6974


def fence_postgres(conn: Any, resource: str, token: int | None, table: str) -> bool:
    if token is None:
        msg = "fence_postgres() needs a lease that was acquired: this one never held the lock, so it has no token"
        raise ConfigurationError(msg)
    if not table.replace("_", "").isalnum() or not table[0].isalpha():
        msg = f"fence table must be a plain SQL name (letters, digits, _), not: {describe(table)}"
        raise ConfigurationError(msg)
    from psycopg import pq

    if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
        msg = (
            "fence_postgres() must run in the transaction that makes the write: wrap both in "
            "`with conn.transaction():` (this connection is in autocommit mode, so the fence would "
            "commit alone and protect nothing)"
        )
        raise ConfigurationError(msg)
    if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
        # Serialise the first creators; CREATE TABLE IF NOT EXISTS alone can race on the catalog.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (resource text PRIMARY KEY, token bigint NOT NULL)")
    row = conn.execute(_PASS.format(table=table), {"resource": resource, "token": token}).fetchone()
    return row is not None
