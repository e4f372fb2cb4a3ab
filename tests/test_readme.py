"""The README's examples run as printed."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_first_example_runs_and_reports_every_part(capsys):
    code = python_blocks()[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    row = scope["result"].history.rounds[-1]
    for key in ("loss", "digit", "size", "weight/digit", "weight/size"):
        assert key in row
    assert row["weight/size"] == 0.5
    assert "digit" in capsys.readouterr().out
