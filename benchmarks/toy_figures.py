"""Toy-problem figures (issue 15): each registered balancer's trajectories from the five standard starts.

The two-task problem of :mod:`lossport.toy` (losses 0.1 L1, L2 as in Nash-MTL and FAMO), Adam. Two modes:

* default: every method of ``lossport.balance.available()`` (or ``--methods``) through :func:`lossport.toy.run`
  (the balancers themselves, so methods registered later are included when the script is rerun) in a cheap
  protocol, Adam lr 3.5e-2 for 1,000 steps (about the distance of the authors' lr 1e-3 for 35,000 steps, but
  not their end points: the sum, MGDA and PCGrad have not crossed the flat region below the x-axis yet from
  some starts); writes ``--out`` (``docs/toy-all.png``), ``--cols`` panels a row, and ``--paper-out`` if given.
  Prints, per method, the end points, how many of the five reached the Pareto set (min-norm residual below
  1e-2, ``x2 < -8.3``, ``|x1| <= 7.05``), the steps that warned and the seconds. A method that cannot run on
  this problem (e.g. Uncertainty weighting needs losses >= 0, Krum needs at least 3 parts) is listed with its
  error.
* ``--authors``: the methods whose papers show the toy (sum, MGDA, PCGrad, CAGrad, Nash-MTL, FAMO, FairGrad) in
  the authors' protocols, Adam lr 1e-3: FAMO for 50,000 steps (its own, ``gamma = 0``) through
  :func:`lossport.toy.run_loss_level`, the others for 35,000 (Nash-MTL's) through
  :func:`lossport.toy.run_batched`; writes ``--paper-out`` (``docs/toy.png``), ~5 min.

    .venv/bin/python benchmarks/toy_figures.py                       # every method, ~1 h on a loaded machine
    .venv/bin/python benchmarks/toy_figures.py --methods ew,mgda,nash_mtl,fairgrad --out /tmp/toy.png
    .venv/bin/python benchmarks/toy_figures.py --authors
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from lossport import toy
from lossport.balance import available

PAPER = toy.PAPER_METHODS


def on_front(end: torch.Tensor) -> bool:
    """Whether ``end`` is on the Pareto set: Pareto-stationary to 1e-2, on the segment ``|x1| <= 7.05`` below
    ``x2 = -8.3``."""
    return toy.pareto_residual(end) < 1e-2 and float(end[1]) < -8.3 and abs(float(end[0])) <= 7.05


def run_method(method: str, steps: int, lr: float) -> tuple[list[toy.Trajectory] | None, int, str]:
    """The five trajectories of ``method``, the number of steps that warned, and an error (empty if it ran)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            trajs = [toy.run(method, s, steps=steps, lr=lr) for s in toy.STARTS]
        except (ValueError, TypeError, RuntimeError) as e:
            return None, len(rec), f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
    return trajs, len(rec), ""


def authors(path: str) -> None:
    """The papers' methods in the authors' protocols (module docstring), one panel each, with their end points."""
    t0 = time.time()
    runs = toy.run_batched([m for m in PAPER if m != "famo"], every=35)
    runs["famo"] = toy.run_loss_level("famo", every=50)
    for m, batch in runs.items():
        ends = " ".join(f"({float(e[0]):6.2f},{float(e[1]):6.2f})" for e in batch.ends)
        front = sum(on_front(e) for e in batch.ends)
        print(f"{m:10s} {ends}  front {front}/5  warned {batch.warned:5d}", flush=True)
    print(f"{time.time() - t0:.0f} s")
    toy.plot({m: runs[m].trajectories() for m in PAPER}, path=path, cols=4)
    print(f"figure: {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="", help="comma-separated names (default: every registered method)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=3.5e-2)
    ap.add_argument("--cols", type=int, default=6)
    ap.add_argument("--out", default="docs/toy-all.png")
    ap.add_argument("--paper-out", default="", help="the papers' methods (default: docs/toy.png with --authors)")
    ap.add_argument("--authors", action="store_true", help="the papers' methods in the authors' protocols")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.authors:
        authors(args.paper_out or "docs/toy.png")
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or available()
    print(f"Adam lr {args.lr:g}, {args.steps} steps, starts {list(toy.STARTS)}")
    ran: dict[str, list[toy.Trajectory]] = {}
    for m in methods:
        t0 = time.time()
        trajs, warned, err = run_method(m, args.steps, args.lr)
        if trajs is None:
            print(f"{m:14s} not run: {err}", flush=True)
            continue
        ran[m] = trajs
        ends = " ".join(f"({float(t.end[0]):6.2f},{float(t.end[1]):6.2f})" for t in trajs)
        front = sum(on_front(t.end) for t in trajs)
        print(f"{m:14s} {ends}  front {front}/5  warned {warned:5d}  {time.time() - t0:5.0f} s", flush=True)
    if args.paper_out:
        paper = {m: ran[m] for m in PAPER if m in ran}
        if paper:
            toy.plot(paper, path=args.paper_out, cols=4)
            print(f"figure: {args.paper_out}")
    if args.out and ran:
        toy.plot(ran, path=args.out, cols=args.cols)
        print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
