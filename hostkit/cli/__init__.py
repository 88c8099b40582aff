"""The ``hostkit`` command: one small module per subcommand.

Each subcommand module has ``register(subparsers)``, which adds its parser and
sets ``handler`` (a function ``(args) -> int``). To add one, write the module
and list it in :data:`SUBCOMMANDS`.

Errors the user can fix (a bad ``MODULE:ATTR``, a port in use, an unreachable
``NOTIFY_SOCKET``) raise :class:`CliError`: :func:`main` prints one line,
``hostkit <command>: error: ...``, and returns its exit code (2 by default); the
traceback is printed only with ``--debug``.

.. versionadded:: 0.1
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

__all__ = ["SUBCOMMANDS", "CliError", "main"]

#: Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS = ("run", "probe", "new", "top", "queue")

USAGE_ERROR = 2


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit code ``code``."""

    def __init__(self, message: str, *, code: int = USAGE_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="hostkit",
        description=(
            "hostkit: run and operate worker services built on hostkit's Host.\n\n"
            "  hostkit run myworker.app:create_builder     run a worker (systemd and probes included)\n"
            "  hostkit probe http://127.0.0.1:8081/health/live   exit 0 if healthy (exec probes, HEALTHCHECK)\n"
            "  hostkit new worker my-worker                 start a new worker project\n"
            "  hostkit top 12345                            live table of a running host's services"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hostkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        module.register(subparsers)
    return parser


def debug_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--debug`` to a subcommand's parser (also accepted before the command)."""
    # SUPPRESS: without it, the subparser's default False would overwrite a
    # `hostkit --debug run ...` given before the command.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print tracebacks of errors")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hostkit`` command line; return the exit code.

    .. versionadded:: 0.1
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    try:
        code: int = args.handler(args)
    except CliError as err:
        if args.debug:
            traceback.print_exc()
        print(f"hostkit {args.command}: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print(f"hostkit {args.command}: interrupted", file=sys.stderr)
        return 130
    return code
