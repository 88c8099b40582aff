"""The private runtime directory: where hostkit keeps files no other local user may touch.

Two kinds of file live there: the once-per-deployment lock
(``<dir>/<Class>-<hash>.lock``) and the contention snapshot that ``hostkit top``
reads (``<dir>/top-<pid>.json``). With predictable names in a world-writable
directory such as ``/tmp``, another local user could plant a symbolic link
there (and a host running as root would truncate the link's target), hold the
lock so the service never runs, or write a fake snapshot. So:

- the directory is ``$XDG_RUNTIME_DIR/hostkit`` when ``$XDG_RUNTIME_DIR`` is a
  directory this user owns that nobody else may write, else
  ``<tempdir>/hostkit-<uid>``; either way hostkit creates it with mode 0700 and,
  before every use, checks that it is a real directory (not a link), owned by
  this user, with no access for group or others. A directory someone else made
  in its place is refused with an error that names it, never used;
- the name depends only on the user and the environment, so the workers of one
  pre-fork server (same user, same environment) find the same lock;
- files are opened with ``O_NOFOLLOW`` (a link in place of the file is an
  error), created with mode 0600, and trusted only when this user owns them.

A path the user chooses (``lock_path=``) gets the same file checks, and its
directory must not let other users replace the file: owned by this user or
root, and writable by nobody else unless it has the sticky bit (as ``/tmp``).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Mapping

from loguru import logger

from .exceptions import UnsafePathError

__all__ = ["check_shared_location", "open_private", "runtime_dir", "runtime_dir_candidates"]

_log = logger.bind(service="hostkit")

# Group or other may write: another user could add, remove or replace entries.
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
# Group or other have any access.
_OTHERS_ANY = stat.S_IRWXG | stat.S_IRWXO


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _owned_private(path: str, uid: int) -> bool:
    """``True`` if ``path`` is a real directory owned by ``uid`` that nobody else may write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & _OTHERS_WRITE


def _locate(uid: int, env: Mapping[str, str], tmp: str) -> str:
    """The runtime directory of user ``uid`` with environment ``env`` (not created, not checked)."""
    xdg = env.get("XDG_RUNTIME_DIR", "")
    # The XDG base directory specification: owned by the user, 0700. One that is not
    # (a variable kept across `su`, say) belongs to someone else and is passed over.
    if os.path.isabs(xdg) and _owned_private(xdg, uid):
        return os.path.join(xdg, "hostkit")
    return os.path.join(tmp, f"hostkit-{uid}")


def _verify_dir(path: str, uid: int) -> None:
    """Raise :class:`UnsafePathError` unless ``path`` is a private directory of ``uid``."""
    st = os.lstat(path)
    fix = f"remove it (it is not hostkit's), or set XDG_RUNTIME_DIR to a directory only uid {uid} can write (mode 0700)"
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        msg = f"hostkit's private directory {path} is {kind}; another local user may have planted it: {fix}"
        raise UnsafePathError(msg)
    if st.st_uid != uid:
        msg = (
            f"hostkit's private directory {path} belongs to uid {st.st_uid}, not to this user "
            f"(uid {uid}); another local user may have made it: {fix}"
        )
        raise UnsafePathError(msg)
    if st.st_mode & _OTHERS_ANY:
        msg = (
            f"hostkit's private directory {path} has mode {_mode(st)}; other users may reach into it. "
            f"It must be 0700: run `chmod 700 {path}`, or remove it"
        )
        raise UnsafePathError(msg)


def runtime_dir(*, create: bool = True) -> str:
    """This user's private directory for hostkit's files, checked before it is returned.

    Args:
        create: make the directory (mode 0700) when it does not exist. With ``False``
            a missing directory is returned as it is, unchecked.

    Raises:
        UnsafePathError: the path is taken by a link, a file, or a directory that
            is not this user's own private one.
    """
    uid = os.geteuid()
    path = _locate(uid, os.environ, tempfile.gettempdir())
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    elif not os.path.lexists(path):
        return path
    _verify_dir(path, uid)
    return path


