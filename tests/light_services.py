"""Process-placed services for the spawn import tests; a spawned child imports this module.

It imports what a typical service module imports from hostkit and nothing heavy:
no loguru (unless a service imports it itself), no psutil, no pytest. The services
talk to the test through stdlib ``logging``, which a child forwards to the host with
or without loguru.
"""

from __future__ import annotations

import logging
import os
import sys

from hostkit import BackgroundService, CancellationToken

log = logging.getLogger(__name__)

#: Modules the host side of hostkit uses and a child should not import on its own.
HEAVY = ("loguru", "psutil", "tenacity")


def heavy_imported() -> str:
    return ",".join(m for m in HEAVY if m in sys.modules) or "none"


class ReportsImports(BackgroundService):
    """Says which heavy modules its child has imported, and logs an exception, through stdlib logging only."""

    def execute(self, stopping: CancellationToken) -> None:
        log.warning("heavy modules in the child: %s", heavy_imported())
        try:
            raise KeyError("missing")
        except KeyError:
            log.exception("stdlib exception in the child")
        stopping.wait()


class ImportsLoguruLate(BackgroundService):
    """Imports loguru only inside execute(); logs through both before and after the import and after the stop."""

    def execute(self, stopping: CancellationToken) -> None:
        log.warning("stdlib before loguru (loguru already imported: %s)", "loguru" in sys.modules)
        from loguru import logger

        logger.info("loguru line {}", 1)
        log.warning("stdlib after loguru")
        stopping.wait()
        logger.info("loguru after the stop")


class WritesImports(BackgroundService):
    """Writes which heavy modules its child has imported to a file, and never logs."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def execute(self, stopping: CancellationToken) -> None:
        with open(self.path + ".tmp", "w") as out:
            out.write(heavy_imported())
        os.replace(self.path + ".tmp", self.path)
        stopping.wait()


#: Standard-library modules a child's start has no use for (hostkit.exceptions derives from
#: concurrent.futures and queue; a duration given as a timedelta needs datetime).
UNNEEDED_STDLIB = ("concurrent.futures", "queue", "datetime")


class WritesStdlibImports(BackgroundService):
    """Writes which of :data:`UNNEEDED_STDLIB` its child has imported to a file, and never logs."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def execute(self, stopping: CancellationToken) -> None:
        found = ",".join(m for m in UNNEEDED_STDLIB if m in sys.modules) or "none"
        with open(self.path + ".tmp", "w") as out:
            out.write(found)
        os.replace(self.path + ".tmp", self.path)
        stopping.wait()


class LogsThroughLoguruLate(BackgroundService):
    """Logs through loguru only, imported inside execute(), never at the top of its module."""

    def execute(self, stopping: CancellationToken) -> None:
        before = "loguru" in sys.modules
        from loguru import logger

        logger.bind(colour="green").warning("late loguru line (loguru imported before: {})", before)
        stopping.wait()


class FailsToClose:
    """A singleton whose ``close()`` raises: the child's container logs it when the service ends."""

    def close(self) -> None:
        raise OSError("disk went away")


class UsesFailsToClose(BackgroundService):
    def __init__(self, resource: FailsToClose) -> None:
        self.resource = resource

    def execute(self, stopping: CancellationToken) -> None:
        log.warning("running with %s", type(self.resource).__name__)
        stopping.wait()
