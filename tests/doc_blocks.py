"""The code blocks of docs/*.md, for the tests that run the recipes exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_block(doc: str, section: str) -> str:
    """The first ```python block under the ``## <section>`` heading of ``docs/<doc>``."""
    text = (DOCS / doc).read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    match = re.search(r"```python\n(.*?)```", body, re.S)
    assert match is not None, f"no python block under '## {section}' in {doc}"
    return match.group(1)
