"""``hostkit top PID``: a live table of a running host's services, from its contention monitor.

The host publishes its snapshot when its :class:`~hostkit.contention.ContentionMonitor`
runs with ``publish=True`` (``HOSTKIT_CONTENTION = {"publish": True}`` in Flask,
``"CONTENTION": {"publish": True}`` in Django): a JSON file,
``$TMPDIR/hostkit-top-<pid>.json``, replaced atomically every interval. That file
is the control address: ``hostkit top`` attaches by pid (or ``--file PATH``) and
needs no port, no extra thread in the host, and works under any server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, TextIO

from .._util import pid_alive
from . import CliError, debug_option

__all__ = ["read_snapshot", "register", "render"]

_DESCRIPTION = """\
Show a live table of a running host's services: CPU of each service's thread or
child process, the process's CPU, RSS and threads, the scheduling-lag probe, request
latency, and any recommendation ("move X to placement='process'").

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


def read_snapshot(path: str) -> dict[str, Any]:
    """Load a published snapshot; :class:`CliError` naming the fix when there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        msg = (
            f"no snapshot at {path}: is the host running with a ContentionMonitor(publish=True) "
            f"(Flask: HOSTKIT_CONTENTION = {{'publish': True}})?"
        )
        raise CliError(msg, code=1) from None
    except (OSError, ValueError) as err:
        msg = f"cannot read the snapshot {path}: {err}"
        raise CliError(msg, code=1) from None
    return data


def _fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}{unit}"


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / 1048576:.0f}M"


def render(snap: dict[str, Any]) -> str:
    """The snapshot as a text table."""
    proc = snap["process"]
    lag = snap.get("lag") or {}
    req = snap.get("requests") or {}
    when = time.strftime("%H:%M:%S", time.localtime(snap["time"]))
    lines = [
        f"hostkit top  pid {snap['pid']}  {when}  cpu {_fmt(proc['cpu_percent'], '%')}  rss {_mib(proc['rss'])}  "
        f"threads {proc['threads']}  ctx/s {_fmt(proc.get('ctx_voluntary'))}+{_fmt(proc.get('ctx_involuntary'))}",
        f"lag p50/p99/max {_fmt(lag.get('p50'), '', 1)}/{_fmt(lag.get('p99'), '', 1)}/{_fmt(lag.get('max'), '', 1)} ms"
        f"   requests n={req.get('count', '-')} p50/p99 {_fmt(req.get('p50'), '', 1)}/{_fmt(req.get('p99'), '', 1)} ms"
        f"   monitor {_fmt(snap.get('monitor_cpu_percent'), '%', 2)}",
        "",
        f"{'SERVICE':<28} {'PLACEMENT':<9} {'STATE':<10} {'PID':>7} {'TID':>7} {'CPU%':>6} {'RSS':>6}",
    ]
    for s in snap["services"]:
        lines.append(
            f"{s['name'][:28]:<28} {s['placement'] or 'hosted':<9} {s['state']:<10} {s['pid'] or '-':>7} "
            f"{s['thread_id'] or '-':>7} {_fmt(s['cpu_percent']):>6} {_mib(s.get('rss')):>6}"
        )
    for line in snap.get("advice") or []:
        lines.append(f"advice: {line}")
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> int:
    from ..contention import snapshot_path

    if args.file is None and args.pid is None:
        msg = "give the host's PID or --file PATH"
        raise CliError(msg)
    if not args.interval > 0:
        msg = f"--interval must be > 0 seconds, not: {args.interval}"
        raise CliError(msg)
    path = args.file or snapshot_path(args.pid)
    try:
        return _show(args, path, sys.stdout)
    except BrokenPipeError:
        # `hostkit top PID --once | head`: the reader left; that is not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


def _show(args: argparse.Namespace, path: str, out: TextIO) -> int:
    if args.once:
        snap = read_snapshot(path)
        print(json.dumps(snap, indent=2, sort_keys=True) if args.json else render(snap), file=out)
        return 0
    while True:
        if args.pid is not None and not pid_alive(args.pid):
            print(f"process {args.pid} has exited", file=out)
            return 0
        snap = read_snapshot(path)
        # Clear the screen and home the cursor: a live view without curses.
        out.write("\x1b[2J\x1b[H" + render(snap) + "\n")
        out.flush()
        time.sleep(args.interval)
