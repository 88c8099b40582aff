"""``hostkit top PID``: a live table of a running host's services, from its contention monitor.

The host publishes its snapshot when its :class:`~hostkit.contention.ContentionMonitor`
runs with ``publish=True`` (``HOSTKIT_CONTENTION = {"publish": True}`` in Flask,
``"CONTENTION": {"publish": True}`` in Django): a JSON file, ``top-<pid>.json`` in
hostkit's private runtime directory of the host's user, replaced atomically every
interval. That file is the control address: ``hostkit top`` attaches by pid (or
``--file PATH``) and needs no port, no extra thread in the host, and works under
any server.

A snapshot is shown only if it is a regular file (a link is not followed) owned by
the host's user or root and writable by nobody else, and every text in it is printed
with its control characters escaped: a snapshot cannot move the cursor, retitle the
terminal or hide a line.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import stat
import sys
import time
from typing import Any, TextIO

from .._util import pid_alive
from .._validate import to_seconds
from ..exceptions import UnsafePathError
from . import CliError, debug_option

__all__ = ["read_snapshot", "register", "render"]

_DESCRIPTION = """\
Show a live table of a running host's services: CPU of each service's thread or
child process, the process's CPU, RSS and threads, the scheduling-lag probe, request
latency, each child's CPU priority and CPUs, and any recommendation ("move X to
placement='process'", "give X cpu_priority='low'").

