"""This book's own Sphinx extension: each page's scripts without repeats.

sphinx-thebe and sphinx-togglebutton register inline configuration scripts from build
events; with Sphinx 7.4 each such script reaches every page twice (once with the file name
``None``, once with ``""``; Sphinx drops repeated script *files*, not repeated inline
scripts), and the second ``const THEBE_JS_URL = ...`` is a JavaScript error on the console
of every page. This keeps the first of identical scripts (same file or body, priority and
attributes) and drops the rest.
"""

from __future__ import annotations

from typing import Any


def _key(js: Any) -> tuple:
    attributes = getattr(js, "attributes", {}) or {}
    return (getattr(js, "filename", str(js)) or "", getattr(js, "priority", 0), tuple(sorted(attributes.items())))


def drop_repeated_scripts(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    seen: set[tuple] = set()
    kept = []
    for js in context.get("script_files") or []:
        if _key(js) not in seen:
            seen.add(_key(js))
            kept.append(js)
    if "script_files" in context:
        context["script_files"] = kept


def setup(app: Any) -> dict:
    app.connect("html-page-context", drop_repeated_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
