"""`hostkit new worker`: a project that installs this distribution, passes its tests, and deploys.

The install tests build a wheel of this repository, put it in the generated project's
``wheels/`` (as the project's README says) and install the project into a fresh venv
with no package index at all, so pyhostkit can only come from that wheel and nothing
named ``hostkit`` can come from anywhere. The deploy-file tests read what an ops
engineer would ship: the container's init, user and ignore file, the Kubernetes image
tag and resources, the systemd unit's stop settings (and ``systemd-analyze verify``).
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import psutil
import pytest

import hostkit
from hostkit.cli import main
from hostkit.cli.new import TEMPLATES
from tests.conftest import PROJECT_ROOT

PROJECT = "order-sync"
PACKAGE = "order_sync"
# What a build of the repository needs; the rest (.venv, .tox, caches, build output) is left behind.
_SOURCE_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", ".tox", "build", "dist", "*.egg-info", "__pycache__", "_build", ".*_cache", "results"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NOTIFY_SOCKET", "JOURNAL_STREAM")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(argv: list[str], *, timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
    return done


def _json_array(dockerfile: str, instruction: str) -> list[str]:
    """The exec-form (JSON) array on the last ``instruction`` line, continuation lines joined.

    For ``HEALTHCHECK --interval=... CMD [...]``, the array of its CMD.
    """
    joined = re.sub(r"\\\n\s*", " ", dockerfile)
    lines = [line for line in joined.splitlines() if line.startswith(instruction + " ")]
    assert lines, f"the Dockerfile has no {instruction}"
    return json.loads(lines[-1][lines[-1].index("[") :])


def _generate(directory: Path, probe_port: int = 9100) -> Path:
    project = directory / PROJECT
    assert main(["new", "worker", PROJECT, "--directory", str(project), "--probe-port", str(probe_port)]) == 0
    return project


@dataclass
class Installed:
    """The generated project installed into a fresh venv, against a wheel of this repository."""

    project: Path
    venv: Path
    wheel: Path
    report: dict
    env: dict[str, str]
    probe_port: int

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")


@pytest.fixture(scope="class")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("template")
    port = _free_port()
    project = _generate(tmp, port)
    env = _clean_env()
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    python = str(venv / "bin" / "python")

    # 1. A wheel of this repository in the project's wheels/, as wheels/README.md says, built
    #    from a copy so that the build leaves nothing behind in the checkout.
    source = tmp / "hostkit-source"
    shutil.copytree(PROJECT_ROOT, source, ignore=_SOURCE_IGNORE)
    wheels = project / "wheels"
    _run([python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)], env=env, timeout=240)
    (wheel,) = wheels.glob("*.whl")

    # 2. Every other distribution, from the index, by name: pyhostkit's requirements through the
    #    wheel file (a path pins pyhostkit to that file), the project's test extra and build system.
    config = configparser.ConfigParser()
    config.read(project / "setup.cfg")
    extra = config["options.extras_require"]["test"].split()
    build_system = re.search(r"^requires = \[(.*)\]", (project / "pyproject.toml").read_text(), re.M)
    build = re.findall(r'"([^"]+)"', build_system[1])
    deps = tmp / "deps"
    _run([python, "-m", "pip", "download", "-q", "-d", str(deps), str(wheel), *extra, *build], env=env, timeout=240)
    for copy in deps.glob("pyhostkit-*"):
        copy.unlink()  # pyhostkit comes from wheels/ alone

    # 3. The project as its Dockerfile installs it (pip install --find-links wheels/ .), with no
    #    index and no pip configuration: nothing can come from anywhere but wheels/ and deps/.
    offline = {**{k: v for k, v in env.items() if not k.startswith("PIP_")}, "PIP_CONFIG_FILE": os.devnull}
    report = tmp / "report.json"
    offline_install = ["install", "-q", "--isolated", "--no-index", "--find-links", "wheels/"]
    offline_install += ["--find-links", str(deps)]
    _run(
        [python, "-m", "pip", *offline_install, "--report", str(report), ".[test]"],
        cwd=project,
        env=offline,
        timeout=240,
    )
    return Installed(project, venv, wheel, json.loads(report.read_text()), env, port)


@pytest.mark.slow
@pytest.mark.timeout(400)
class TestGeneratedProjectInstalls:
    def test_installs_pyhostkit_from_the_wheel_and_nothing_named_hostkit(self, installed: Installed) -> None:
        """The venv holds this repository's pyhostkit, from the project's wheels/; no 'hostkit' distribution."""
        assert installed.wheel.name.startswith(f"pyhostkit-{hostkit.__version__}-")
        by_name = {item["metadata"]["name"].lower(): item for item in installed.report["install"]}
        assert "hostkit" not in by_name, by_name["hostkit"]["download_info"]
        origin = by_name["pyhostkit"]["download_info"]
        assert origin["url"] == installed.wheel.as_uri(), origin
        digest = hashlib.sha256(installed.wheel.read_bytes()).hexdigest()
        # pip < 23.1 reports "hash" only ("sha256=..."); later ones "hashes" too.
        assert origin["archive_info"]["hash"] == f"sha256={digest}", origin

        probe = (
            "import importlib.metadata as md, json, hostkit\n"
            "try:\n    other = md.distribution('hostkit').metadata['Name']\n"
            "except md.PackageNotFoundError:\n    other = None\n"
            "print(json.dumps({'name': md.metadata('pyhostkit')['Name'], 'version': md.version('pyhostkit'),\n"
            "    'providers': md.packages_distributions().get('hostkit'), 'hostkit': other,\n"
            "    'module': hostkit.__file__, 'module_version': hostkit.__version__}))\n"
        )
        # -I: no current directory or PYTHON* variables on the path, only what the venv installed.
        seen = json.loads(_run([installed.python, "-I", "-c", probe], env=installed.env, timeout=60).stdout)
        assert seen["name"] == "pyhostkit"
        assert seen["version"] == seen["module_version"] == hostkit.__version__
        assert seen["providers"] == ["pyhostkit"], seen
        assert seen["hostkit"] is None, seen
        assert Path(seen["module"]).is_relative_to(installed.venv), seen

    def test_the_wheel_carries_every_template_file(self, installed: Installed) -> None:
        """`hostkit new` from an installed wheel writes the same files as from a checkout (.dockerignore too)."""
        import zipfile

        prefix = "hostkit/cli/templates/"
        with zipfile.ZipFile(installed.wheel) as whl:
            shipped = {name.removeprefix(prefix) for name in whl.namelist() if name.startswith(prefix)}
        source = {
            str(path.relative_to(TEMPLATES))
            for path in TEMPLATES.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        }
        assert shipped == source

    def test_generated_tests_pass(self, installed: Installed) -> None:
        """The generated project's own tests pass in the fresh venv."""
        tests = subprocess.run(
            [installed.python, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
            cwd=installed.project,
            env=installed.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert tests.returncode == 0, tests.stdout + tests.stderr
        assert "4 passed" in tests.stdout, tests.stdout

    def test_container_command_runs_under_tini_probes_and_stops_on_sigterm(self, spawn, installed: Installed) -> None:
        """The Dockerfile's ENTRYPOINT + CMD start, its HEALTHCHECK passes, SIGTERM stops them with exit 0."""
        dockerfile = (installed.project / "Dockerfile").read_text()
        entrypoint, command = _json_array(dockerfile, "ENTRYPOINT"), _json_array(dockerfile, "CMD")
        healthcheck = _json_array(dockerfile, "HEALTHCHECK")
        if not Path(entrypoint[0]).is_file():
            pytest.skip(f"{entrypoint[0]} is not installed (Debian: apt-get install tini)")
        # The tests listen on the loopback only; in the container the probe listens on every address.
        argv = [*entrypoint, *("127.0.0.1" if arg == "0.0.0.0" else arg for arg in command)]
        # TINI_SUBREAPER: outside a container tini is not PID 1; as a subreaper it still adopts orphans.
        env = {**installed.env, "PATH": f"{installed.venv / 'bin'}:{os.environ['PATH']}", "TINI_SUBREAPER": "1"}
        init = spawn(argv, cwd=installed.project, env=env, folder=installed.project.parent)

        def healthy() -> bool:
            return subprocess.run(healthcheck, env=env, capture_output=True, timeout=30).returncode == 0

        init.wait_for(healthy, timeout=60, what="the HEALTHCHECK passing")
        (worker,) = psutil.Process(init.pid).children()
        assert f"{PACKAGE}.app:create_builder" in worker.cmdline(), worker.cmdline()
        init.signal(signal.SIGTERM)
        assert init.wait(60) == 0, init.output
        assert not worker.is_running(), "tini returned before hostkit ended"
        records = [json.loads(line) for line in init.output.splitlines() if line.startswith("{")]
        assert any("exit code 0" in r["text"] for r in records), init.output


class TestDeployFiles:
    def test_dockerfile_runs_tini_as_init_and_a_non_root_user(self, tmp_path: Path) -> None:
        """PID 1 is tini from Debian's apt, the service runs as a system user, pyhostkit comes from wheels/."""
        dockerfile = (_generate(tmp_path) / "Dockerfile").read_text()
        assert _json_array(dockerfile, "ENTRYPOINT") == ["/usr/bin/tini", "--"]
        assert re.search(r"apt-get install -y --no-install-recommends tini\b", dockerfile)
        assert _json_array(dockerfile, "CMD")[:2] == ["hostkit", "run"]
        user = re.findall(r"^USER (\S+)", dockerfile, re.M)
        assert user and user[-1] not in ("root", "0"), user
        assert re.search(rf"^RUN useradd --system .*\b{user[-1]}$", dockerfile, re.M)
        assert "pip install --no-cache-dir --find-links wheels/ ." in dockerfile
        assert "HEALTHCHECK" in dockerfile

    def test_dockerignore_keeps_local_state_out_and_wheels_in(self, tmp_path: Path) -> None:
        """.dockerignore leaves out the venv, git and caches; the wheels/ the Dockerfile installs from stay."""
        project = _generate(tmp_path)
        patterns = [
            line.strip()
            for line in (project / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]

        def ignored(path: str) -> bool:
            # Docker's rule: a pattern matches the path or one of its parent directories.
            parts = path.split("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            return any(fnmatch(p, pat) or fnmatch(p, pat.removeprefix("**/")) for p in prefixes for pat in patterns)

        for local in (".venv/bin/python", ".git/HEAD", f"{PACKAGE}/__pycache__/app.cpython-312.pyc", ".tox/x"):
            assert ignored(local), local
        for shipped in ("wheels/pyhostkit-0.1.0-py3-none-any.whl", "setup.cfg", f"{PACKAGE}/app.py", "Dockerfile"):
            assert not ignored(shipped), shipped

    def test_kubernetes_pins_the_image_and_sets_resources(self, tmp_path: Path) -> None:
        """The Deployment names a pinned tag (never :latest) and sets CPU and memory requests and limits."""
        manifest = (_generate(tmp_path) / "deploy" / "kubernetes.yaml").read_text()
        (image,) = re.findall(r"^\s*image: (\S+)", manifest, re.M)
        assert re.fullmatch(rf"{PROJECT}:\d+\.\d+\.\d+", image), image
        resources = manifest[manifest.index("resources:") :]
        for kind in ("requests", "limits"):
            block = re.search(rf"^(\s*){kind}:\n((?:\1\s+\S.*\n)+)", resources, re.M)
            assert block, f"no {kind} in {resources}"
            assert re.search(r"cpu: \S+", block[2]) and re.search(r"memory: \S+", block[2]), block[2]
        comment = " ".join(re.findall(r"^\s*#\s*(.*)", resources, re.M))
        assert "process-placed" in comment and "CFS" in comment and "tail latency" in comment, comment
        timeout = float(re.search(r'"--shutdown-timeout", "(\d+)"', manifest)[1])
        assert int(re.search(r"terminationGracePeriodSeconds: (\d+)", manifest)[1]) > timeout

    def test_readme_links_no_placeholder(self, tmp_path: Path) -> None:
        """The generated README has no placeholder link, and says how to install pyhostkit before it is on an index."""
        readme = (_generate(tmp_path) / "README.md").read_text()
        for url in re.findall(r"\]\((https?://[^)]*)\)", readme):
            assert re.match(r"https?://[^/]+/\S+", url), f"placeholder link: {url}"
        assert "pyhostkit" in readme
        assert "pip install --find-links wheels/ -e '.[test]'" in readme
        assert "pip wheel --no-deps -w wheels/" in readme

    def test_setup_cfg_requires_pyhostkit_not_hostkit(self, tmp_path: Path) -> None:
        """The project depends on pyhostkit (ours); the index's 'hostkit' is another project."""
        config = configparser.ConfigParser()
        config.read(_generate(tmp_path) / "setup.cfg")
        requires = config["options"]["install_requires"].split()
        assert requires == [f"pyhostkit>={hostkit.__version__}"], requires

    def test_systemd_unit_stops_the_host_alone_within_its_budget(self, tmp_path: Path) -> None:
        """KillMode=mixed (SIGTERM to hostkit only) and TimeoutStopSec above the host's --shutdown-timeout."""
        unit = (_generate(tmp_path) / "deploy" / f"{PROJECT}.service").read_text()
        settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
        assert settings["KillMode"] == "mixed"
        assert settings["KillSignal"] == "SIGTERM"
        shutdown_timeout = float(re.search(r"--shutdown-timeout (\d+)", settings["ExecStart"])[1])
        assert float(settings["TimeoutStopSec"]) > shutdown_timeout

    def test_systemd_unit_reload_command_reloads_the_running_worker(self, tmp_path: Path, spawn) -> None:
        """The unit's ExecReload=, run as systemd runs it ($MAINPID: hostkit), reloads the worker; it runs on."""
        project = _generate(tmp_path)
        unit = (project / "deploy" / f"{PROJECT}.service").read_text()
        settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
        assert settings["Type"] == "notify"
        assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
        program = spawn(
            [sys.executable, "-m", "hostkit", "run", f"{PACKAGE}.app:create_builder"], cwd=project, stderr="separate"
        )
        program.wait_for_output("Host started", stream="err")
        command = settings["ExecReload"].replace("$MAINPID", str(program.pid)).split()
        assert subprocess.run(command, timeout=30).returncode == 0
        program.wait_for_output("Reload done in", stream="err")
        assert "OrderSyncWorker reloaded (nothing to re-read yet)" in program.err
        assert program.running(), program.describe()
        program.signal(signal.SIGTERM)
        assert program.wait() == 0, program.describe()

    def test_systemd_analyze_verify_is_clean(self, tmp_path: Path) -> None:
        """`systemd-analyze verify` has nothing to say about the generated unit."""
        tool = shutil.which("systemd-analyze")
        if tool is None:
            pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
        project = _generate(tmp_path)
        unit = (project / "deploy" / f"{PROJECT}.service").read_text()
        # verify checks that ExecStart's program exists: point it at a stand-in for the venv's hostkit.
        stand_in = tmp_path / "bin" / "hostkit"
        stand_in.parent.mkdir()
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
        installed_at = f"/opt/{PROJECT}/venv/bin/hostkit"
        assert installed_at in unit
        (tmp_path / f"{PROJECT}.service").write_text(unit.replace(installed_at, str(stand_in)))
        done = subprocess.run(
            [tool, "verify", f"{PROJECT}.service"], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stdout + done.stderr) == (0, "")
