"""hostkit.django.db: stale Django connections closed at every scope's start and end, on a real SQLite project.

Django's settings can be configured once per process, so each scenario runs in
its own interpreter: the test writes a minimal project (settings with a SQLite
database) into a temp dir and a script that runs a real host whose background
service does units of work in scopes; the script prints what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROJECT_ROOT

pytest.importorskip("django")

SETTINGS = """
SECRET_KEY = "test"
INSTALLED_APPS: list[str] = []
USE_TZ = True
DATABASES = {{
    "default": {{
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": {db!r},
        "CONN_MAX_AGE": {max_age},
    }}
}}
"""

SCRIPT = """
import json, sys, time
import django
django.setup()
from django.db import connection

from hostkit import BackgroundService, CancellationToken, HostBuilder, ServiceProvider
from hostkit.django.db import add_django_db


class Notes:
    '''A scoped repository on Django's connection.'''

    def add(self, text):
        with connection.cursor() as cur:
            cur.execute("INSERT INTO notes (text) VALUES (%s)", [text])


class Writer(BackgroundService):
    def __init__(self, provider: ServiceProvider) -> None:
        self.provider = provider
        self.seen = []

    def execute(self, stopping: CancellationToken) -> None:
        for i in range(3):
            if i == 2:
                # The connection kept from unit 1 becomes stale (past CONN_MAX_AGE)
                # between units of work, as a database's idle timeout would make it.
                if connection.connection is not None:
                    connection.close_at = time.monotonic() - 1
            before = connection.connection
            self.provider.run_in_scope(self.unit, i, before)
            self.seen[-1]["after_scope_open"] = connection.connection is not None

    def unit(self, i: int, before, notes: Notes) -> None:
        notes.add(f"note {{i}}")
        raw = connection.connection
        self.seen.append({{
            "unit": i,
            "raw": id(raw),
            "same_as_before": raw is before and before is not None,
        }})
        self._keep = getattr(self, "_keep", []) + [raw]  # keep objects alive: ids stay unique


with connection.cursor() as cur:
    cur.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT)")
connection.close()

builder = HostBuilder()
if sys.argv[1] == "helper":
    add_django_db(builder.services)
builder.services.add_scoped(Notes)
builder.add_hosted_service(Writer)
host = builder.build()
with host:
    writer = next(r.service for r in host.service_records())
    deadline = time.monotonic() + 30
    while len(writer.seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
with connection.cursor() as cur:
    cur.execute("SELECT COUNT(*) FROM notes")
    rows = cur.fetchone()[0]
print(json.dumps({{"seen": writer.seen, "rows": rows}}))
"""


def run(tmp_path: Path, mode: str, max_age: int) -> dict[str, Any]:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "settings.py").write_text(SETTINGS.format(db=str(tmp_path / "db.sqlite3"), max_age=max_age))
    script = project / "scenario.py"
    script.write_text(textwrap.dedent(SCRIPT.format()))
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="settings",
        PYTHONPATH=os.pathsep.join([str(project), PROJECT_ROOT]),
    )
    out = subprocess.run(
        [sys.executable, str(script), mode], cwd=project, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


class TestDjangoDb:
    def test_connection_closed_at_every_scope_end_by_default(self, tmp_path: Path) -> None:
        """With CONN_MAX_AGE = 0, each unit of work gets a fresh connection, closed when its scope ends."""
        result = run(tmp_path, "helper", max_age=0)
        assert result["rows"] == 3
        assert [u["after_scope_open"] for u in result["seen"]] == [False, False, False]
        assert len({u["raw"] for u in result["seen"]}) == 3

    def test_without_the_helper_the_thread_keeps_one_connection(self, tmp_path: Path) -> None:
        """The control: a background thread left alone holds one connection across units of work."""
        result = run(tmp_path, "plain", max_age=0)
        assert result["rows"] == 3
        assert [u["after_scope_open"] for u in result["seen"]] == [True, True, True]
        assert len({u["raw"] for u in result["seen"]}) == 1

    def test_persistent_connection_reused_until_stale_then_replaced_at_scope_start(self, tmp_path: Path) -> None:
        """With CONN_MAX_AGE > 0 a connection is reused across scopes; once stale, the next scope replaces it."""
        result = run(tmp_path, "helper", max_age=600)
        seen = result["seen"]
        assert result["rows"] == 3
        assert [u["after_scope_open"] for u in seen] == [True, True, True]
        assert seen[1]["same_as_before"] is True  # reused: not yet stale
        assert seen[2]["same_as_before"] is False  # stale at scope start: dropped, a new one opened
        assert seen[0]["raw"] == seen[1]["raw"] != seen[2]["raw"]

    def test_helper_refuses_a_wrong_argument(self) -> None:
        """add_django_db needs the ServiceCollection, and says so."""
        from hostkit import HostBuilder
        from hostkit.django.db import add_django_db
        from hostkit.exceptions import InvalidServiceError

        with pytest.raises(InvalidServiceError, match=r"needs a hostkit.ServiceCollection \(builder.services\)"):
            add_django_db(HostBuilder())  # type: ignore[arg-type]
