"""Code, tests and notebooks do not cite issue numbers: a reader of the repository cannot look them up,
so a comment says what the code does and why, not which ticket asked for it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: "issue 15", "Issue #15", "issues 13", "#15" (not a quoted colour such as '#333' or "#1f77b4", nor "#000",
#: nor a "#: " comment)
PATTERN = re.compile(r"(?i)\bissues?\s*#?\s*\d+|(?<![\w&#'\"])#[1-9]\d{0,3}(?![\w])")
FILES = sorted(p for d in ("mmdm", "tests", "notebooks") for p in (ROOT / d).rglob("*")
               if p.suffix in (".py", ".ipynb", ".md", ".yaml") and p.is_file() and p != Path(__file__).resolve())


def issue_references(text: str) -> list[str]:
    return [m.group(0) for m in PATTERN.finditer(text)]


def test_the_pattern_finds_issue_numbers_and_nothing_else():
    assert issue_references("see issue #15, Issue 3 and (#17); issues 12") == ["issue #15", "Issue 3", "#17",
                                                                               "issues 12"]
    assert issue_references("colour '#1f77b4', '#333', \"#555\", #000, #: a comment, x#2y, &#39; and 15 issues") == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_numbers(path: Path):
    found = issue_references(path.read_text(encoding="utf-8", errors="replace"))
    assert not found, f"{path.relative_to(ROOT)} cites issue numbers {found}: say what and why instead"
