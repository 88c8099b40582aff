"""What a bare ``multiprocess`` child runs in ``process.py``; importable, so a child finds it by name.

It imports nothing beyond the standard library: a bare child must not pay for
hostkit's imports when it unpickles its target.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def mark(folder: str) -> None:
    """A child's first act: a file named by its pid, holding the time it began."""
    path = Path(folder, str(os.getpid()))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(repr(time.time()))
    tmp.rename(path)


def bare_target(folder: str, stop: Any) -> None:
    mark(folder)
    stop.wait()
