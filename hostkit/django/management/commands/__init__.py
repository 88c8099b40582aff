"""``manage.py hostkit_run``."""
