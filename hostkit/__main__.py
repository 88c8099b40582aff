"""``python -m hostkit``: the same as the ``hostkit`` command."""

from __future__ import annotations

from hostkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
