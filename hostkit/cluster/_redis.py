"""The Redis lease: a key with a time to live, renewed by its holder, taken over when it expires.

Layout, for key ``K`` under ``prefix`` (default ``hostkit``); the braces are a
hash tag, so a Redis Cluster keeps every key of one lock in one slot::

    hostkit:lock:{K}            the lease: "<token> <pid> <host>", with a TTL (PX)
    hostkit:lock:{K}:token      the fencing-token counter (INCR on every takeover)
    hostkit:lock:{K}:completed  hash: schedule -> last completed slot (ISO 8601, UTC)
    hostkit:lock:{K}:begun      hash: schedule -> slot begun and not completed

Every write is a Lua script, so the check "the lease still holds my token" and
the write are one atomic step on the server: a holder whose lease expired cannot
renew it, release another's, or record a slot.

Why a counter seeded from the server's clock: a server without persistence that
restarts has forgotten the counter, and a counter that started again at 1 would
hand the next holder a token lower than the one a resource already saw, and get
every write refused. Seeded from the server's time in milliseconds, the first
token after a restart is greater than any token before it unless more than one
takeover per millisecond happened since the previous seed.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from datetime import datetime, timedelta
from typing import Any

from loguru import logger

from .._ledger import SlotState
from .._util import describe, to_seconds
from ..exceptions import ConfigurationError
from ._base import Holder, Lease, LockBackend, check_timings, slot_text, state_of

__all__ = ["RedisLease"]

# KEYS: lease, counter. ARGV: ttl ms, "<pid> <host>".
# Returns {token, value} when taken now, {0, value-or-false, pttl} when held by another.
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held then return {0, held, redis.call('PTTL', KEYS[1])} end
if redis.call('EXISTS', KEYS[2]) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local token = redis.call('INCR', KEYS[2])
local value = tostring(token) .. ' ' .. ARGV[2]
redis.call('SET', KEYS[1], value, 'PX', ARGV[1])
return {token, value}
"""

# KEYS: lease. ARGV: my value, ttl ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: my value.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lease, completed, begun. ARGV: my value, schedule, slot, "begin" | "complete".
_SLOT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[4] == 'begin' then
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
else
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  if redis.call('HGET', KEYS[3], ARGV[2]) == ARGV[3] then redis.call('HDEL', KEYS[3], ARGV[2]) end
end
return 1
"""


def _redis_module() -> Any:
    try:
        import redis
    except ImportError:
        msg = "RedisLease needs redis-py, which is not installed: pip install 'pyhostkit[redis]'"
        raise ImportError(msg) from None
    return redis


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _public_url(url: str) -> str:
    """The URL without its password, for status pages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{netloc}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class RedisLease(LockBackend):
    """A lease on a Redis key with a time to live: once per cluster, on the Redis the queues use.

    The holder renews the key every ``renew_interval``; a holder that cannot (the
    server is unreachable or restarted, or the process was paused past the lease)
    cancels its service's token at once, within one renewal period, and so before
    the key can expire and another instance take over (given the service stops
    within the rest of the ``ttl``). Standbys try again when the key's time is up,
    so a holder that died is replaced within ``ttl`` of its last renewal.

    Args:
        url: a redis-py URL (``redis://host:6379/0``, ``unix:///run/redis.sock``), or a
            ``redis.Redis`` client whose connection settings are copied (the lease
            makes its own connection pool, with its own timeouts).
        key: the lock's name; default: the wrapped service's class name.
        ttl: how long the lease outlives its holder's last renewal (default 15 s).
        renew_interval: how often the holder renews (default ``ttl / 3``; must be
            less than ``ttl / 2``).
        prefix: the key prefix (as the queues').
        client_options: extra keyword arguments for ``redis.Redis.from_url``.

    Needs redis-py: ``pip install 'pyhostkit[redis]'``.

    Raises:
        ConfigurationError: a bad URL, key or timing (naming it and the fix).

    .. versionadded:: 0.2
    """

    kind = "redis"

    def __init__(
        self,
        url: str | Any = "redis://127.0.0.1:6379/0",
        *,
        key: str | None = None,
        ttl: float | timedelta = 15.0,
        renew_interval: float | timedelta | None = None,
        prefix: str = "hostkit",
        client_options: dict[str, Any] | None = None,
    ) -> None:
        redis = _redis_module()
        self.ttl = seconds = to_seconds(ttl, "RedisLease ttl", allow_zero=False)
        if seconds < 0.1:
            msg = f"RedisLease ttl must be at least 0.1 seconds, not: {describe(ttl)}"
            raise ConfigurationError(msg)
        interval = (
            self.ttl / 3
            if renew_interval is None
            else to_seconds(renew_interval, "RedisLease renew_interval", allow_zero=False)
        )
        check_timings(self.ttl, interval, "RedisLease")
        self.renew_interval = interval
        if key is not None and (not isinstance(key, str) or not key):
            msg = f"RedisLease key must be a non-empty string, not: {describe(key)}"
            raise ConfigurationError(msg)
        self.key = key
        self.prefix = prefix
        # A renewal that cannot complete within half a renewal period counts as failed, so a
        # holder cut off from the server notices within 1.5 periods of its last renewal.
        timeouts = {"socket_timeout": interval / 2, "socket_connect_timeout": interval / 2}
        self._url: str | None = None
        self._pool: tuple[Any, dict[str, Any]] | None = None
        if isinstance(url, str):
            if "://" not in url:
                msg = (
                    "RedisLease url must be a redis URL such as 'redis://127.0.0.1:6379/0' or 'unix:///path', "
                    f"not: {describe(url)}"
                )
                raise ConfigurationError(msg)
            self._url = url
            self.client_options = {**timeouts, **(client_options or {})}
            try:
                redis.Redis.from_url(url, **self.client_options)
            except ValueError as err:
                msg = f"RedisLease url {_public_url(url)!r} is not a redis URL redis-py accepts: {err}"
                raise ConfigurationError(msg) from None
            self.where = _public_url(url)
        elif isinstance(url, redis.Redis):
            pool = url.connection_pool
            self._pool = (pool.connection_class, {**pool.connection_kwargs, **timeouts})
            self.client_options = {}
            kwargs = pool.connection_kwargs
            self.where = (
                f"unix://{kwargs['path']}"
                if "path" in kwargs
                else f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
            )
        else:
            msg = f"RedisLease needs a redis URL or a redis.Redis client, not: {describe(url)}"
            raise ConfigurationError(msg)

    def make_client(self) -> Any:
        """A new redis-py client with this lease's timeouts."""
        redis = _redis_module()
        if self._url is not None:
            return redis.Redis.from_url(self._url, **self.client_options)
        assert self._pool is not None
        connection_class, kwargs = self._pool
        return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=connection_class, **kwargs))

    def lease(self, key: str) -> _RedisLease:
        return _RedisLease(self, self.key or key)

    def __repr__(self) -> str:
        return f"<RedisLease {self.where} key={self.key!r} ttl={self.ttl:g}s renew_interval={self.renew_interval:g}s>"


