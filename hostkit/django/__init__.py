"""hostkit for Django: the app (``hostkit.django.apps``), the ``hostkit_run`` management
command, and database helpers for background work (:mod:`hostkit.django.db`).

Add ``"hostkit.django"`` to ``INSTALLED_APPS``. Importing ``hostkit`` never imports
Django; importing this package's modules does.

.. versionadded:: 0.1
"""