The host must run a ContentionMonitor with publish=True.
"""


def register(subparsers: Any) -> None:
    """Add the ``top`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "top",
        help="live table of a running host's services (CPU, lag, latency, advice)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("pid", nargs="?", type=int, help="the host's process id")
    parser.add_argument("--file", metavar="PATH", help="read this snapshot file instead of the pid's")
    parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="refresh every (default 1)")
    parser.add_argument("--once", action="store_true", help="print one table and exit")
    parser.add_argument("--json", action="store_true", help="print the raw snapshot as JSON (with --once)")
    debug_option(parser)
    parser.set_defaults(handler=_command)


# A snapshot is a few kilobytes; anything much larger is not one.
_MAX_BYTES = 4 * 1024 * 1024


def read_snapshot(path: str, *, owners: set[int] | None = None) -> dict[str, Any]:
    """Load a published snapshot; :class:`CliError` naming the fix when there is none or it is not trusted.

    Args:
        path: the snapshot file. A symbolic link there is refused, not followed.
        owners: the uids that may own it (default: this user and root).
    """
    trusted = owners if owners is not None else {os.geteuid(), 0}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        msg = (
            f"no snapshot at {path}: is the host running with a ContentionMonitor(publish=True) "
            f"(Flask: HOSTKIT_CONTENTION = {{'publish': True}})?"
        )
        raise CliError(msg, code=1) from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            msg = f"{path} is a symbolic link; hostkit top does not follow links to snapshots (not shown)"
        else:
            msg = f"cannot read the snapshot {path}: {err}"
        raise CliError(msg, code=1) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            msg = f"{path} is not a regular file, so not a snapshot hostkit wrote (not shown)"
            raise CliError(msg, code=1)
        if st.st_uid not in trusted:
            expected = " or ".join(f"uid {uid}" for uid in sorted(trusted))
            msg = (
                f"the snapshot {path} belongs to uid {st.st_uid}, not to {expected}: another local user "
                f"may have written it, so it is not shown"
            )
            raise CliError(msg, code=1)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            msg = f"the snapshot {path} may be written by other users (mode {stat.S_IMODE(st.st_mode):04o}): not shown"
            raise CliError(msg, code=1)
        blob = f.read(_MAX_BYTES + 1)
    try:
        if len(blob) > _MAX_BYTES:
            msg = f"over {_MAX_BYTES} bytes"
            raise ValueError(msg)
        data = json.loads(blob)
        if not isinstance(data, dict):
            msg = "not a JSON object"
            raise ValueError(msg)
    except ValueError as err:
        msg = f"cannot read the snapshot {path}: {_clean(err)}"
        raise CliError(msg, code=1) from None
    return data


def _clean(value: object) -> str:
    """``value`` as text with every control and format character escaped (``\\x1b``, ``\\u202e``)."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    if not isinstance(value, (int, float)):
        msg = f"a number was expected, not: {value!r}"
        raise TypeError(msg)
    return f"{value:.{digits}f}{unit}"


def _mib(value: Any) -> str:
    return "-" if value is None else _fmt(value / 1048576, "M")


def _cell(name: str, width: int) -> str:
    """``name`` cut to ``width``; a replica keeps its ``[index]``, or its rows would look alike."""
    if len(name) <= width:
        return name
    m = re.fullmatch(r"(.*)(\[[0-9]+\])", name)
    if m is None or len(m.group(2)) >= width:
        return name[:width]
    return m.group(1)[: width - len(m.group(2))] + m.group(2)


def render(snap: dict[str, Any]) -> str:
    """The snapshot as a text table; every text from it is escaped (see :func:`_clean`)."""
    proc = snap["process"]
    lag = snap.get("lag") or {}
    req = snap.get("requests") or {}
    when = time.strftime("%H:%M:%S", time.localtime(snap["time"]))
    lines = [
        f"hostkit top  pid {_clean(snap['pid'])}  {when}  cpu {_fmt(proc['cpu_percent'], '%')}  "
        f"rss {_mib(proc['rss'])}  threads {_clean(proc['threads'])}  "
        f"ctx/s {_fmt(proc.get('ctx_voluntary'))}+{_fmt(proc.get('ctx_involuntary'))}",
        f"lag p50/p99/max {_fmt(lag.get('p50'), '', 1)}/{_fmt(lag.get('p99'), '', 1)}/{_fmt(lag.get('max'), '', 1)} ms"
        f"   requests n={_clean(req.get('count', '-'))} p50/p99 {_fmt(req.get('p50'), '', 1)}/"
        f"{_fmt(req.get('p99'), '', 1)} ms   monitor {_fmt(snap.get('monitor_cpu_percent'), '%', 2)}",
        "",
        f"{'SERVICE':<28} {'PLACEMENT':<9} {'STATE':<10} {'PID':>7} {'TID':>7} {'CPU%':>6} {'RSS':>6} "
        f"{'PRIORITY':<14} {'CPUS':<7}  DETAIL",
    ]
    for s in snap["services"]:
        lines.append(
            f"{_cell(_clean(s['name']), 28):<28} {_clean(s['placement'] or 'hosted'):<9} {_clean(s['state']):<10} "
            f"{_clean(s['pid'] or '-'):>7} {_clean(s['thread_id'] or '-'):>7} {_fmt(s['cpu_percent']):>6} "
            f"{_mib(s.get('rss')):>6} {_priority(s.get('cpu_priority')):<14} {_cpus(s):<7}  "
            f"{_clean(s.get('detail') or '')}".rstrip()
        )
    for line in snap.get("advice") or []:
        lines.append(f"advice: {_clean(line)}")
    return "\n".join(lines)


def _priority(text: object) -> str:
    """A child's CPU priority, short: ``nice 19``, ``batch 19``, ``idle``, ``inherited``; ``-`` for a thread."""
    if not text:
        return "-"
    short = str(text).replace("SCHED_BATCH, nice ", "batch ").replace("SCHED_IDLE", "idle")
    return _clean(short)[:14]


def _cpus(service: dict[str, Any]) -> str:
    """A child's CPUs as ranges (``1``, ``1-3``, ``0,2``), ``all`` when it is not pinned; ``-`` for no child."""
    if service.get("placement") != "process":
        return "-"
    cpus = service.get("cpu_affinity")
    if cpus is None:
        return "all"
    runs: list[list[int]] = []
    for n in sorted(int(c) for c in cpus):
        if runs and runs[-1][-1] == n - 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _render(snap: dict[str, Any], path: str) -> str:
    """:func:`render`, or a :class:`CliError` for a snapshot that is not in hostkit's shape."""
    try:
        return render(snap)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, OSError) as err:
        msg = f"the snapshot {path} is not one hostkit wrote ({type(err).__name__}: {_clean(err)})"
        raise CliError(msg, code=1) from None


def _host_user(pid: int) -> tuple[int | None, dict[str, str] | None]:
    """The effective uid of process ``pid`` and its environment (``None`` where it cannot be read)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        uid: int = proc.uids().effective
    except psutil.Error:
        return None, None
    try:
        env: dict[str, str] | None = proc.environ()
    except psutil.Error:
        env = None
    return uid, env


def _locate(pid: int) -> tuple[str, set[int]]:
    """Where process ``pid`` publishes its snapshot, and who may own it.

    The host's runtime directory depends on its user and environment: tried first as
    this process would compute it, then as the host's own environment says.
    """
    from .._rundir import runtime_dir_candidates
    from ..contention import snapshot_path

    uid, env = _host_user(pid)
    candidates = []
    unsafe: UnsafePathError | None = None
    try:
        candidates.append(snapshot_path(pid))
    except UnsafePathError as err:
        unsafe = err  # this user's own directory is not usable; the host's may still be
    if uid is not None:
        candidates += [os.path.join(d, f"top-{pid}.json") for d in runtime_dir_candidates(uid, env)]
    owners = {0, os.geteuid() if uid is None else uid}
    for path in dict.fromkeys(candidates):
        if os.path.lexists(path):
            return path, owners
    if unsafe is not None:
        raise CliError(str(unsafe), code=1)
    return candidates[0], owners


def _command(args: argparse.Namespace) -> int:
    if args.file is None and args.pid is None:
        msg = "give the host's PID or --file PATH"
        raise CliError(msg)
    try:
        to_seconds(args.interval, "--interval", allow_zero=False)
    except ValueError as err:
        raise CliError(str(err)) from None
    if args.file is not None:
        path = args.file
        owners = {os.geteuid(), 0}
        if args.pid is not None:
            uid, _ = _host_user(args.pid)
            owners |= set() if uid is None else {uid}
    else:
        path, owners = _locate(args.pid)
    try:
        return _show(args, path, owners, sys.stdout)
    except BrokenPipeError:
        # `hostkit top PID --once | head`: the reader left; that is not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


def _show(args: argparse.Namespace, path: str, owners: set[int], out: TextIO) -> int:
    if args.once:
        snap = read_snapshot(path, owners=owners)
        # json.dumps escapes control characters itself (ensure_ascii).
        print(json.dumps(snap, indent=2, sort_keys=True) if args.json else _render(snap, path), file=out)
        return 0
    while True:
        if args.pid is not None and not pid_alive(args.pid):
            print(f"process {args.pid} has exited", file=out)
            return 0
        snap = read_snapshot(path, owners=owners)
        # Clear the screen and home the cursor: a live view without curses.
        out.write("\x1b[2J\x1b[H" + _render(snap, path) + "\n")
        out.flush()
        time.sleep(args.interval)
