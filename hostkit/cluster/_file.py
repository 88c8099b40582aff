"""The file lock: an ``flock`` for the processes of one machine, with a small state file for its token and ledger.

The lock itself is :class:`~hostkit._once.DeploymentLock` (released by the kernel
however its holder dies). Beside it, ``<lock>.state`` holds the fencing-token
counter and the slot ledger as JSON. It is read and replaced only by the holder of
the flock, so the holder's checks need no second lock: while this process holds
the flock, its token is the current one.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

from .._ledger import SlotState
from .._rundir import check_shared_location, open_private
from ._base import Holder, Lease, LockBackend, slot_text, state_of

__all__ = ["FileLock"]


class FileLock(LockBackend):
    """An exclusive ``flock`` on a file: once per machine (the default lock of ``OncePerDeployment``).

    Args:
        path: the lock file; default: ``default_lock_path`` of the service's class
            name, in hostkit's private runtime directory. A path given here must be in
            a directory other users cannot write (or a sticky one, as ``/tmp``).

    The fencing token is a counter in ``<path>.state``, one higher at every takeover;
    the slot ledger lives in the same file.

    .. versionadded:: 0.2
    """

    kind = "file"

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        if self.path is not None:
            check_shared_location(self.path, "deployment lock")

    def resolve(self, key: str) -> str:
        from .._once import default_lock_path

        return self.path if self.path is not None else default_lock_path(key)

    def check(self) -> None:
        if self.path is None:
            # Make and check the private directory now, so a problem shows at registration.
            from .._once import default_lock_path

            default_lock_path("check")

    def lease(self, key: str) -> FileLease:
        path = self.resolve(key)
        if self.path is not None:
            check_shared_location(path, "deployment lock")
        return FileLease(key, path)

    def __repr__(self) -> str:
        return f"<FileLock {self.path or 'default'!r}>"


class FileLease(Lease):
    backend = "file"

    def __init__(self, key: str, path: str) -> None:
        super().__init__(key, path)
        from .._once import DeploymentLock

        self.lock = DeploymentLock(path)
        self.state_path = path + ".state"

    def try_acquire(self) -> bool:
        if self._held:
            return True
        if not self.lock.try_acquire():
            self.holder = Holder(self.lock.holder_pid, None)
            return False
        try:
            state = self._read()
            token = int(state.get("token", 0)) + 1
            state["token"] = token
            self._write(state)
        except BaseException:
            self.lock.release()
            raise
        self.token = token
        self._held = True
        self.holder = Holder(os.getpid(), None)
        return True

    def _read(self) -> dict[str, Any]:
        fd = open_private(self.state_path, "deployment lock state")
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if not data.strip():
            return {}
        state: dict[str, Any] = json.loads(data)
        return state

    def _write(self, state: dict[str, Any]) -> None:
        # Write a new file and rename it over the old one: a crash mid-write leaves the old
        # state, never half of a new one. The name is unique and created exclusively.
        temp = f"{self.state_path}.{os.getpid()}.{os.urandom(4).hex()}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=True) as f:
                f.write(json.dumps(state, sort_keys=True).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.state_path)
        except BaseException:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            raise

    def release(self) -> None:
        self._held = False
        self.lock.release()

    def is_current(self) -> bool:
        return self._held and self.lock.held and int(self._read().get("token", 0)) == self.token

    def slot_state(self, schedule: str) -> SlotState:
        state = self._read()
        return state_of(state.get("completed", {}).get(schedule), state.get("begun", {}).get(schedule))

    def _slot(self, schedule: str, slot: datetime, step: str) -> bool:
        text = slot_text(slot)
        if not self._held or not self.lock.held:
            return False
        state = self._read()
        if int(state.get("token", 0)) != self.token:
            return False
        begun = state.setdefault("begun", {})
        if step == "begin":
            begun[schedule] = text
        else:
            state.setdefault("completed", {})[schedule] = text
            if begun.get(schedule) == text:
                del begun[schedule]
        self._write(state)
        return True

    def begin_slot(self, schedule: str, slot: datetime) -> bool:
        return self._slot(schedule, slot, "begin")

    def complete_slot(self, schedule: str, slot: datetime) -> bool:
        return self._slot(schedule, slot, "complete")
