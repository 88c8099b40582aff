"""The hybrid example (examples/hybrid): a Flask app enqueues, a worker service run by `hostkit run` consumes.

Both run as real processes against one SQLite file in a temporary directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROJECT_ROOT, wait_until

pytest.importorskip("flask", reason="the hybrid example needs Flask: pip install 'pyhostkit[test]'")

HYBRID = Path(PROJECT_ROOT) / "examples" / "hybrid"


class Processes:
    """The example's processes, each stopped by pid at the end of the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.env = {**os.environ, "HYBRID_DB": str(tmp_path / "hybrid.db"), "PORT": "0", "PYTHONUNBUFFERED": "1"}
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[Any]] = []
        self.files: list[Any] = []
        self.base = ""

    def log_file(self, name: str) -> Any:
        f = open(self.tmp_path / name, "wb")
        self.files.append(f)
        return f

    def start_app(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, "app.py"],
            cwd=HYBRID,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=self.log_file("app.log"),
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("Listening on http://127.0.0.1:"), f"the app did not start: {line!r}"
        self.base = line.split()[-1]
        self.app = proc

    def start_worker(self) -> subprocess.Popen[Any]:
        log = self.tmp_path / f"worker-{len(self.procs)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "hostkit", "run", "worker:create_builder"],
            cwd=HYBRID,
            env=self.env,
            stdout=self.log_file(log.name),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc.log_path = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        for f in self.files:
            f.close()


@pytest.fixture
def hybrid(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


TEXTS = [" ".join(["word"] * n) for n in range(1, 21)]


class TestHybridExample:
    @pytest.mark.timeout(120)
    def test_web_requests_enqueue_and_the_worker_service_does_the_jobs(self, hybrid: Processes) -> None:
        """Jobs posted to the Flask app return 202 at once and are done by the worker run by `hostkit run`."""
        hybrid.start_app()
        worker = hybrid.start_worker()
        ids = []
        for text in TEXTS:
            status, body = hybrid.request("POST", "/jobs", {"text": text})
            assert status == 202
            ids.append(body["id"])
        results: dict[str, Any] = {}

        def all_done() -> bool:
            for job_id in ids:
                if job_id not in results:
                    status, body = hybrid.request("GET", f"/jobs/{job_id}")
                    if status == 200:
                        results[job_id] = body
            return len(results) == len(ids)

        assert wait_until(all_done, timeout=60, interval=0.1), f"done: {len(results)}/{len(ids)}"
        assert [results[i]["words"] for i in ids] == list(range(1, 21))
        assert {r["worker"] for r in results.values()} == {worker.pid}

        # A job's result is written by its handler, and its message is acked once the handler returns.
        def settled() -> bool:
            stats = hybrid.request("GET", "/queue")[1]
            return (stats["depth"], stats["in_flight"], stats["dead"]) == (0, 0, 0)

        assert wait_until(settled, timeout=30, interval=0.05), hybrid.request("GET", "/queue")[1]

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        log = worker.log_path.read_text()  # type: ignore[attr-defined]
        assert "Queue consumer 'wordcount' stopped" in log
        hybrid.app.send_signal(signal.SIGINT)
        assert hybrid.app.wait(30) == 0

    @pytest.mark.timeout(120)
    def test_jobs_wait_in_the_queue_until_a_worker_starts(self, hybrid: Processes) -> None:
        """With no worker running, jobs stay pending (durable); a worker started later does them all."""
        hybrid.start_app()
        ids = [hybrid.request("POST", "/jobs", {"text": "a b c"})[1]["id"] for _ in range(5)]
        status, body = hybrid.request("GET", f"/jobs/{ids[0]}")
        assert (status, body["status"]) == (202, "pending")
        assert hybrid.request("GET", "/queue")[1]["depth"] == 5
        hybrid.start_worker()
        assert wait_until(lambda: all(hybrid.request("GET", f"/jobs/{i}")[0] == 200 for i in ids), timeout=60)

    def test_bad_request_is_refused_without_enqueueing(self, hybrid: Processes) -> None:
        """A POST without a text gets 400 with the expected shape, and nothing is enqueued."""
        hybrid.start_app()
        status, body = hybrid.request("POST", "/jobs", {"txt": "typo"})
        assert status == 400
        assert '{"text": "some words"}' in body["error"]
        assert hybrid.request("GET", "/queue")[1]["depth"] == 0
