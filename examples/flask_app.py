"""A Flask app whose requests hand work to a background service through a channel.

Run it alone (Ctrl+C or SIGTERM stops it)::

    python examples/flask_app.py

or under gunicorn, one host per worker (see examples/gunicorn.conf.py)::

    gunicorn -c examples/gunicorn.conf.py examples.flask_app:app

``POST /jobs?n=5`` enqueues without blocking (503 when the channel is full);
``GET /stats`` shows the channel's counts and the services' states.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import urllib.request

from flask import Flask, jsonify, request

from hostkit import BackgroundService, CancellationToken, HostBuilder, OncePerDeployment
from hostkit.channels import Channel, QueuedWorkService
from hostkit.exceptions import ChannelClosedError, ChannelFullError
from hostkit.flask import Hostkit

# One channel per process: each worker's requests feed that worker's consumers.
jobs: Channel[int] = Channel(100, full_mode="raise", name="jobs")


def handle(job: int) -> None:
    time.sleep(0.01)  # stands for real work: a thumbnail, an e-mail, a webhook
    print(f"Handled job {job} in worker {os.getpid()}", flush=True)


class WorkerHeartbeat(BackgroundService):
    """Runs once per worker: each process says it is serving."""

    def execute(self, stopping: CancellationToken) -> None:
        print(f"Worker {os.getpid()} is serving", flush=True)
        while not stopping.wait(30):
            print(f"Worker {os.getpid()}: {len(jobs)} job(s) waiting", flush=True)
        print(f"Worker {os.getpid()}: background services stopping", flush=True)


class NightlyReport(BackgroundService):
    """Runs once per deployment: one worker of the machine holds the lock."""

    def execute(self, stopping: CancellationToken) -> None:
        print(f"Report service running in pid {os.getpid()} (once per deployment)", flush=True)
        stopping.wait()


def make_builder() -> HostBuilder:
    builder = HostBuilder()
    builder.options.shutdown_timeout = 10
    builder.add_hosted_service(QueuedWorkService(jobs, handle, concurrency=2, drain_timeout=5))
    builder.add_hosted_service(WorkerHeartbeat())
    builder.add_hosted_service(OncePerDeployment(NightlyReport(), poll_interval=1.0), name="NightlyReport")
    return builder


app = Flask(__name__)
hostkit = Hostkit(app, builder=make_builder)


@app.post("/jobs")
def enqueue() -> tuple[object, int]:
    n = int(request.args.get("n", "1"))
    accepted = 0
    for _ in range(n):
        try:
            jobs.put(accepted + 1, timeout=0)  # never blocks the request thread
        except (ChannelFullError, ChannelClosedError) as err:
            return jsonify(accepted=accepted, error=str(err)), 503
        accepted += 1
    return jsonify(accepted=accepted), 202


@app.get("/stats")
def stats() -> object:
    host = hostkit.host()
    services = {s.name: s.state.value for s in host.status().services} if host else {}
    return jsonify(channel=jobs.stats().to_dict(), services=services, pid=os.getpid())


def main() -> int:
    from werkzeug.serving import make_server

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = make_server("127.0.0.1", 0, app, threaded=True)
    url = f"http://127.0.0.1:{server.server_port}"
    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()
    print(f"Serving on {url}", flush=True)
    # A demo request: the first request starts the host, then its jobs are handled.
    with urllib.request.urlopen(urllib.request.Request(f"{url}/jobs?n=3", method="POST"), timeout=10) as resp:
        print(f"POST /jobs?n=3 -> {resp.status} {resp.read().decode().strip()}", flush=True)
    stop.wait()
    print("Stopping: server first, then the host (drains accepted jobs)", flush=True)
    server.shutdown()
    serving.join(10)
    hostkit.stop(app)
    print(f"Stopped; channel: {jobs.stats().to_dict()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
