"""Durable work queues: the web app enqueues, worker services consume.

One API, two backends:

* :class:`SQLiteQueue`: one SQLite file (WAL), several producer and consumer
  processes on one machine, no server.
* :class:`RedisStreamQueue`: a Redis stream with a consumer group, any number of
  consumer replicas on any machines (needs ``pip install 'pyhostkit[redis]'``;
  redis-py is imported only when a :class:`RedisStreamQueue` is made).

:class:`QueueConsumer` is the background service that consumes either one:
lease, run the handler in a DI scope, ack on success, retry with a tenacity
back-off, dead-letter after ``max_attempts``, re-deliver when a consumer dies
(lease expiry). Delivery is at least once: make handlers idempotent. When the
broker cannot be reached, at start-up or later, the consumer waits with a capped
back-off, one log line per try, and reports itself not ready until it is back.

Data flow of one message::

    producer (any process)            backend (SQLite file | Redis stream)     QueueConsumer (worker host)
    queue.enqueue(payload) ---------> waiting
                                      waiting --- lease(consumer, n) -------> consumer thread (concurrency=N)
                                      leased (receipt, lease_time)            handler(message, scope) in a DI scope
                                      leased  <--- renew (long handlers) ---- lease renewer
                                      gone    <--- ack (after success) ------ ok
                                      waiting <--- release / retry(delay) --- raised: tenacity back-off
                                      dead    <--- dead-letter -------------- max_attempts reached
                                      waiting <--- lease expired ------------ consumer died (re-delivery)
    broker unreachable: _outage.Link, one thread retries (tenacity, on the stopping token), the rest wait;
    readiness() says "broker unavailable" until a lease succeeds again.

Example::

    from hostkit import HostBuilder
    from hostkit.queues import QueueConsumer, SQLiteQueue

    jobs = SQLiteQueue("/var/lib/app/jobs.db", "emails")
    jobs.enqueue({"to": "a@example.com"})  # from any process, e.g. a request handler

    def send(message, scope):
        mailer = scope.get(Mailer)
        mailer.send(**message.payload)

    builder = HostBuilder()
    builder.services.add_hosted_service(QueueConsumer(jobs, send, concurrency=4))

.. versionadded:: 0.1
"""

from __future__ import annotations

from ._base import DeadLetter, Message, Queue, QueueStats, Settlement
from ._codec import Codec, CodecName, JsonCodec, PickleCodec
from ._consumer import Handler, QueueConsumer
from ._redis import RedisStreamQueue
from ._sqlite import Durability, SQLiteQueue

__all__ = [
    "Codec",
    "CodecName",
    "DeadLetter",
    "Durability",
    "Handler",
    "JsonCodec",
    "Message",
    "PickleCodec",
    "Queue",
    "QueueConsumer",
    "QueueStats",
    "RedisStreamQueue",
    "SQLiteQueue",
    "Settlement",
]
