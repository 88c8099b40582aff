"""URLs: /ticks shows what the background service recorded, /threads what runs in this process."""

from __future__ import annotations

from django.urls import path
from jobs import views

urlpatterns = [
    path("ticks", views.ticks),
    path("threads", views.threads),
]
