"""toxfile.py: tox finds pyenv's interpreters without PYENV_VERSION, and skips the ones a machine lacks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import toxfile
from tests.conftest import PROJECT_ROOT


def fake_pyenv(root: Path, *versions: str) -> list[str]:
    """``root/versions/<v>/bin`` for each version; returns the bin directories in creation order."""
    made = []
    for version in versions:
        bin_dir = root / "versions" / version / "bin"
        bin_dir.mkdir(parents=True)
        made.append(str(bin_dir))
    return made


def _tox_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOX_", "PYENV_VERSION", "VIRTUALENV_"))}
    env.pop("PYTHONPATH", None)
    return env


class TestPathWithPyenv:
    def test_puts_every_python3_version_in_front_newest_first(self, tmp_path: Path) -> None:
        """Each 3.x version's bin directory goes in front of PATH, newest first; Python 2 is left out."""
        v310, v312_old, v312, v313, _v2 = fake_pyenv(tmp_path, "3.10.13", "3.12.1", "3.12.9", "3.13.0", "2.7.18")
        (tmp_path / "versions" / "3.11.7").mkdir()  # a half-removed version: no bin/
        path = toxfile.path_with_pyenv({"PYENV_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"})
        assert path.split(os.pathsep) == [v313, v312, v312_old, v310, "/usr/bin", "/bin"]

    def test_defaults_to_pyenv_in_home(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without PYENV_ROOT the root is ~/.pyenv."""
        monkeypatch.setenv("HOME", str(tmp_path))
        (v311,) = fake_pyenv(tmp_path / ".pyenv", "3.11.7")
        assert toxfile.path_with_pyenv({"PATH": "/bin"}) == os.pathsep.join([v311, "/bin"])

    def test_without_pyenv_path_is_unchanged(self, tmp_path: Path) -> None:
        """No pyenv root (or no versions in it): PATH stays as it was."""
        assert toxfile.path_with_pyenv({"PYENV_ROOT": str(tmp_path / "absent"), "PATH": "/usr/bin"}) == "/usr/bin"
        (tmp_path / "versions").mkdir()
        assert toxfile.path_with_pyenv({"PYENV_ROOT": str(tmp_path), "PATH": "/usr/bin"}) == "/usr/bin"

    def test_adds_nothing_twice(self, tmp_path: Path) -> None:
        """A directory already on PATH is not added again, so tox may call the hook any number of times."""
        v310, v313 = fake_pyenv(tmp_path, "3.10.13", "3.13.0")
        once = toxfile.path_with_pyenv({"PYENV_ROOT": str(tmp_path), "PATH": f"/bin{os.pathsep}{v310}"})
        assert once.split(os.pathsep) == [v313, "/bin", v310]
        assert toxfile.path_with_pyenv({"PYENV_ROOT": str(tmp_path), "PATH": once}) == once


class TestToxLoadsThePlugin:
    @pytest.mark.timeout(120)
    def test_tox_runs_with_pyenv_directories_on_path(self, tmp_path: Path) -> None:
        """A real tox run loads toxfile.py, whose hook puts pyenv's directories in front of PATH."""
        pytest.importorskip("tox", reason="tox is not installed: pip install 'pyhostkit[test]'")
        shutil.copy(Path(PROJECT_ROOT) / "toxfile.py", tmp_path / "toxfile.py")
        (tmp_path / "tox.ini").write_text(
            "[tox]\nenv_list = show\n[testenv:show]\nskip_install = true\ncommands = echo {env:PATH}\n"
        )
        root = tmp_path / "pyenv"
        v312, v310 = fake_pyenv(root, "3.12.1", "3.10.13")
        env = {**_tox_env(), "PYENV_ROOT": str(root), "PATH": "/usr/bin:/bin"}
        shown = subprocess.run(
            [sys.executable, "-m", "tox", "config", "-e", "show", "-k", "commands"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=100,
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert f"echo {v312}:{v310}:/usr/bin:/bin" in shown.stdout, shown.stdout

    @pytest.mark.timeout(120)
    def test_tox_finds_every_pyenv_interpreter_without_pyenv_version(self) -> None:
        """Each of py310-py313 that pyenv has resolves to an interpreter, with PYENV_VERSION unset."""
        pytest.importorskip("tox", reason="tox is not installed: pip install 'pyhostkit[test]'")
        root = Path(os.environ.get("PYENV_ROOT") or Path("~/.pyenv").expanduser())
        current = f"{sys.version_info[0]}.{sys.version_info[1]}"
        # The running interpreter always resolves; only the others show that the plugin works.
        minors = sorted(
            {
                ".".join(entry.name.split(".")[:2])
                for entry in (root / "versions").glob("3.1[0-3].*")
                if (entry / "bin").is_dir()
            }
            - {current}
        )
        if not minors:
            pytest.skip(f"pyenv at {root} has none of Python 3.10-3.13 besides {current}")
        envs = ",".join("py" + minor.replace(".", "") for minor in minors)
        shown = subprocess.run(
            [sys.executable, "-m", "tox", "config", "-e", envs, "-k", "py_dot_ver"],
            cwd=PROJECT_ROOT,
            env=_tox_env(),
            capture_output=True,
            text=True,
            timeout=100,
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert [line.split(" = ")[1] for line in shown.stdout.splitlines() if "py_dot_ver" in line] == minors, (
            shown.stdout
        )
