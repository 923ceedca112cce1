"""Sphinx extension: every script a page loads is included once.

Jupyter Book registers sphinx-thebe's inline configuration script twice, so every page declared
``const THEBE_JS_URL`` twice and the browser logged "Identifier 'THEBE_JS_URL' has already been declared".
This drops the second copy of any script (same file, or same inline body) from each page's context.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx


def _key(script: Any) -> tuple[str, str]:
    attributes = getattr(script, "attributes", {}) or {}
    return str(getattr(script, "filename", script) or ""), str(attributes.get("body", ""))


def drop_repeated_scripts(
    app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any
) -> None:
    seen: set[tuple[str, str]] = set()
    unique = []
    for script in context.get("script_files", []):
        key = _key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    if "script_files" in context:
        context["script_files"] = unique


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("html-page-context", drop_repeated_scripts, priority=999)  # after every extension adds its own
    return {"parallel_read_safe": True, "parallel_write_safe": True}
