"""CPU time per training step of some methods and their references (issue 15, "Performance"), for before/after
comparisons of lossport's code on a shared machine.

The same steps as ``benchmarks/methods.py`` (same model, same lossport and reference steps), timed with
``time.process_time`` (the process's CPU time, so other jobs on the machine count less than in wall time), two
untimed warm-up steps each, then ``reps`` interleaved rounds; prints the median and the minimum in ms. Names:
``sum``, a lossport method, ``tj:<method>`` (TorchJD's reference) or ``lm:<method>`` (LibMTL's, with ``--libmtl``).
Run it once per source tree to compare two versions of lossport::

    PYTHONPATH=/old/src python benchmarks/cpu_time.py 8 sum,uw,tj:uw,moco,lm:moco --libmtl /path/to/LibMTL
    PYTHONPATH=src      python benchmarks/cpu_time.py 8 sum,uw,tj:uw,moco,lm:moco --libmtl /path/to/LibMTL

Each method named with its reference (``moco`` and ``lm:moco``) gets its ratio printed (method / reference,
medians). ``--trees OLD,NEW --rounds R`` does the before/after comparison itself: it runs this script in a fresh
process per source tree (``PYTHONPATH`` set to each, one thread), the trees alternately, ``R`` times, then prints
per tree the median over the rounds of each step's median and the ratios::

    python benchmarks/cpu_time.py 8 sum,moco,lm:moco --libmtl /path/to/LibMTL --trees /old/src,src --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import methods as M
from gramian import interleaved_rounds
from many_tasks import Model


def steps(T: int, names: list[str], libmtl: str | None) -> dict[str, Callable[[], None]]:
    """A step per name, each on its own copy of the model (same initial weights)."""
    tj = M.torchjd_references() if any(n.startswith("tj:") for n in names) else {}
    lm = M.libmtl_references(libmtl) if any(n.startswith("lm:") for n in names) else {}
    out: dict[str, Callable[[], None]] = {}
    for n in names:
        if n == "sum":
            out[n] = M.sum_step(Model(T))
        elif n.startswith("tj:"):
            out[n] = tj[n[3:]](Model(T))
        elif n.startswith("lm:"):
            out[n] = lm[n[3:]](Model(T))
        else:
            out[n] = M.lossport_step(Model(T), n)
    return out


def ratios(medians: dict[str, float]) -> list[tuple[str, str, float]]:
    """``(method, reference, method's median / reference's)`` for each method named with a reference."""
    return [
        (n, r, medians[n] / medians[r])
        for n in medians
        if ":" not in n
        for r in (f"tj:{n}", f"lm:{n}")
        if r in medians and medians[r] > 0
    ]


def report(T: int, where: str, medians: dict[str, float], mins: dict[str, float]) -> str:
    """The table printed (and parsed by :func:`parse` in ``--trees`` runs): median / min per step, then ratios."""
    lines = [f"lossport from {where}, T = {T}, CPU ms per step: median / min"]
    lines += [f"  {n:16s} {medians[n]:8.1f} / {mins[n]:8.1f}" for n in medians]
    lines += [f"  ratio {n} / {r}: {x:.2f}" for n, r, x in ratios(medians)]
    return "\n".join(lines)


def parse(out: str) -> tuple[dict[str, float], dict[str, float]]:
    """The medians and minima of a :func:`report`."""
    rows = re.findall(r"^  (\S+)\s+([0-9.]+) /\s+([0-9.]+)$", out, re.M)
    return {n: float(a) for n, a, _ in rows}, {n: float(b) for n, _, b in rows}


def compare_trees(trees: list[str], args: list[str], rounds: int) -> None:
    """Run this script with ``args`` once per tree and round (the trees alternately, a fresh process each) and
    print per tree the median over the rounds of each step's median, the minimum of the minima, and the ratios."""
    runs: list[list[tuple[dict[str, float], dict[str, float]]]] = [[] for _ in trees]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(rounds):
        for i, tree in enumerate(trees):
            done = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *args],
                env={**env, "PYTHONPATH": os.path.abspath(tree)},
                capture_output=True,
                text=True,
                check=True,
            )
            runs[i].append(parse(done.stdout))
    T = int(args[0])
    for tree, got in zip(trees, runs):
        medians = {n: statistics.median(m[n] for m, _ in got) for n in got[0][0]}
        mins = {n: min(m[n] for _, m in got) for n in got[0][1]}
        print(report(T, f"{tree} ({rounds} rounds)", medians, mins))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("T", type=int, help="number of parts")
    ap.add_argument("names", help="comma-separated: sum, lossport methods, tj:<method>, lm:<method>")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--libmtl", default=None, help="a LibMTL source checkout (directory holding LibMTL/)")
    ap.add_argument("--trees", default=None, help="comma-separated source trees (each holding lossport/) to compare")
    ap.add_argument("--rounds", type=int, default=1, help="with --trees: runs per tree, alternately")
    args = ap.parse_args(argv)
    if args.trees:
        rest = [str(args.T), args.names, "--reps", str(args.reps)] + (["--libmtl", args.libmtl] if args.libmtl else [])
        compare_trees(args.trees.split(","), rest, args.rounds)
        return
    torch.set_num_threads(1)
    times = interleaved_rounds(steps(args.T, args.names.split(","), args.libmtl), args.reps, 2, time.process_time)
    import lossport

    medians = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    mins = {n: min(v) * 1e3 for n, v in times.items()}
    print(report(args.T, os.path.dirname(lossport.__file__), medians, mins))


if __name__ == "__main__":
    main()
