"""tox's in-repository plugin: let tox find every Python 3 that pyenv installed.

pyenv's shims answer only for the versions that ``PYENV_VERSION`` (or ``pyenv
global``) selects, so a plain ``python3 -m tox`` skipped py310, py312 and py313 on
a machine whose pyenv had all of them. Before tox looks for interpreters, this
plugin puts each ``$PYENV_ROOT/versions/3.*/bin`` directory at the front of
``PATH`` (``PYENV_ROOT`` defaults to ``~/.pyenv``). A machine without pyenv, or
without one of the versions, is left as it is: tox still skips the interpreters
it cannot find (``skip_missing_interpreters``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from tox.config.sets import ConfigSet
    from tox.session.state import State

# The same marker as tox.plugin.impl; made from pluggy (which tox and pytest both
# depend on) so that the test suite can import this file without tox installed.
impl = pluggy.HookimplMarker("tox")

_VERSION = re.compile(r"3\.(\d+)(?:\.(\d+))?")


def _newest_first(directory: Path) -> tuple[int, int, str]:
    match = _VERSION.match(directory.name)
    minor, patch = (int(match[1]), int(match[2] or 0)) if match else (-1, -1)
    return -minor, -patch, directory.name


def pyenv_bin_dirs(environ: Mapping[str, str]) -> list[str]:
    """The ``bin`` directories of pyenv's Python 3 versions, newest first.

    The root is ``environ["PYENV_ROOT"]``, else ``~/.pyenv``; no root, no directories.
    Newest first, so that of two patch releases of one minor version the newer wins.
    """
    root = Path(environ.get("PYENV_ROOT") or Path("~/.pyenv").expanduser())
    versions = [entry for entry in (root / "versions").glob("3.*") if (entry / "bin").is_dir()]
    return [str(entry / "bin") for entry in sorted(versions, key=_newest_first)]


def path_with_pyenv(environ: Mapping[str, str]) -> str:
    """``environ["PATH"]`` with pyenv's version directories in front (those not on it already).

    In front of pyenv's shims: without ``PYENV_VERSION`` a shim such as ``python3.10``
    fails instead of running the interpreter that the version directory holds.
    """
    path = environ.get("PATH", "")
    present = set(path.split(os.pathsep))
    added = [directory for directory in pyenv_bin_dirs(environ) if directory not in present]
    return os.pathsep.join([*added, path] if path else added)


@impl
def tox_add_core_config(core_conf: ConfigSet, state: State) -> None:
    """Runs once, before tox looks for any environment's interpreter."""
    os.environ["PATH"] = path_with_pyenv(os.environ)
