"""The scale-out backend: Redis Streams with a consumer group (redis-py, imported lazily).

Layout in Redis, for a queue ``NAME`` under ``prefix`` (default ``hostkit``)::

    hostkit:NAME           the stream; entries: p=payload, t=enqueued_at, [a=earlier attempts, i=first id]
                           consumer group "hostkit" on it
    hostkit:NAME:delayed   sorted set: ids of messages waiting for a retry, scored by due time
    hostkit:NAME:d:ID      hash: the fields of a delayed message
    hostkit:NAME:dead      stream of dead letters (the fields, plus e=error, f=failed_at)

A lease is ``XREADGROUP`` (new entries) or ``XAUTOCLAIM`` (entries whose consumer
has been idle longer than ``lease_time``: it died or hung). The stream entry stays
until it is settled; acks ``XACK`` *and* ``XDEL`` it, so the stream holds only
waiting and in-flight messages and its length is the queue's size.

Settling (ack, release, dead letter) is one Lua script for a whole batch, each
message first checked to be still pending for *this* consumer with *this* delivery
count (the receipt). Without that check a consumer whose lease expired would
``XACK`` a message another consumer now holds; Redis itself accepts an ``XACK`` from
anyone. A consumer sends the settlements of one batch in the same round trip as its
next ``XREADGROUP`` (``settle_and_lease``, a pipeline): the script runs first, so a
read that blocks never holds them back, and a message costs one round trip, not two.

Making a queue object never talks to the server: the consumer group is created by
the first call that needs it. A worker host can then be built and started while
Redis is down, and its consumer waits for the server (see ``_outage``).
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from loguru import logger

from .._util import describe
from ..exceptions import ConfigurationError, PayloadError
from ._base import DeadLetter, Message, Queue, QueueStats, Settlement, check_positive_int
from ._codec import Codec, CodecName

__all__ = ["RedisStreamQueue"]

GROUP = "hostkit"

# KEYS: stream, delayed zset, dead stream. ARGV: group, prefix of the delayed hashes, now, then per
# message: its outcome ('a' ack, 'r' release, 'd' dead letter), stream id, consumer and delivery count,
# and for a release or a dead letter two more: attempts, and the due time (release) or the error. Each
# message is settled only if it is still pending for that consumer with that delivery count (its
# receipt); the reply has a 1 (settled) or a 0 (its lease went to another consumer) per message.
_SETTLE = """
local out = {}
local k = 4
while k <= #ARGV do
  local op, id = ARGV[k], ARGV[k + 1]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  local held = #p > 0 and p[1][2] == ARGV[k + 2] and tostring(p[1][4]) == ARGV[k + 3]
  if held and op ~= 'a' then
    local f = {p = '', t = '0', i = id}
    local e = redis.call('XRANGE', KEYS[1], id, id)
    if #e > 0 then
      local fields = e[1][2]
      for n = 1, #fields, 2 do f[fields[n]] = fields[n + 1] end
    end
    f['a'] = tostring(tonumber(ARGV[k + 4]))
    local flat = {}
    for name, v in pairs(f) do table.insert(flat, name); table.insert(flat, v) end
    if op == 'd' then
      redis.call('XADD', KEYS[3], '*', 'e', ARGV[k + 5], 'f', ARGV[3], unpack(flat))
    elseif tonumber(ARGV[k + 5]) > tonumber(ARGV[3]) then
      redis.call('HSET', ARGV[2] .. f['i'], unpack(flat))
      redis.call('ZADD', KEYS[2], ARGV[k + 5], f['i'])
    else
      redis.call('XADD', KEYS[1], '*', unpack(flat))
    end
  end
  if held then
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
    table.insert(out, 1)
  else
    table.insert(out, 0)
  end
  if op == 'a' then k = k + 4 else k = k + 6 end
end
return out
"""

# KEYS: stream. ARGV: group, consumer, then (id, count) pairs. Renews those still ours.
_RENEW = """
local n = 0
for k = 3, #ARGV, 2 do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[k], ARGV[k], 1)
  if #p > 0 and p[1][2] == ARGV[2] and tostring(p[1][4]) == ARGV[k + 1] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[k], 'JUSTID')
    n = n + 1
  end
