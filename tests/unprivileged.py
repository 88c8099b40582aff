"""Act as another local user in a test: the attacker of the shared-directory tests.

The suite runs as root, so a subprocess can drop to an unprivileged uid (``nobody``)
with ``subprocess``'s ``user=``/``group=``/``extra_groups=``. Only system tools
(``sh``, ``ln``, ``flock``) run as that user: the interpreter of the test venv may
live where that user cannot read it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["ATTACKER", "attacker_popen", "attacker_run", "make_shared_dir", "need_attacker"]


def _attacker_uid() -> int:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534  # a uid with no account works as well for file permissions


#: The uid (and gid) the "other local user" runs as.
ATTACKER = _attacker_uid()


def need_attacker() -> None:
    """Skip the calling test when this process cannot act as another user."""
    if os.geteuid() != 0:
        pytest.skip("acting as another local user needs root (to drop to an unprivileged uid)")
    missing = [tool for tool in ("sh", "ln", "flock") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the attacker's tools are missing: {', '.join(missing)}")


def _as_attacker() -> dict[str, Any]:
    return {"user": ATTACKER, "group": ATTACKER, "extra_groups": [], "cwd": "/", "env": {"PATH": os.defpath}}


def attacker_run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a command as the unprivileged user; its result (never raises for a non-zero exit)."""
    return subprocess.run(list(args), capture_output=True, text=True, timeout=20, check=False, **_as_attacker())


def attacker_popen(*args: str) -> subprocess.Popen[str]:
    """Start a command as the unprivileged user; the caller stops it (by its pid)."""
    return subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **_as_attacker())


@contextlib.contextmanager
def make_shared_dir() -> Iterator[Path]:
    """A world-writable sticky directory, like /tmp, that the unprivileged user can reach."""
    path = Path(tempfile.mkdtemp(prefix="hostkit-shared-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
