"""``hostkit queue``: inspect a durable queue and re-queue its dead letters."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from . import CliError, debug_option

__all__ = ["register"]

_DESCRIPTION = """\
Inspect a durable queue (hostkit.queues) from the shell: how many messages wait,
how many are being handled, which ones failed for good; and put dead letters back.

The queue is named by NAME plus one backend option:
  --sqlite PATH    the SQLite file of a SQLiteQueue
  --redis URL      the server of a RedisStreamQueue (redis://host:6379/0, unix:///path)

exit codes: 0 done, 2 bad input (missing file, unreachable server, bad option)
"""

_EPILOG = """\
examples:
  hostkit queue stats emails --sqlite /var/lib/app/jobs.db
  hostkit queue dead emails --redis redis://127.0.0.1:6379/0 --limit 20 --json
  hostkit queue requeue emails --sqlite /var/lib/app/jobs.db            (every dead letter)
  hostkit queue requeue emails --sqlite /var/lib/app/jobs.db --id 17 --id 42
"""


def register(subparsers: Any) -> None:
    """Add the ``queue`` subcommand and its actions."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "queue",
        help="inspect a durable queue: depth, in flight, dead letters; re-queue dead letters",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    debug_option(parser)
    actions = parser.add_subparsers(dest="queue_action", metavar="ACTION", required=True)
    for name, help_text in (
        ("stats", "messages waiting, in flight and dead"),
        ("dead", "list dead letters with their last error"),
        ("requeue", "put dead letters back in the queue with fresh attempts"),
    ):
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("name", metavar="NAME", help="the queue's name")
        backend = sub.add_mutually_exclusive_group(required=True)
        backend.add_argument("--sqlite", metavar="PATH", help="the SQLite file of a SQLiteQueue")
        backend.add_argument("--redis", metavar="URL", help="the Redis URL of a RedisStreamQueue")
        sub.add_argument("--prefix", default="hostkit", help="the Redis key prefix (default: hostkit)")
        sub.add_argument(
            "--codec", choices=("json", "pickle"), default="json", help="the queue's payload codec (default: json)"
        )
        if name == "dead":
            sub.add_argument("--limit", type=int, default=50, help="show at most this many (default 50)")
        if name == "requeue":
            sub.add_argument(
                "--id", dest="ids", action="append", metavar="ID", help="only this message (repeatable); default: all"
            )
        if name != "requeue":
            sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        debug_option(sub)
    parser.set_defaults(handler=_command)


def _open(args: argparse.Namespace) -> Any:
    from ..exceptions import ConfigurationError

    try:
        if args.sqlite is not None:
            from ..queues import SQLiteQueue

            if not os.path.exists(args.sqlite):
                msg = f"no queue database at {args.sqlite!r}: check --sqlite (the path the app's SQLiteQueue uses)"
                raise CliError(msg)
            return SQLiteQueue(args.sqlite, args.name, codec=args.codec)
        from ..queues import RedisStreamQueue

        queue = RedisStreamQueue(args.redis, args.name, codec=args.codec, prefix=args.prefix)
        # Making the queue does not connect (a worker may start before its Redis does);
        # this command needs the server now, so ask it here, where the error is caught.
        queue.client.ping()
        return queue
    except ConfigurationError as err:
        raise CliError(str(err)) from None
    except ImportError as err:
        raise CliError(str(err)) from None
    except OSError as err:  # redis-py's ConnectionError is an OSError too
        msg = f"cannot open the queue: {err}"
        raise CliError(msg) from None
    except Exception as err:
        if type(err).__module__.startswith("redis"):
            msg = f"cannot reach Redis at {args.redis!r}: {err}"
            raise CliError(msg) from None
        raise


def _command(args: argparse.Namespace) -> int:
    queue = _open(args)
    try:
        if args.queue_action == "stats":
            stats = queue.stats()
            if args.json:
                print(json.dumps(stats.to_dict()))
            else:
                print(f"queue {stats.name!r}: depth={stats.depth} in_flight={stats.in_flight} dead={stats.dead}")
        elif args.queue_action == "dead":
            if args.limit < 1:
                msg = f"--limit must be >= 1, not: {args.limit}"
                raise CliError(msg)
            letters = queue.dead_letters(args.limit)
            if args.json:
                rows = [
                    {
                        "id": d.id,
                        "payload": d.payload,
                        "attempts": d.attempts,
                        "error": d.error,
                        "failed_at": d.failed_at,
                    }
                    for d in letters
                ]
                print(json.dumps(rows, default=repr))
            else:
                if not letters:
                    print(f"queue {args.name!r}: no dead letters")
                for d in letters:
                    last_line = d.error.strip().splitlines()[-1] if d.error.strip() else ""
                    print(f"{d.id}\tattempts={d.attempts}\t{json.dumps(d.payload, default=repr)}\t{last_line}")
        else:
            count = queue.requeue_dead(args.ids)
            print(f"queue {args.name!r}: {count} dead letter(s) re-queued", file=sys.stdout)
    finally:
        queue.close()
    return 0
