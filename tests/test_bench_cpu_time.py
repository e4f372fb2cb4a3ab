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


def test_ratios_pair_each_method_with_its_references():
    med = {"sum": 5.0, "moco": 9.0, "lm:moco": 10.0, "graddrop": 4.0, "tj:graddrop": 8.0, "lm:graddrop": 2.0}
    assert ct.ratios(med) == [
        ("moco", "lm:moco", 0.9),
        ("graddrop", "tj:graddrop", 0.5),
        ("graddrop", "lm:graddrop", 2.0),
    ]
    medians, mins = ct.parse(ct.report(8, "here", med, dict.fromkeys(med, 1.0)))
    assert medians == med and mins == dict.fromkeys(med, 1.0)


def test_trees_are_run_alternately_and_reported_with_ratios(capsys):
    src = str(Path(__file__).resolve().parents[1] / "src")
    ct.main(["3", "sum,graddrop,tj:graddrop", "--reps", "1", "--trees", f"{src},{src}", "--rounds", "1"])
    out = capsys.readouterr().out
    assert out.count(f"lossport from {src} (1 rounds), T = 3") == 2
    assert len(re.findall(r"^  ratio graddrop / tj:graddrop: [0-9.]+$", out, re.M)) == 2
