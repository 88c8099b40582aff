"""The worker side: a worker service that consumes the web app's jobs.

Run it with ``hostkit run worker:create_builder`` from this folder; stop it with
Ctrl+C or SIGTERM: jobs in progress finish (or go back to the queue), nothing is lost.
Run several for more throughput: they share the queue safely.
"""

from __future__ import annotations

from jobs import ResultStore, open_queue
from loguru import logger

from hostkit import HostBuilder, Scope, ServiceProvider
from hostkit.queues import Message, QueueConsumer


class WordCounter(QueueConsumer):
    """Counts the words of each job's text and stores the result."""

    def __init__(self, provider: ServiceProvider) -> None:
        super().__init__(open_queue(), provider=provider, concurrency=2, max_attempts=3, name="wordcount")

    def handle(self, message: Message, scope: Scope) -> None:
        store = scope.get(ResultStore)  # a fresh connection for this job, closed after it
        words = len(message.payload["text"].split())
        store.save(message.id, words)
        logger.info("job {} done: {} words", message.id, words)


def create_builder() -> HostBuilder:
    builder = HostBuilder()
    builder.services.add_scoped(ResultStore)
    builder.services.add_hosted_service(WordCounter)
    return builder
