"""Sphinx configuration for hostkit's docs."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import hostkit  # noqa: E402

project = "hostkit"
author = "hostkit developers"
copyright = "2026, hostkit developers"  # noqa: A001
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
myst_heading_anchors = 3
nitpicky = False
html_theme = "alabaster"
intersphinx_mapping: dict[str, tuple[str, None]] = {}
suppress_warnings = ["myst.xref_missing"]
