"""benchmarks/cpu_time.py: the CPU-time comparison of a few steps (a smoke run at T = 3)."""

import importlib.util
import re
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_time.py"
sys.path.insert(0, str(_PATH.parent))
_spec = importlib.util.spec_from_file_location("bench_cpu_time", _PATH)
assert _spec is not None and _spec.loader is not None
ct = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ct)


def test_each_named_step_is_timed(capsys):
    ct.main(["3", "sum,uw,tj:uw", "--reps", "2"])
    out = capsys.readouterr().out
    for name in ("sum", "uw", "tj:uw"):
        m = re.search(rf"^  {re.escape(name)}\s+([0-9.]+) /\s+([0-9.]+)$", out, re.M)
        assert m is not None, out
        assert 0 < float(m.group(2)) <= float(m.group(1))  # min <= median, both positive
