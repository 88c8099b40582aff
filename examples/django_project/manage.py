#!/usr/bin/env python
"""The example Django project's manage.py.

python manage.py migrate
python manage.py runserver            # the host starts at the first request, in the serving process
python manage.py hostkit_run          # the same host as a standalone worker service
gunicorn -c ../gunicorn.conf.py project.wsgi:application
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