end
return n
"""

# KEYS: stream, delayed zset. ARGV: now, prefix of the hash keys, max. Moves due retries back.
_PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do
  local h = ARGV[2] .. id
  local flat = redis.call('HGETALL', h)
  if #flat > 0 then redis.call('XADD', KEYS[1], '*', unpack(flat)) end
  redis.call('DEL', h)
  redis.call('ZREM', KEYS[2], id)
end
return #due
"""


class RedisStreamQueue(Queue):
    """A durable queue on a Redis stream: any number of consumer processes on any machines.

    Args:
        url: a redis-py URL: ``redis://host:6379/0``, ``unix:///run/redis.sock``.
        name: the queue's name (the stream is ``{prefix}:{name}``).
        codec: ``"json"`` (default), ``"pickle"`` or a :class:`~hostkit.queues.Codec`.
        lease_time: seconds a consumer may be idle on a message before another
            consumer claims it (``XAUTOCLAIM``); consumers renew while they work.
        prefix: the key prefix.
        client_options: extra keyword arguments for ``redis.Redis.from_url``.

    Durability is Redis's own (``appendonly``/``appendfsync`` on the server): with
    the defaults (RDB snapshots only), a server crash loses what changed since the
    last snapshot.

    Needs redis-py: ``pip install 'pyhostkit[redis]'``.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        name: str = "default",
        *,
        codec: CodecName | Codec = "json",
        lease_time: float | timedelta = 30.0,
        prefix: str = "hostkit",
        client_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(name, codec=codec, lease_time=lease_time)
        try:
            _redis_module()
        except ImportError:
            msg = "RedisStreamQueue needs redis-py, which is not installed: pip install 'pyhostkit[redis]'"
            raise ImportError(msg) from None
        if not isinstance(url, str) or "://" not in url:
            msg = f"url must be a redis URL such as 'redis://127.0.0.1:6379/0' or 'unix:///path', not: {describe(url)}"
            raise ConfigurationError(msg)
        self.url = url
        self.prefix = prefix
        self.client_options = dict(client_options or {})
        self.stream = f"{prefix}:{name}"
        self.delayed = f"{prefix}:{name}:delayed"
        self.dead_stream = f"{prefix}:{name}:dead"
        self._hash_prefix = f"{prefix}:{name}:d:"
        self._init_local()
        try:
            # Parses the URL and options now (a bad scheme fails here); connects on first use.
            _ = self.client
        except ValueError as err:
            msg = f"url {url!r} is not a redis URL redis-py accepts: {err}"
            raise ConfigurationError(msg) from None

    def _init_local(self) -> None:
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._scripts: dict[str, Any] = {}
        self._next_maintenance = 0.0
        self._group_made = False

    def __getstate__(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("_client", "_client_lock", "_scripts", "_next_maintenance", "_group_made")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_local()

    @property
    def client(self) -> Any:
        """The redis-py client (one connection pool per queue object; safe across threads and forks)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    client = _redis_module().Redis.from_url(self.url, **self.client_options)
                    self._scripts = {
                        name: client.register_script(src)
                        for name, src in (
                            ("settle", _SETTLE),
                            ("renew", _RENEW),
                            ("promote", _PROMOTE),
                        )
                    }
                    self._client = client
        return self._client

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except _redis_module().ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        self._group_made = True

    def _ready(self) -> Any:
        """The client, once the stream and its consumer group exist (made on first use)."""
        if not self._group_made:
            # Not in __init__: a queue must be constructible while the server is down.
            # A failure here leaves the flag unset, so the next call tries again.
            self._ensure_group()
        return self.client

    def is_outage(self, error: BaseException) -> bool:
        redis = _redis_module()
        # ConnectionError covers a refused or dropped connection, BusyLoadingError (a
        # restarted server loading its data) and failed authentication (a rotated
        # password heals without a restart); ReadOnlyError is a replica during a failover.
        return isinstance(error, (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError, OSError))

    # -- producers -------------------------------------------------------------------

    def _put(self, encoded: list[bytes], delay: float) -> list[str]:
        now = time.time()
        client = self._ready()
        if delay > 0:
            ids = [f"t{now:.6f}-{os.urandom(6).hex()}" for _ in encoded]
            pipe = client.pipeline(transaction=True)
            for mid, data in zip(ids, encoded, strict=True):
                pipe.hset(self._hash_prefix + mid, mapping={"p": data, "t": repr(now), "a": "0", "i": mid})
                pipe.zadd(self.delayed, {mid: now + delay})
            pipe.execute()
            return ids
        if len(encoded) == 1:
            # The one-message enqueue of a request handler: without redis-py's command
            # wrapper, whose bookkeeping costs more CPU than the XADD itself.
            args = ["XADD", self.stream, "*", "p", encoded[0], "t", repr(now)]
            try:
                [reply] = self._round_trip([args])
            except (_redis_module().ConnectionError, _redis_module().TimeoutError):
                reply = client.execute_command(*args)  # a dropped pooled connection: redis-py's retry heals it
            if isinstance(reply, Exception):
                raise reply
            return [_text(reply)]
        pipe = client.pipeline(transaction=True)
        for data in encoded:
            pipe.xadd(self.stream, {"p": data, "t": repr(now)})
        return [_text(i) for i in pipe.execute()]

    # -- consumers -------------------------------------------------------------------

    def lease(
        self, consumer: str, *, max_messages: int = 1, wait: float = 0.0, token: threading.Event | None = None
    ) -> list[Message]:
        check_positive_int(max_messages, "max_messages")
        try:
            return self._lease(consumer, max_messages, wait)
        except _redis_module().ResponseError as err:
            if "NOGROUP" not in str(err):
                raise
            # The stream was deleted under us (a purge, FLUSHDB): make it again, empty.
            self._ensure_group()
            return []

    def _lease(self, consumer: str, max_messages: int, wait: float) -> list[Message]:
        now = time.monotonic()
        if now >= self._next_maintenance:
            # Claiming expired leases and promoting due retries cost a round trip each:
            # do them a few times per lease_time, not on every lease.
            self._next_maintenance = now + min(self.lease_time / 4, 0.5)
            self._scripts_ready()["promote"](
                keys=[self.stream, self.delayed], args=[time.time(), self._hash_prefix, 100]
            )
            claimed = self._reclaim(consumer, max_messages)
            if claimed:
                return claimed
        reply = self._ready().xreadgroup(GROUP, consumer, {self.stream: ">"}, count=max_messages, block=_block_ms(wait))
        return self._read(consumer, reply)

    def _read(self, consumer: str, reply: Any) -> list[Message]:
        """The messages of an ``XREADGROUP`` reply, as redis-py parsed it."""
        return self._messages(consumer, _parsed_entries(reply))

    def _reclaim(self, consumer: str, max_messages: int) -> list[Message]:
        lease_ms = int(self.lease_time * 1000)
        reply = self._ready().xautoclaim(self.stream, GROUP, consumer, lease_ms, start_id="0-0", count=max_messages)
        entries = [(eid, fields) for eid, fields in reply[1] if fields]
        if not entries:
            return []
        pipe = self.client.pipeline(transaction=False)
        for eid, _ in entries:
            pipe.xpending_range(self.stream, GROUP, min=eid, max=eid, count=1)
        counts = [rows[0]["times_delivered"] if rows else 1 for rows in pipe.execute()]
        logger.bind(service=f"queue-{self.name}").info(
            "Queue {!r}: {} message(s) whose consumer stopped renewing were claimed by {}",
            self.name,
            len(entries),
            consumer,
        )
        return self._messages(consumer, [(eid, f, c) for (eid, f), c in zip(entries, counts, strict=True)])

    def _messages(self, consumer: str, entries: list[tuple[Any, dict[bytes, bytes], int]]) -> list[Message]:
        messages = []
        for eid, fields, delivered in entries:
            sid = _text(eid)
            attempts = int(fields.get(b"a", b"0")) + delivered
            receipt = f"{consumer}/{delivered}"
            mid = _text(fields.get(b"i", sid))
            enqueued = float(fields.get(b"t", b"0"))
            try:
                payload = self.codec.decode(fields[b"p"])
            except (PayloadError, KeyError) as err:
                # A message nobody can decode would come back forever: dead-letter it now.
                bad = Message(sid, None, attempts, receipt, enqueued)
                self.dead_letter(bad, f"undecodable payload: {err}")
                logger.bind(service=f"queue-{self.name}").error(
                    "Queue {!r}: message {} cannot be decoded and was dead-lettered: {}", self.name, mid, err
                )
                continue
            # Message.id is the first id (stable across retries); the stream id travels in the receipt.
            messages.append(Message(mid, payload, attempts, f"{sid}|{receipt}", enqueued))
        return messages

    @staticmethod
    def _parts(message: Message) -> tuple[str, str, str]:
        sid, _, rest = message.receipt.partition("|")
        if not rest:  # a Message built by _messages before the receipt was joined (dead-letter of bad payloads)
            sid, rest = message.id, message.receipt
        consumer, _, count = rest.rpartition("/")
        return sid, consumer, count

    def ack(self, message: Message) -> bool:
        return self.settle([Settlement(message, "ack")]) == [True]

    def ack_many(self, messages: list[Message]) -> int:
        return sum(self.settle([Settlement(m, "ack") for m in messages]))

    def release(self, message: Message, *, delay: float = 0.0, count_attempt: bool = True) -> bool:
        return self.settle([Settlement(message, "release", delay=delay, count_attempt=count_attempt)]) == [True]

    def dead_letter(self, message: Message, error: str) -> bool:
        return self.settle([Settlement(message, "dead_letter", error=error)]) == [True]

    def _settle_args(self, settlements: list[Settlement]) -> tuple[list[str], list[Any]]:
        now = time.time()
        args: list[Any] = [GROUP, self._hash_prefix, repr(now)]
        for s in settlements:
            sid, consumer, count = self._parts(s.message)
            if s.outcome == "ack":
                args.extend(("a", sid, consumer, count))
            elif s.outcome == "release":
                attempts = s.message.attempts if s.count_attempt else s.message.attempts - 1
                args.extend(("r", sid, consumer, count, attempts, repr(now + max(s.delay, 0.0))))
            else:
                args.extend(("d", sid, consumer, count, s.message.attempts, s.error))
        return [self.stream, self.delayed, self.dead_stream], args

    def settle(self, settlements: list[Settlement]) -> list[bool]:
        if not settlements:
            return []
        keys, args = self._settle_args(settlements)
        return [bool(n) for n in self._scripts_ready()["settle"](keys=keys, args=args)]

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
        if not settlements or time.monotonic() >= self._next_maintenance:
            # Maintenance may claim expired leases instead of reading: the plain path.
            return self.settle(settlements), self.lease(consumer, max_messages=max_messages, wait=wait, token=token)
        redis = _redis_module()
        keys, args = self._settle_args(settlements)
        script = self._scripts_ready()["settle"]
        # One round trip: the settle script runs before the read, so a read that
        # blocks waiting for new messages never holds the settlements back.
        read = ["XREADGROUP", "GROUP", GROUP, consumer, "COUNT", max_messages]
        block = _block_ms(wait)
        if block is not None:
            read.extend(("BLOCK", block))
        read.extend(("STREAMS", self.stream, ">"))
        entries = _entries
        try:
            settled, reply = self._round_trip([["EVALSHA", script.sha, len(keys), *keys, *args], read])
        except (redis.ConnectionError, redis.TimeoutError):
            # A pooled connection the server dropped (restarted, idle timeout): redis-py's
            # own retry policy heals that, so the call goes once more through a pipeline,
            # which applies it. (Either way a settle that did run and is sent again finds
            # its messages gone: they count as lost leases, never as settled twice.)
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=max_messages, block=block)
            settled, reply = pipe.execute(raise_on_error=False)
            entries = _parsed_entries
        if isinstance(settled, redis.exceptions.NoScriptError):
            # The server forgot the script (restarted, SCRIPT FLUSH): this call loads it.
            settled = script(keys=keys, args=args)
        elif isinstance(settled, Exception):
            raise settled
        if isinstance(reply, Exception):
            if not isinstance(reply, redis.ResponseError) or "NOGROUP" not in str(reply):
                raise reply
            self._ensure_group()  # the stream was deleted under us (a purge, FLUSHDB)
            reply = None
        return [bool(n) for n in settled], self._messages(consumer, entries(reply))

    def _round_trip(self, commands: list[list[Any]]) -> list[Any]:
        """Send ``commands`` in one write on one pooled connection: their raw replies, errors as exceptions.

        What a redis-py pipeline does, without its per-call bookkeeping (command stack,
        reply callbacks, retry wrapper), which cost a consumer more CPU per message
        than the round trip it saves. Replies are as the server sent them (no parsing).
        """
        redis = _redis_module()
        pool = self.client.connection_pool
        try:
            conn = pool.get_connection()
        except TypeError:  # redis-py before 5.3 wants a command name (later ones warn if given one)
            conn = pool.get_connection(commands[0][0])
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as err:  # an error reply: the connection is still in step
                    replies.append(err)
            return replies
        except BaseException:
            conn.disconnect()  # a reply may be half read: the connection must not be reused
            raise
        finally:
            pool.release(conn)

    def renew(self, messages: list[Message]) -> int:
        by_consumer: dict[str, list[str]] = {}
        for m in messages:
            sid, consumer, count = self._parts(m)
            by_consumer.setdefault(consumer, []).extend((sid, count))
        renewed = 0
        for consumer, pairs in by_consumer.items():
            renewed += int(self._scripts_ready()["renew"](keys=[self.stream], args=[GROUP, consumer, *pairs]))
        return renewed

    def retire(self, consumer: str) -> None:
        # DELCONSUMER drops the consumer's pending entries from the group, and they
        # would never be delivered again: delete only a consumer with nothing pending.
        if not self._ready().xpending_range(self.stream, GROUP, min="-", max="+", count=1, consumername=consumer):
            self.client.xgroup_delconsumer(self.stream, GROUP, consumer)

    def _scripts_ready(self) -> dict[str, Any]:
        _ = self._ready()
        return self._scripts

    # -- operations ------------------------------------------------------------------

    def stats(self) -> QueueStats:
        # Read-only (it never creates the stream or the group) and two round trips at
        # most: one MULTI for the counts, one XRANGE for the oldest undelivered entry.
        pipe = self.client.pipeline(transaction=True)
        pipe.time()
        pipe.xinfo_groups(self.stream)
        pipe.xlen(self.stream)
        pipe.zcard(self.delayed)
        pipe.xlen(self.dead_stream)
        server_time, groups, length, delayed, dead = pipe.execute(raise_on_error=False)
        for reply in (server_time, length, delayed, dead):
            if isinstance(reply, Exception):
                raise reply
        if isinstance(groups, Exception):
            if "no such key" not in str(groups).lower():
                raise groups
            groups = []  # no stream yet: nothing was ever enqueued without a delay
        group = next((g for g in groups if _text(g.get("name")) == GROUP), None)
        in_flight = 0 if group is None else int(group.get("pending") or 0)
        last = "0-0" if group is None else _text(group.get("last-delivered-id") or "0-0")
        # The group's lag (Redis >= 7) counts the entries not delivered to it yet; it is
        # nil when Redis cannot tell. Acked entries are deleted here, so the stream
        # holds exactly the undelivered and the pending ones: the length less the
        # pending count is the same number on any Redis version.
        lag = None if group is None else group.get("lag")
        undelivered = int(lag) if lag is not None else max(int(length) - in_flight, 0)
        oldest = 0.0
        if undelivered:
            ms, _, seq = last.partition("-")
            after = f"{ms}-{int(seq or 0) + 1}"  # XRANGE's start is inclusive
            first = self.client.xrange(self.stream, min=after, max="+", count=1)
            if first:
                # Both times are the server's clock: the entry id is when it was added
                # (enqueued, or moved back after a retry delay).
                now_ms = int(server_time[0]) * 1000 + int(server_time[1]) // 1000
                oldest = max(now_ms - int(_text(first[0][0]).partition("-")[0]), 0) / 1000
        return QueueStats(self.name, undelivered + int(delayed), in_flight, int(dead), oldest)

    def _dead_entries(self) -> list[tuple[str, dict[bytes, bytes]]]:
        return [(_text(eid), fields) for eid, fields in self.client.xrange(self.dead_stream, "-", "+")]

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        check_positive_int(limit, "limit")
        letters = []
        for eid, f in self.client.xrange(self.dead_stream, "-", "+", count=limit):
            try:
                payload = self.codec.decode(f[b"p"])
            except (PayloadError, KeyError):
                payload = f.get(b"p")
            letters.append(
                DeadLetter(
                    _text(f.get(b"i", eid)),
                    payload,
                    int(f.get(b"a", b"0")),
                    _text(f.get(b"e", b"")),
                    float(f.get(b"f", b"0")),
                )
            )
        return letters

    def requeue_dead(self, ids: Iterable[str] | None = None) -> int:
        wanted = None if ids is None else {str(i) for i in ids}
        moved = 0
        for eid, f in self._dead_entries():
            mid = _text(f.get(b"i", eid))
            if wanted is not None and mid not in wanted:
                continue
            fields = {"p": f.get(b"p", b""), "t": f.get(b"t", b"0"), "a": "0", "i": mid}
            pipe = self.client.pipeline(transaction=True)
            pipe.xadd(self.stream, fields)
            pipe.xdel(self.dead_stream, eid)
            pipe.execute()
            moved += 1
        return moved

    def purge(self) -> int:
        s = self.stats()
        keys = [self.stream, self.delayed, self.dead_stream, *self.client.scan_iter(match=self._hash_prefix + "*")]
        self.client.delete(*keys)
        self._ensure_group()
        return s.depth + s.in_flight + s.dead

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __repr__(self) -> str:
        return (
            f"<RedisStreamQueue {self.name!r} url={self.url!r} stream={self.stream!r} "
            f"codec={self.codec.name!r} lease_time={self.lease_time}>"
        )


