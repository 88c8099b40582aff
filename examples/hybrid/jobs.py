"""What the web app and the worker share: the queue, and where results go.

Both sides open the same SQLite file (``HYBRID_DB``, default ``./hybrid.db``): the
queue table is hostkit's, the ``results`` table is the app's own.
"""

from __future__ import annotations

import os
import sqlite3

from hostkit.queues import SQLiteQueue

DB_PATH = os.environ.get("HYBRID_DB", "hybrid.db")


def open_queue() -> SQLiteQueue:
    """The job queue: durable, shared by every web worker and every worker service on this machine."""
    return SQLiteQueue(DB_PATH, "wordcount", lease_time=30)


class ResultStore:
    """One connection per unit of work (a scoped service): opened per message, closed after it."""

    def __init__(self) -> None:
        self.conn = sqlite3.connect(DB_PATH, timeout=30, isolation_level=None)
        self.conn.execute("CREATE TABLE IF NOT EXISTS results (job_id TEXT PRIMARY KEY, words INTEGER, worker INTEGER)")

    def save(self, job_id: str, words: int) -> None:
        # INSERT OR REPLACE: delivery is at least once, so saving twice must be harmless.
        self.conn.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", (job_id, words, os.getpid()))

    def get(self, job_id: str) -> tuple[int, int] | None:
        row = self.conn.execute("SELECT words, worker FROM results WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def close(self) -> None:
        self.conn.close()
