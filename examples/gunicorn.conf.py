"""gunicorn settings for a WSGI app with hostkit services.

    gunicorn -c examples/gunicorn.conf.py examples.flask_app:app

Each worker starts its host after the fork (``post_worker_init``) and stops it when
it exits (``worker_exit``). Running this file directly starts gunicorn with it and
the Flask example: ``python examples/gunicorn.conf.py``.
"""

from __future__ import annotations

import os
import sys

from hostkit.gunicorn import post_worker_init, worker_exit

__all__ = ["post_worker_init", "worker_exit"]

bind = os.environ.get("HOSTKIT_EXAMPLE_BIND", "127.0.0.1:8000")
workers = 2
worker_class = "gthread"
threads = 4
# hostkit stops each worker's host within its shutdown_timeout (10 s in the example):
# keep gunicorn's graceful_timeout above it, or gunicorn kills the worker first.
graceful_timeout = 20
# gunicorn >= 24 opens a control socket in ~/.gunicorn; this example does not use it.
control_socket_disable = True


if __name__ == "__main__":
    from gunicorn.app.wsgiapp import run

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    sys.argv = ["gunicorn", "-c", os.path.abspath(__file__), "--bind", "127.0.0.1:0", "examples.flask_app:app"]
    sys.exit(run())
