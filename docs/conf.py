"""Sphinx configuration for hostkit's docs."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import hostkit

project = "hostkit"
author = "hostkit developers"
copyright = "2026, hostkit developers"
release = hostkit.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
master_doc = "index"
exclude_patterns = ["_build"]
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Render "Attributes:" sections as fields: as attribute directives they would
# duplicate the dataclass fields that autodoc documents itself.
napoleon_use_ivar = True
myst_heading_anchors = 3
nitpicky = False
html_theme = "alabaster"
intersphinx_mapping: dict[str, tuple[str, None]] = {}
# No suppressed warnings: a broken cross-reference or link fails the -W build.
suppress_warnings: list[str] = []
# Optional integrations import their framework at module top; the docs build must
# not need every framework installed (the tox docs env installs only Sphinx).
autodoc_mock_imports = ["flask", "werkzeug", "gunicorn", "django", "redis", "prometheus_client"]
