"""CPU time per training step of some methods and their references (issue 15, "Performance"), for before/after
comparisons of lossport's code on a shared machine.

The same steps as ``benchmarks/methods.py`` (same model, same lossport and reference steps), timed with
``time.process_time`` (the process's CPU time, so other jobs on the machine count less than in wall time), two
untimed warm-up steps each, then ``reps`` interleaved rounds; prints the median and the minimum in ms. Names:
``sum``, a lossport method, ``tj:<method>`` (TorchJD's reference) or ``lm:<method>`` (LibMTL's, with ``--libmtl``).
Run it once per source tree to compare two versions of lossport::

    PYTHONPATH=/old/src python benchmarks/cpu_time.py 8 sum,uw,tj:uw,moco,lm:moco --libmtl /path/to/LibMTL
    PYTHONPATH=src      python benchmarks/cpu_time.py 8 sum,uw,tj:uw,moco,lm:moco --libmtl /path/to/LibMTL
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import methods as M
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("T", type=int, help="number of parts")
    ap.add_argument("names", help="comma-separated: sum, lossport methods, tj:<method>, lm:<method>")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--libmtl", default=None, help="a LibMTL source checkout (directory holding LibMTL/)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    todo = steps(args.T, args.names.split(","), args.libmtl)
    for step in todo.values():
        step()
        step()
    times: dict[str, list[float]] = {n: [] for n in todo}
    for _ in range(args.reps):
        for n, step in todo.items():
            t = time.process_time()
            step()
            times[n].append(time.process_time() - t)
    import lossport

    print(f"lossport from {os.path.dirname(lossport.__file__)}, T = {args.T}, CPU ms per step: median / min")
    for n, v in times.items():
        print(f"  {n:16s} {statistics.median(v) * 1e3:8.1f} / {min(v) * 1e3:8.1f}")


if __name__ == "__main__":
    main()
