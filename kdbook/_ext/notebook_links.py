"""Sphinx extension: point a lesson page's launch and repository links at its student edition.

The book renders executed copies written to ``kdbook/lessons/`` (not committed); the notebooks students
open are the committed student editions in ``notebooks/student/`` (no solutions; ``notebooks/`` itself
holds the instructor's, nbgrader's source). sphinx-book-theme builds its Binder, Colab and "source" links
from the page's path in the book, so they would name ``kdbook/lessons/NAME.ipynb``; this rewrites them to
``notebooks/student/NAME.ipynb`` after the theme has made them.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx

BOOK_LESSONS = "kdbook/lessons/"
SOURCE_NOTEBOOKS = "notebooks/student/"


def _rewrite(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace(BOOK_LESSONS, SOURCE_NOTEBOOKS)
    if isinstance(value, list):
        return [_rewrite(item) for item in value]
    if isinstance(value, dict):
        return {key: _rewrite(item) for key, item in value.items()}
    return value


def retarget_links(
    app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any
) -> None:
    if pagename.startswith("lessons/") and "header_buttons" in context:
        context["header_buttons"] = _rewrite(context["header_buttons"])


def setup(app: Sphinx) -> dict[str, Any]:
    # After sphinx-book-theme (priority 501 for its launch and repository buttons).
    app.connect("html-page-context", retarget_links, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
