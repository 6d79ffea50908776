"""Sphinx configuration of the fsq documentation (MyST Markdown pages, autodoc API)."""

import pathlib
import sys

from sphinx.application import Sphinx

DOCS = pathlib.Path(__file__).parent
# The repository root (to import fsq without installing it) and the local extensions.
sys.path[:0] = [str(DOCS.parent), str(DOCS / "_ext")]

import fsq  # noqa: E402 - after the path above

project = "fsq"
author = "the fsq authors"
copyright = "the fsq authors"
release = version = fsq.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax served from _static: formulas render offline
    "fsq_api",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_scripts", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["dollarmath", "amsmath"]  # $...$, $$...$$ and LaTeX environments

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"fsq {version} — Flying Squirrel"


def link_study_reports(app: Sphinx, docname: str, source: list[str]) -> None:
    """Lists the checked-in study reports (``studies/**/*.md``) at the end of the results page.

    The results page is rewritten as the studies are rerun, so the list is added when it
    is read rather than written into it; with no report there is nothing to add.
    """
    studies = DOCS / "studies"
    reports = sorted(
        p.relative_to(studies).with_suffix("").as_posix() for p in studies.rglob("*.md")
    )
    if docname == "results" and reports:
        entries = "\n".join(f"studies/{name}" for name in reports)
        source[0] += f"\n\n```{{toctree}}\n:caption: Studies\n\n{entries}\n```\n"


def setup(app: Sphinx) -> None:
    app.connect("source-read", link_study_reports)
