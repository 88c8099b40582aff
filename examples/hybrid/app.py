"""The web side: a Flask app whose request handler enqueues a job and returns at once.

    POST /jobs {"text": "..."}   -> 202 {"id": "17"}     the job is durable from here on
    GET  /jobs/17                -> 200 {"id": "17", "words": 3, "worker": 4242} once done, else 202
    GET  /queue                  -> depth, in flight, dead letters

Run it next to the worker (two terminals, from this folder)::

    python app.py                                  # serves on 127.0.0.1:5000 (PORT=0: any free port)
    hostkit run worker:create_builder              # consumes; start as many as you like
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, jsonify, request
from jobs import ResultStore, open_queue

app = Flask(__name__)
queue = open_queue()


@app.post("/jobs")
def submit() -> Any:
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("text"), str):
        return jsonify(error='send JSON like {"text": "some words"}'), 400
    job_id = queue.enqueue({"text": body["text"]})
    return jsonify(id=job_id), 202


@app.get("/jobs/<job_id>")
def result(job_id: str) -> Any:
    store = ResultStore()
    try:
        found = store.get(job_id)
    finally:
        store.close()
    if found is None:
        return jsonify(id=job_id, status="pending"), 202
    return jsonify(id=job_id, status="done", words=found[0], worker=found[1])


@app.get("/queue")
def queue_stats() -> Any:
    return jsonify(queue.stats().to_dict())


if __name__ == "__main__":
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", int(os.environ.get("PORT", "5000")), app, threaded=True)
    print(f"Listening on http://127.0.0.1:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
