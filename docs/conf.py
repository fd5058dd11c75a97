# SPDX-FileCopyrightText: 2026 pyro-markov-kl developers
# SPDX-License-Identifier: Apache-2.0

"""Sphinx configuration of the pyro-markov-kl documentation (offline, no extra packages)."""

import os
import sys
from importlib import metadata

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

project = "pyro-markov-kl"
author = "pyro-markov-kl developers"
copyright = "2026, pyro-markov-kl developers"
try:
    release = metadata.version("pyro-markov-kl")
except metadata.PackageNotFoundError:
    release = "0.1.0"
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

templates_path: list = []
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_class_signature = "separated"

html_theme = "alabaster"
html_static_path: list = []
html_show_sourcelink = False


def _write_dmm_help() -> None:
    """Write the DMM example's ``--help`` for ``examples.rst`` to include, so it stays in sync."""
    os.environ["COLUMNS"] = "100"
    from pyro_markov_kl.examples.dmm import make_parser

    out_dir = os.path.join(os.path.dirname(__file__), "_generated")
    os.makedirs(out_dir, exist_ok=True)
    text = make_parser().format_help()
    path = os.path.join(out_dir, "dmm_help.txt")
    old = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
    if old != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


_write_dmm_help()
