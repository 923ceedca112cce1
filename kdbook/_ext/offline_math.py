"""Sphinx extension: typeset the book's mathematics with a copy of MathJax 3 shipped inside the book.

Sphinx loads MathJax from a CDN by default, so a book opened without internet shows raw ``\\(T^2\\)``.
This extension points ``mathjax_path`` at ``_static/mathjax/tex-chtml.js`` and copies MathJax's browser
files there from the PyPI package ``sphinx-mathjax-offline`` (MathJax 3.2.2; installed by the book
extra, so a fresh ``bash scripts/book.sh`` fetches it with the rest). Opening a page fetches nothing.

Only the parts the book uses are copied (about 7 MB rather than 24 MB): the TeX-to-HTML bundle, the
TeX extensions it loads on demand (``\\boldsymbol``, ``\\color``, ...), its web fonts, and the menu with
its accessibility tools.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ExtensionError
from sphinx.util.fileutil import copy_asset

MATHJAX_PACKAGE = "sphinx-mathjax-offline"
ENTRY_POINT = "tex-chtml.js"
PARTS = (ENTRY_POINT, "input/tex/extensions", "output/chtml/fonts/woff-v2", "ui", "a11y", "sre")
TARGET = "mathjax"  # inside the book's _static/


def mathjax_folder() -> Path:
    """The folder holding MathJax's ``es5`` build, from the installed package."""
    spec = importlib.util.find_spec(MATHJAX_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = Path(locations[0]) / "static" / "mathjax" if locations else None
    if folder is None or not (folder / ENTRY_POINT).is_file():
        raise ExtensionError(
            f"MathJax for the offline book comes from the Python package {MATHJAX_PACKAGE!r}, which is not "
            "installed in this environment. Install the book extra: pip install -e '.[book]' (or run "
            "bash scripts/book.sh, which does)."
        )
    return folder


def use_local_mathjax(app: Sphinx, config: Config) -> None:
    mathjax_folder()  # fail at the start of the build, not after every page is written
    config.mathjax_path = f"{TARGET}/{ENTRY_POINT}"  # relative: Sphinx prefixes the pages' _static/


def copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    source, target = mathjax_folder(), Path(app.outdir) / "_static" / TARGET
    for part in PARTS:
        if (source / part).is_dir():
            copy_asset(str(source / part), str(target / part))
        else:
            copy_asset(str(source / part), str((target / part).parent))


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("config-inited", use_local_mathjax)
    app.connect("build-finished", copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
