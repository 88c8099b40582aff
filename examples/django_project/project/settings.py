"""Settings of the example project: the smallest Django that embeds a hostkit host."""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "example-only-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "jobs",
    "hostkit.django",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("HOSTKIT_EXAMPLE_DB", str(BASE_DIR / "db.sqlite3")),
    }
}

HOSTKIT = {
    # A callable returning a hostkit.HostBuilder; called once per process.
    "BUILDER": "jobs.services:make_builder",
    # The first request starts the host in the serving process (never in migrate,
    # never in runserver's autoreload parent, never before gunicorn forks).
    "START": os.environ.get("HOSTKIT_EXAMPLE_START", "request"),
    "SHUTDOWN_TIMEOUT": 10,
}