_REDIS: list[Any] = []  # redis-py, once imported


def _redis_module() -> Any:
    # Imported on first use, never at module import: `import hostkit.queues` must work
    # without redis-py, and type-checking hostkit must not need it either. Kept once
    # found: a consumer asks for it on every message.
    if not _REDIS:
        _REDIS.append(importlib.import_module("redis"))
    return _REDIS[0]


def _block_ms(wait: float) -> int | None:
    # XREADGROUP blocks in the server and cannot be woken by a token: callers keep
    # `wait` short (the consumer's poll_interval), which bounds the stop latency.
    if wait <= 0:
        return None
    return max(int(wait * 1000), 1)


def _parsed_entries(reply: Any) -> list[tuple[Any, dict[bytes, bytes], int]]:
    """The (id, fields, 1) of each entry of an ``XREADGROUP`` reply as redis-py parsed it."""
    if not reply:
        return []
    # RESP2: [[stream, entries]]; RESP3 (client_options={"protocol": 3}): {stream: [entries]}.
    entries = [e for value in reply.values() for e in value[0]] if isinstance(reply, dict) else reply[0][1]
    return [(eid, fields, 1) for eid, fields in entries if fields]


def _entries(reply: Any) -> list[tuple[Any, dict[bytes, bytes], int]]:
    """The (id, fields, 1) of each entry of a raw ``XREADGROUP`` reply (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else [stream[1] for stream in reply]
    return [
        (eid, dict(zip(flat[::2], flat[1::2], strict=True)), 1)
        for entries in streams
        for eid, flat in entries
        if flat  # an entry deleted while pending has no fields
    ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