def runtime_dir_candidates(uid: int, env: Mapping[str, str] | None) -> list[str]:
    """Where process files of user ``uid`` may be, for a reader in another process.

    ``env`` is that process's environment if it could be read. Nothing is created
    or checked here: the reader checks the owner of what it finds.
    """
    tmps = [(env or {}).get(name, "") for name in ("TMPDIR", "TEMP", "TMP")]
    tmps = [t for t in tmps if os.path.isabs(t)] + ["/tmp"]
    found = [_locate(uid, env or {}, tmp) for tmp in tmps]
    return list(dict.fromkeys(found))


def check_shared_location(path: str, what: str) -> None:
    """Check a user-chosen path for a file hostkit shares between its own processes.

    Its directory must not let another user replace the file (owned by this user
    or root; writable by nobody else unless sticky, as ``/tmp``), and a file
    already there must pass :func:`open_private`'s checks.

    Raises:
        UnsafePathError: naming the path, what is wrong, and the fix.
        FileNotFoundError: the directory does not exist.
    """
    parent = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        msg = f"the directory of the {what} {path} does not exist: create {parent}, or choose another path"
        raise FileNotFoundError(errno.ENOENT, msg, parent) from None
    uid = os.geteuid()
    if st.st_uid not in (0, uid):
        msg = (
            f"the {what} {path} is in {parent}, which belongs to uid {st.st_uid}: that user could replace "
            f"the file. Choose a directory this user (uid {uid}) or root owns"
        )
        raise UnsafePathError(msg)
    if st.st_mode & _OTHERS_WRITE and not st.st_mode & stat.S_ISVTX:
        msg = (
            f"the {what} {path} is in {parent} (mode {_mode(st)}), which other users may write without the "
            f"sticky bit: they could replace the file. Choose a directory only this user can write, or "
            f"leave the path to hostkit"
        )
        raise UnsafePathError(msg)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    _check_file(path, st, what)


def _check_file(path: str, st: os.stat_result, what: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        msg = (
            f"the {what} {path} is a symbolic link; hostkit does not follow links there (another local "
            f"user may have planted it): remove it"
        )
        raise UnsafePathError(msg)
    if not stat.S_ISREG(st.st_mode):
        msg = f"the {what} {path} is not a regular file: remove it, or choose another path"
        raise UnsafePathError(msg)
    uid = os.geteuid()
    if st.st_uid != uid:
        msg = (
            f"the {what} {path} belongs to uid {st.st_uid}, not to this user (uid {uid}); another local "
            f"user may have made it: remove it, or choose another path"
        )
        raise UnsafePathError(msg)
    if st.st_nlink != 1:
        # A hard link to one of this user's files (another user may make one where the
        # kernel does not forbid it): writing the pid would overwrite that file.
        msg = (
            f"the {what} {path} has {st.st_nlink} hard links; it may be another file of this user "
            f"linked there: remove it, or choose another path"
        )
        raise UnsafePathError(msg)


def open_private(path: str, what: str) -> int:
    """Open (creating it, mode 0600) a file only this user may use; returns a read-write fd.

    The file is opened with ``O_NOFOLLOW``: a symbolic link in its place is an error,
    never followed. It must be a regular file this user owns. One this user owns that
    others may read or write is set to 0600, with a warning (a process that opened it
    before keeps its access).

    Raises:
        UnsafePathError: a link, not a regular file, or another user's file.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        # ELOOP: a link (O_NOFOLLOW). EACCES/EPERM: the kernel may refuse O_CREAT on another
        # user's entry in a sticky directory. Say which, when that is what is there.
        if err.errno in (errno.ELOOP, errno.EACCES, errno.EPERM):
            try:
                st = os.lstat(path)
            except OSError:
                raise err from None
            _check_file(path, st, what)
        raise
    try:
        st = os.fstat(fd)
        _check_file(path, st, what)
        if st.st_mode & _OTHERS_ANY:
            os.fchmod(fd, 0o600)
            _log.warning(
                "The {} {} had mode {}, open to other users; it is now 0600 (a process that opened it "
                "before keeps its access until it closes it)",
                what,
                path,
                _mode(st),
            )
    except BaseException:
        os.close(fd)
        raise
    return fd
