"""``hostkit new worker NAME``: generate a worker-service project from the bundled template."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from . import CliError, debug_option

__all__ = ["TEMPLATES", "register", "render_project"]

TEMPLATES = Path(__file__).parent / "templates"
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")


def register(subparsers: Any) -> None:
    """Add the ``new`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "new",
        help="generate a new project (worker: a standalone worker service)",
        description=(
            "Generate a worker-service project: setup.cfg, a package with a BackgroundService and\n"
            "health checks, tests that pass out of the box, a systemd unit (Type=notify, WatchdogSec),\n"
            "a Dockerfile (tini, HEALTHCHECK), and a Kubernetes Deployment with probes wired.\n\n"
            "hostkit is published as pyhostkit. Until your index has it, put a pyhostkit wheel in\n"
            "the project's wheels/ (see wheels/README.md): pip and the Dockerfile install from there."
        ),
        epilog=(
            "example:\n  hostkit new worker billing-sync && cd billing-sync"
            " && pip install --find-links wheels/ -e '.[test]' && pytest"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=("worker",), help="what to generate")
    parser.add_argument("name", metavar="NAME", help="the project name, like billing-sync (package: billing_sync)")
    parser.add_argument("--directory", "-d", metavar="DIR", help="where to write it (default ./NAME)")
    parser.add_argument("--probe-port", type=int, default=8081, metavar="PORT", help="the probe port (default 8081)")
    parser.add_argument("--force", action="store_true", help="write into a directory that is not empty")
    debug_option(parser)
    parser.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    target = Path(args.directory) if args.directory else Path(args.name)
    written = render_project(args.kind, args.name, target, probe_port=args.probe_port, force=args.force)
    package = _package(args.name)
    print(f"Created {len(written)} files in {target}/")
    print(f"  cd {target} && pip install --find-links wheels/ -e '.[test]' && pytest")
    print(f"  hostkit run {package}.app:create_builder --probe-port {args.probe_port}")
    return 0


def _package(name: str) -> str:
    return name.replace("-", "_").lower()


def render_project(kind: str, name: str, target: Path, *, probe_port: int = 8081, force: bool = False) -> list[Path]:
    """Write the ``kind`` template for project ``name`` into ``target``; return the files written.

    Placeholders ``{{project}}``, ``{{package}}``, ``{{class_name}}``, ``{{probe_port}}``
    and ``{{hostkit_version}}`` are replaced in file contents, and ``__package__`` and
    ``__project__`` in paths; a name starting with ``__dot__`` starts with ``.`` instead
    (packaging leaves hidden files such as ``.dockerignore`` out of the wheel); a
    trailing ``.tmpl`` is dropped (it keeps template ``.py`` files away from linters,
    type checkers and test collectors of hostkit itself).

    Raises:
        CliError: a bad name or port, an unknown kind, or a non-empty target without ``force``.
    """
    from .. import __version__

    if not _NAME.match(name):
        msg = (
            f"NAME must start with a letter and hold only letters, digits, '-' and '_' "
            f"(like billing-sync), not: {name!r}"
        )
        raise CliError(msg)
    if not 1 <= probe_port <= 65535:
        msg = f"--probe-port must be from 1 to 65535, not: {probe_port}"
        raise CliError(msg)
    source = TEMPLATES / kind
    if not source.is_dir():
        msg = f"no template {kind!r}; available: {', '.join(sorted(p.name for p in TEMPLATES.iterdir()))}"
        raise CliError(msg)
    if target.exists() and not target.is_dir():
        msg = f"{target} exists and is not a directory"
        raise CliError(msg)
    if target.is_dir() and any(target.iterdir()) and not force:
        msg = f"{target} exists and is not empty; choose another --directory or pass --force"
        raise CliError(msg)
    package = _package(name)
    values = {
        "project": name,
        "package": package,
        "class_name": "".join(part.capitalize() for part in re.split(r"[-_]", name) if part) + "Worker",
        "probe_port": str(probe_port),
        "hostkit_version": __version__,
    }
    written = []
    for path in sorted(source.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        relative = str(path.relative_to(source)).replace("__package__", package).replace("__project__", name)
        relative = relative.removesuffix(".tmpl")
        relative = str(Path(relative).with_name(re.sub(r"\A__dot__", ".", Path(relative).name)))
        text = path.read_text(encoding="utf-8")
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", value)
        out = target / relative
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        written.append(out)
    return written
