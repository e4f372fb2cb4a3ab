"""Gramian weightings alone (issue 5, item 7 (d)): lossport's torch solvers against TorchJD 0.18.

UPGrad at m = 32, 64, 128 on random PSD Gramians (``G = J J^T``, ``J`` an ``m x 4m`` or ``m x m`` standard
normal matrix, float64), lossport's ``weighting.upgrad`` against TorchJD's ``UPGradWeighting`` (quadprog, one
QP per row), interleaved in one process on one thread; also MGDA (lossport exact vs TorchJD's Frank-Wolfe) and
Nash-MTL / FairGrad (lossport's Newton; TorchJD's FairGrad uses scipy's least_squares; its Nash-MTL needs
cvxpy + ECOS, not installed). Goal: UPGrad at most 5 ms at m = 64 and 20 ms at m = 128 (issue 16 measures it on
warm steps of a training run: ``benchmarks/replay.py``; here every call is cold, on one fixed matrix).

    .venv/bin/python benchmarks/weighting.py            # ~1 minute
    .venv/bin/python benchmarks/weighting.py --quick    # ~15 s
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lossport.balance import weighting as W

try:
    from torchjd.aggregation import FairGradWeighting, MGDAWeighting, UPGradWeighting

    HAVE_TORCHJD = True
except ImportError:  # pragma: no cover
    HAVE_TORCHJD = False


def gramian(m: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, width, generator=g, dtype=torch.float64)
    return J @ J.T


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median milliseconds of each function, the functions called in turn (one warm-up call each)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    reps = 3 if args.quick else 9
    print(f"torch {torch.__version__}, 1 thread, float64 Gramians, median of {reps} interleaved calls\n")
    print("UPGrad weighting alone (goal: <= 5 ms at m = 64, <= 20 ms at m = 128)")
    head = f"{'m':>5} {'J':>8} {'lossport ms':>12} {'torchjd ms':>11} {'torchjd/lossport':>17}"
    print(f"{head} {'max rel diff':>13}")
    for m in (32, 64, 128):
        for width, label in ((4 * m, "m x 4m"), (m, "m x m")):
            G = gramian(m, width, m + width)
            fns: dict[str, Callable[[], object]] = {"lossport": lambda G=G: W.upgrad(G)}
            if HAVE_TORCHJD:
                tj = UPGradWeighting()
                fns["torchjd"] = lambda G=G, tj=tj: tj(G)
            t = interleaved(fns, reps)
            if HAVE_TORCHJD:
                ref = UPGradWeighting()(G)
                diff = float((W.upgrad(G) - ref).abs().max() / ref.abs().max())
                print(
                    f"{m:>5} {label:>8} {t['lossport']:>12.2f} {t['torchjd']:>11.2f} "
                    f"{t['torchjd'] / t['lossport']:>17.1f} {diff:>13.1e}"
                )
            else:
                print(f"{m:>5} {label:>8} {t['lossport']:>12.2f}")

    print("\nMGDA (lossport: exact active set; TorchJD: Frank-Wolfe, eps 1e-3, <= 100 iterations)")
    print(f"{'m':>5} {'lossport ms':>12} {'torchjd ms':>11} {'ratio':>7} {'w^T G w: ours / torchjd':>24}")
    for m in (8, 32, 64, 128):
        G = gramian(m, 4 * m, 7 * m)
        fns = {"lossport": lambda G=G: W.mgda(G)}
        if HAVE_TORCHJD:
            fns["torchjd"] = lambda G=G: MGDAWeighting()(G)
        t = interleaved(fns, reps)
        if HAVE_TORCHJD:
            w, r = W.mgda(G), MGDAWeighting()(G)
            q = float(w @ G @ w) / float(r @ G @ r)
            ratio = t["torchjd"] / t["lossport"]
            print(f"{m:>5} {t['lossport']:>12.2f} {t['torchjd']:>11.2f} {ratio:>7.1f} {q:>24.4f}")
        else:
            print(f"{m:>5} {t['lossport']:>12.2f}")

    print("\nNash-MTL (G a = 1/a) and FairGrad alpha=2 (G w = w^-1/2), G / ||G||_F; lossport Newton vs TorchJD scipy")
    print(f"{'m':>5} {'nash ms':>9} {'fairgrad ms':>12} {'torchjd fairgrad ms':>20} {'ratio':>7}")
    for m in (8, 32, 64):
        G = gramian(m, 4 * m, 11 * m)
        G = G / torch.linalg.matrix_norm(G)
        fns = {"nash": lambda G=G: W.nash_mtl(G), "fair": lambda G=G: W.fairgrad(G, 2.0)}
        if HAVE_TORCHJD:
            fns["torchjd"] = lambda G=G: FairGradWeighting(alpha=2.0)(G)
        t = interleaved(fns, max(1, reps // 3) if m == 64 else reps)
        tj = f"{t['torchjd']:>20.2f} {t['torchjd'] / t['fair']:>7.1f}" if HAVE_TORCHJD else ""
        print(f"{m:>5} {t['nash']:>9.2f} {t['fair']:>12.2f} {tj}")


if __name__ == "__main__":
    main()
