"""Once per cluster: the lock backends of :class:`~hostkit.OncePerDeployment`.

- :class:`FileLock`: an ``flock`` on a file; once per machine (the default).
- :class:`RedisLease`: a key with a time to live on Redis, renewed by its holder.
- :class:`PostgresLock`: a session advisory lock on PostgreSQL.

Each holder gets a :class:`Lease` with a fencing token (:attr:`Lease.token`) that
grows with every takeover; the service running under it finds it with
:func:`current_lease`. redis-py and psycopg are imported only when a backend that
needs them is made.
"""

from __future__ import annotations

from ._base import Lease, LockBackend, current_lease
from ._file import FileLock
from ._postgres import PostgresLock
from ._redis import RedisLease

__all__ = ["FileLock", "Lease", "LockBackend", "PostgresLock", "RedisLease", "current_lease"]