class _RedisLease(Lease):
    backend = "redis"

    def __init__(self, config: RedisLease, key: str) -> None:
        base = f"{config.prefix}:lock:{{{key}}}"
        super().__init__(key, f"{config.where} {base}")
        self._config = config
        self._keys = (base, f"{base}:token", f"{base}:completed", f"{base}:begun")
        self._ttl_ms = max(int((config.ttl or 0) * 1000), 1)
        self._client = config.make_client()
        self._scripts = {
            name: self._client.register_script(src)
            for name, src in (("acquire", _ACQUIRE), ("renew", _RENEW), ("release", _RELEASE), ("slot", _SLOT))
        }
        self._value: str | None = None
        self._remaining = 0.0
        self._me = f"{os.getpid()} {socket.gethostname()}"

    def try_acquire(self) -> bool:
        if self._value is not None:
            return True
        reply = self._scripts["acquire"](keys=self._keys[:2], args=[self._ttl_ms, self._me])
        token = int(reply[0])
        if token == 0:
            self._remaining = max(int(reply[2]), 0) / 1000
            self._note_holder(_text(reply[1]))
            return False
        self._value = _text(reply[1])
        self.token = token
        self._held = True
        self.holder = Holder(os.getpid(), socket.gethostname())
        return True

    def _note_holder(self, value: str) -> None:
        parts = value.split(" ", 2)
        pid = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        self.holder = Holder(pid, parts[2] if len(parts) > 2 else None)

    def is_outage(self, error: BaseException) -> bool:
        redis = _redis_module()
        return isinstance(error, (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError, OSError))

    def standby_wait(self, poll_interval: float) -> float:
        # Try again the moment the holder's lease ends, when that is sooner than the poll.
        return min(poll_interval, self._remaining + 0.005) if self._remaining > 0 else poll_interval

    def renew(self) -> bool:
        if self._value is None:
            return False
        if int(self._scripts["renew"](keys=self._keys[:1], args=[self._value, self._ttl_ms])) == 1:
            return True
        self._lost()
        return False

    def _lost(self) -> None:
        self._value = None
        self._held = False

    def release(self) -> None:
        value, self._value = self._value, None
        self._held = False
        try:
            if value is not None:
                self._scripts["release"](keys=self._keys[:1], args=[value])
        except Exception as err:
            logger.warning("Could not release the Redis lease {} ({}); it ends at its TTL", self.where, err)
        finally:
            self._client.close()

    def is_current(self) -> bool:
        return self._value is not None and _text(self._client.get(self._keys[0]) or b"") == self._value

    def slot_state(self, schedule: str) -> SlotState:
        pipe = self._client.pipeline(transaction=True)
        pipe.hget(self._keys[2], schedule)
        pipe.hget(self._keys[3], schedule)
        completed, begun = pipe.execute()
        return state_of(completed, begun)

    def _slot(self, schedule: str, slot: datetime, step: str) -> bool:
        text = slot_text(slot)
        if self._value is None:
            return False
        redis = _redis_module()
        try:
            done = self._scripts["slot"](
                keys=[self._keys[0], *self._keys[2:]], args=[self._value, schedule, text, step]
            )
        except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
            # Unconfirmed is not held: the caller stops, as for a lost lease.
            logger.warning(
                "Could not record slot {} of {!r} in {} ({}); counting the lease as lost",
                text,
                schedule,
                self.where,
                err,
            )
            return False
        return int(done) == 1

    def begin_slot(self, schedule: str, slot: datetime) -> bool:
        return self._slot(schedule, slot, "begin")

    def complete_slot(self, schedule: str, slot: datetime) -> bool:
        return self._slot(schedule, slot, "complete")

    def close(self) -> None:
        self._client.close()
