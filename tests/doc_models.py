"""The python code blocks of a Markdown page, by the section heading above them (for tests that run docs)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: str) -> dict[str, str]:
    """``{heading: code}`` for each ```` ```python ```` block of ``page`` (relative to the repository root); a
    heading with several blocks gets them joined in order."""
    text = (ROOT / page).read_text()
    out: dict[str, str] = {}
    heading = ""
    pos = 0
    for m in _BLOCK.finditer(text):
        heads = re.findall(r"^#+ (.+)$", text[pos : m.start()], re.M)
        heading = heads[-1].strip() if heads else heading
        out[heading] = out.get(heading, "") + m.group(1)
        pos = m.end()
    return out
