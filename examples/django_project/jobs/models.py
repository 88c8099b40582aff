"""One table: a row per unit of work the background service did."""

from __future__ import annotations

from django.db import models


class Tick(models.Model):
    pid = models.IntegerField()
    created = models.DateTimeField(auto_now_add=True)
