"""Sphinx extension: the theme starts in "auto" mode (the reader's system setting).

Without ``default_mode`` in the page context, the pydata theme's page script sets the mode to
``localStorage["mode"] || ""``, so the first page a reader opens (nothing stored yet) logs "Got invalid theme
mode: ." as a console error. ``html_context`` set in ``_config.yml`` would replace the whole context that
Jupyter Book fills in; this adds the one key.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx
from sphinx.config import Config


def default_to_auto(app: Sphinx, config: Config) -> None:
    config.html_context.setdefault("default_mode", "auto")


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("config-inited", default_to_auto)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
