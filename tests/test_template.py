"""`hostkit new worker`: the generated project installs into a fresh venv and its tests pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hostkit.cli import main
from tests.conftest import PROJECT_ROOT


class TestWorkerTemplate:
    @pytest.mark.slow
    @pytest.mark.timeout(300)
    def test_generated_project_installs_and_its_tests_pass(self, tmp_path: Path) -> None:
        """A new worker project, installed with hostkit into a fresh venv, passes its own tests."""
        project = tmp_path / "order-sync"
        assert main(["new", "worker", "order-sync", "--directory", str(project), "--probe-port", "9100"]) == 0
        assert "--probe-port 9100" in (project / "deploy" / "order-sync.service").read_text()
        assert "port: probe" in (project / "deploy" / "kubernetes.yaml").read_text()
        assert "HEALTHCHECK" in (project / "Dockerfile").read_text()

        venv = tmp_path / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        python = str(venv / "bin" / "python")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NOTIFY_SOCKET", "JOURNAL_STREAM")}
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        install = subprocess.run(
            [python, "-m", "pip", "install", "-q", "-e", PROJECT_ROOT, "-e", f"{project}[test]"],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert install.returncode == 0, install.stdout + install.stderr
        tests = subprocess.run(
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert tests.returncode == 0, tests.stdout + tests.stderr
        assert "3 passed" in tests.stdout, tests.stdout
