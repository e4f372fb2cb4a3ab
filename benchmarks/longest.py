"""Print the five longest functions in src/ (lines from ``def`` to the end of the body, docstring included).
Rerun: ``python benchmarks/longest.py``."""

import ast
import pathlib

rows = [
    (n.end_lineno - n.lineno + 1, f"{f}:{n.lineno} {n.name}")
    for f in sorted(pathlib.Path(__file__).resolve().parents[1].joinpath("src").rglob("*.py"))
    for n in ast.walk(ast.parse(f.read_text()))
    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
]
print("\n".join(f"{k:4d}  {w}" for k, w in sorted(rows, reverse=True)[:5]))
