"""A CPU-heavy background service, moved out of the host's process by one argument.

``PrimeCounter`` counts primes in pure Python: the kind of work that, in a thread,
holds the GIL and slows every request thread of a web app. Registered with
``placement="thread"`` it runs in the host's process; with ``placement="process"``
(the default here) the very same class runs in a child process, with its own GIL,
and the host still starts it, stops it, restarts it and collects its logs.

Run it from the repository root and stop it with Ctrl+C or ``kill -TERM <pid>``;
it exits with code 0::

    python3 examples/cpu_heavy.py                 # placement="process"
    python3 examples/cpu_heavy.py --placement thread

Compare the two ``pid`` values in the lines it prints.
"""

from __future__ import annotations

import argparse
import os

from loguru import logger

from hostkit import BackgroundService, CancellationToken, HostBuilder, HostOptions, RestartPolicy, configure_logging


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


class PrimeCounter(BackgroundService):
    """Counts primes in chunks; between chunks it checks its token, so a stop is prompt."""

    def __init__(self, chunk: int = 20_000) -> None:
        self.chunk = chunk

    def execute(self, stopping: CancellationToken) -> None:
        start, found, rounds = 0, 0, 0
        while not stopping.is_set():
            found += sum(1 for n in range(start, start + self.chunk) if is_prime(n))
            start += self.chunk
            rounds += 1
            if rounds % 5 == 1:
                logger.info("PrimeCounter: {} primes below {:,} (pid {})", found, start, os.getpid())
        logger.info("PrimeCounter: stopping after {:,} numbers", start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--placement", choices=("thread", "process"), default="process")
    args = parser.parse_args()
    configure_logging()

    builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
    builder.services.add_hosted_service(
        PrimeCounter(),
        placement=args.placement,  # the one argument that moves the work
        restart=RestartPolicy(max_restarts=3, window=60),
    )
    host = builder.build()
    logger.info("Host pid {}; PrimeCounter runs with placement={!r}", os.getpid(), args.placement)
    return host.run()


if __name__ == "__main__":
    # The guard matters for placement="process": the child may import this module.
    raise SystemExit(main())
