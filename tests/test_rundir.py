"""hostkit's private runtime directory: this user's alone, the same for every process of the user."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostkit._rundir import check_shared_location, open_private, runtime_dir
from hostkit.exceptions import UnsafePathError
from tests.unprivileged import ATTACKER, attacker_run, make_shared_dir, need_attacker


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    with make_shared_dir() as path:
        yield path


@pytest.fixture
def tempdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No XDG_RUNTIME_DIR, and a temp directory of the test's own: the fallback is made there."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class TestRuntimeDir:
    def test_fallback_is_a_private_directory_named_after_the_user(self, tempdir: Path) -> None:
        """Without XDG_RUNTIME_DIR: <tempdir>/hostkit-<uid>, made 0700, owned by this user, the same every time."""
        path = runtime_dir()
        assert path == str(tempdir / f"hostkit-{os.geteuid()}")
        assert _mode(path) == 0o700 and os.lstat(path).st_uid == os.geteuid()
        assert runtime_dir() == path

    def test_xdg_runtime_dir_is_used_when_it_is_this_users(
        self, tempdir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A private XDG_RUNTIME_DIR (the user's session directory) holds a hostkit/ directory, 0700."""
        xdg = tempdir / "run-user"
        xdg.mkdir(mode=0o700)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
        path = runtime_dir()
        assert path == str(xdg / "hostkit")
        assert _mode(path) == 0o700

    def test_xdg_runtime_dir_of_another_user_is_passed_over(
        self, tempdir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An XDG_RUNTIME_DIR this user does not own (kept across `su`) is not used: the fallback is."""
        need_attacker()
        xdg = tempdir / "run-other"
        xdg.mkdir(mode=0o700)
        os.chown(xdg, ATTACKER, ATTACKER)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
        assert runtime_dir() == str(tempdir / f"hostkit-{os.geteuid()}")

    def test_reading_does_not_create(self, tempdir: Path) -> None:
        """runtime_dir(create=False) names the directory without making it."""
        path = runtime_dir(create=False)
        assert not os.path.lexists(path)

    @pytest.mark.usefixtures("tempdir")
    def test_own_directory_open_to_others_is_refused(self) -> None:
        """This user's directory with group or other access is refused with the fix, not silently used."""
        path = runtime_dir()
        os.chmod(path, 0o755)
        with pytest.raises(UnsafePathError, match=r"has mode 0755; other users may reach into it.*chmod 700"):
            runtime_dir()


class TestSquatting:
    """Another local user gets to the shared temp directory first."""

    def test_directory_made_by_another_user_is_refused(self, shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A directory another user made at the private directory's name is refused, naming its owner."""
        need_attacker()
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        monkeypatch.setattr(tempfile, "tempdir", str(shared_dir))
        squat = shared_dir / f"hostkit-{os.geteuid()}"
        assert attacker_run("sh", "-c", f"umask 077 && mkdir {squat}").returncode == 0
        with pytest.raises(UnsafePathError, match=rf"belongs to uid {ATTACKER}, not to this user") as info:
            runtime_dir()
        assert str(squat) in str(info.value) and "XDG_RUNTIME_DIR" in str(info.value)
        # Nothing was written into it.
        assert os.listdir(squat) == []

    def test_link_at_the_directory_name_is_refused(self, shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A symbolic link another user planted at the private directory's name is not followed."""
        need_attacker()
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        monkeypatch.setattr(tempfile, "tempdir", str(shared_dir))
        target = shared_dir / "target"
        target.mkdir(mode=0o700)
        link = shared_dir / f"hostkit-{os.geteuid()}"
        assert attacker_run("ln", "-s", str(target), str(link)).returncode == 0
        with pytest.raises(UnsafePathError, match="is a symbolic link"):
            runtime_dir()


class TestPrivateFiles:
    def test_created_0600_and_never_through_a_link(self, tmp_path: Path) -> None:
        """open_private creates the file 0600 and refuses a link in its place."""
        fd = open_private(str(tmp_path / "a.lock"), "test file")
        os.close(fd)
        assert _mode(tmp_path / "a.lock") == 0o600
        victim = tmp_path / "victim"
        victim.write_text("precious")
        (tmp_path / "b.lock").symlink_to(victim)
        with pytest.raises(UnsafePathError, match=r"test file .*b\.lock is a symbolic link"):
            open_private(str(tmp_path / "b.lock"), "test file")
        assert victim.read_text() == "precious"

    def test_hard_link_is_refused(self, tmp_path: Path) -> None:
        """A second name of another file (a hard link) is refused: writing to it would change that file."""
        victim = tmp_path / "victim"
        victim.write_text("precious")
        os.link(victim, tmp_path / "c.lock")
        with pytest.raises(UnsafePathError, match="has 2 hard links"):
            open_private(str(tmp_path / "c.lock"), "test file")
        assert victim.read_text() == "precious"

    def test_directory_others_may_write_is_refused_unless_sticky(self, tmp_path: Path) -> None:
        """A chosen path must be in a directory others cannot write, or a sticky one like /tmp."""
        loose = tmp_path / "loose"
        loose.mkdir()
        loose.chmod(0o777)
        with pytest.raises(UnsafePathError, match=r"mode 0777\), which other users may write without the sticky"):
            check_shared_location(str(loose / "x.lock"), "deployment lock")
        loose.chmod(0o1777)
        check_shared_location(str(loose / "x.lock"), "deployment lock")

    def test_missing_directory_is_named(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"the directory of the deployment lock .* does not exist"):
            check_shared_location(str(tmp_path / "nope" / "x.lock"), "deployment lock")
