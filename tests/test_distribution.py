"""The distribution is pyhostkit: no install line that users read or are told names the index's 'hostkit'.

The name ``hostkit`` on the public package index belongs to an unrelated project, so an
install line with it (``pip install 'hostkit[flask]'``) installs that project instead.
"""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

from tests.conftest import PROJECT_ROOT

ROOT = Path(PROJECT_ROOT)
# Everything a user reads or is told: the README, the docs, messages and docstrings of the
# package, the project template, the examples and the benchmarks.
SCANNED = ("README.md", "docs/**/*.md", "hostkit/**/*", "examples/**/*", "benchmarks/**/*")
PIP_INSTALL = re.compile(r"pip3? (?:install|download|wheel)\b([^\n`\"]*)")


def install_lines() -> list[tuple[str, str]]:
    """``(file, arguments)`` of every ``pip install|download|wheel`` in the scanned files."""
    found = []
    for pattern in SCANNED:
        for path in sorted(ROOT.glob(pattern)):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            found += [(str(path.relative_to(ROOT)), m[1]) for m in PIP_INSTALL.finditer(text)]
    return found


def requirement_names(arguments: str) -> list[str]:
    """The distribution names that a pip command line's arguments ask for (paths and options left out)."""
    try:
        words = shlex.split(arguments, comments=True)
    except ValueError:  # an unbalanced quote in prose: the words as they are
        words = arguments.split()
    names = []
    for word in words:
        if word in ("&&", "||", ";", "|"):
            break  # the next command
        if word.startswith(("-", ".", "/", "~", "$", "<", "'", '"')) or "/" in word:
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", word)
        if match:
            names.append(match[0].lower())
    return names


class TestDistributionName:
    def test_setup_cfg_publishes_pyhostkit_with_the_hostkit_command(self) -> None:
        """The distribution is pyhostkit; the import package and the console script stay hostkit."""
        config = configparser.ConfigParser()
        config.read(ROOT / "setup.cfg")
        assert config["metadata"]["name"] == "pyhostkit"
        assert config["options.packages.find"]["include"].split(", ")[0] == "hostkit"
        assert config["options.entry_points"]["console_scripts"].split() == ["hostkit", "=", "hostkit.cli:main"]

    def test_no_install_line_names_the_index_hostkit(self) -> None:
        """Every pip line in the README, docs, messages, template, examples and benchmarks asks for pyhostkit."""
        lines = install_lines()
        assert any("pyhostkit" in requirement_names(args) for _, args in lines), lines
        wrong = [(path, args) for path, args in lines if "hostkit" in requirement_names(args)]
        assert not wrong, wrong
