"""The process-placed service ``process.py`` starts: defined in an importable module, as an application's is.

A class defined in a function, or in the ``__main__`` of a script, is pickled by
value (its whole code travels to the child); an application's service lives in a
module of its own and is pickled by reference, as this one is.
"""

from __future__ import annotations

from _bare_work import mark

from hostkit import BackgroundService, CancellationToken


class Marker(BackgroundService):
    """Marks its start (see ``_bare_work.mark``), then waits for the stop."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def execute(self, stopping: CancellationToken) -> None:
        mark(self.folder)
        stopping.wait()
