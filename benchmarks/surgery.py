"""GradDrop and DB-MTL (the methods that work on the gradients themselves) against TorchJD 0.18 and the sum.

Same model and protocol as ``benchmarks/gramian.py`` (trunk Linear 256-512-512-512 ReLU, T heads Linear(512, 1),
MSE, batch 64, one thread; whole training steps, variants interleaved in one process, medians). Variants: ``sum``;
lossport ``GradDrop`` and ``DBMTL`` on the trunk parameters (``params``: the ``T x P`` Jacobian) and on the trunk
output (``features``); TorchJD ``autojac`` (``mtl_backward`` + ``jac_to_grad``) with its ``GradDrop`` aggregator.

Usage: ``python benchmarks/surgery.py`` (about a minute) or ``--reps N``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from gramian import HAVE_TORCHJD, Model, balanced_step, sum_step, timings  # benchmarks/gramian.py

from lossport.balance import DBMTL, GradDrop

if HAVE_TORCHJD:
    from torchjd.aggregation import GradDrop as TJ_GradDrop
    from torchjd.autojac import jac_to_grad, mtl_backward


def variants(m: Model) -> dict[str, Callable[[], None]]:
    out: dict[str, Callable[[], None]] = {
        "sum": sum_step(m),
        "GradDrop params": balanced_step(m, GradDrop()),
        "GradDrop features": balanced_step(m, GradDrop(gramian="features", features="h")),
        "DB-MTL params": balanced_step(m, DBMTL()),
        "DB-MTL features": balanced_step(m, DBMTL(gramian="features", features="h")),
    }
    if HAVE_TORCHJD:
        shared = list(m.trunk.parameters())
        agg = TJ_GradDrop()

        def autojac() -> None:
            m.zero()
            h, ls = m.forward()
            mtl_backward(ls, features=h)
            jac_to_grad(shared, agg)

        out["TorchJD autojac GradDrop"] = autojac
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--T", type=int, nargs="+", default=[2, 8, 32])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread, median ms per step over {args.reps} interleaved reps")
    for T in args.T:
        res = {k: median for k, (median, _) in timings(T, args.reps, variants).items()}
        ref = res.get("TorchJD autojac GradDrop")
        cells = []
        for k, v in res.items():
            ratio = f" ({v / res['sum']:.2f} x sum" + (f", {v / ref:.2f} x TorchJD" if ref and k != "sum" else "") + ")"
            cells.append(f"{k} {v:.1f}{ratio if k != 'sum' else ''}")
        print(f"T={T}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
