"""Sphinx extension: the theme starts in "auto" mode (the reader's system setting).

Without ``default_mode`` the pydata theme's page script sets the mode to ``localStorage["mode"] || ""``,
so the first page a reader opens (nothing stored yet) logs "Got invalid theme mode: ." as a console error.
Setting the option in ``_config.yml`` would replace every theme option Jupyter Book computes (its launch
and repository buttons); this adds the one key to them.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx
from sphinx.config import Config


def default_to_auto(app: Sphinx, config: Config) -> None:
    config.html_theme_options.setdefault("default_mode", "auto")


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("config-inited", default_to_auto)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
