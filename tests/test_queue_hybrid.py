"""The hybrid example (examples/hybrid): a Flask app enqueues, a worker service run by `hostkit run` consumes.

Both run as real processes against one SQLite file in a temporary directory.
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROJECT_ROOT, wait_until
from tests.subproc import Program, python

pytest.importorskip("flask", reason="the hybrid example needs Flask: pip install 'pyhostkit[test]'")

HYBRID = Path(PROJECT_ROOT) / "examples" / "hybrid"


class Processes:
    """The example's processes (tests.subproc.Program), each stopped by pid at the end of the test."""

    def __init__(self, tmp_path: Path, spawn: Callable[..., Program]) -> None:
        self.env = {"HYBRID_DB": str(tmp_path / "hybrid.db"), "PORT": "0"}
        self.spawn = spawn
        self.base = ""

    def start_app(self) -> None:
        self.app = self.spawn(python("app.py"), cwd=HYBRID, stderr="separate", **self.env)
        self.app.wait_for_output("\n")
        line = self.app.output.splitlines()[0]
        assert line.startswith("Listening on http://127.0.0.1:"), f"the app did not start: {line!r}"
        self.base = line.split()[-1]

    def start_worker(self) -> Program:
        return self.spawn(python("-m", "hostkit", "run", "worker:create_builder"), cwd=HYBRID, **self.env)

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


@pytest.fixture
def hybrid(tmp_path: Path, spawn: Callable[..., Program]) -> Processes:
    return Processes(tmp_path, spawn)


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

        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.output
        assert "Queue consumer 'wordcount' stopped" in worker.output
        hybrid.app.signal(signal.SIGINT)
        assert hybrid.app.wait(30) == 0, hybrid.app.describe()

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
