"""Two read-only views for people (and tests) to see the services at work."""

from __future__ import annotations

import os
import threading

from django.http import HttpRequest, JsonResponse

from .models import Tick


def ticks(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {"ticks": Tick.objects.count(), "pids": sorted(set(Tick.objects.values_list("pid", flat=True)))}
    )


def threads(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"pid": os.getpid(), "threads": sorted(t.name for t in threading.enumerate())})
