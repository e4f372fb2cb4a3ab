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
    fairgrad_near_the_front(reps)


def toy_gramian(x1: float, x2: float) -> torch.Tensor:
    """The Gramian of the two gradients of :mod:`lossport.toy` (losses 0.1 L1, L2) at ``(x1, x2)``."""
    from lossport import toy

    x = torch.tensor([x1, x2], dtype=torch.float64, requires_grad=True)
    l1, l2 = toy.losses(x)
    J = torch.stack([torch.autograd.grad(l1, x, retain_graph=True)[0], torch.autograd.grad(l2, x)[0]])
    return J @ J.T


def fairgrad_near_the_front(reps: int) -> None:
    """FairGrad (alpha 2) on toy Gramians ``delta`` above the Pareto set at x1 = -3, 0, 3, 5: cold, warm-started
    from the root at ``delta * 1.01`` (a previous step), and the authors' ``least_squares`` (default tolerances,
    from 1/T: it stops early there; its relative residual is printed). ``bounded``: how many of the 4 took the
    bounded (ridge) problem instead of the root (the weighted gradients cancel beyond 1e-4: 1 + cos < 1e-8)."""
    import warnings

    import numpy as np

    try:
        from scipy.optimize import least_squares
    except ImportError:  # pragma: no cover
        return
    print("\nFairGrad alpha=2 near the toy problem's front (4 points; ms per call, median; residual: relative, max)")
    head = f"{'delta':>7} {'1+cos':>8} {'cold ms':>8} {'warm ms':>8} {'authors ms':>11} {'ours resid':>11}"
    print(f"{head} {'authors resid':>14} {'bounded':>8}")
    front = [(-3.0, -8.3705), (0.0, -8.3551), (3.0, -8.3705), (5.0, -8.3969)]
    for delta in (1e-1, 1e-2, 1e-3):
        Gs = [toy_gramian(x1, x2 + delta) for x1, x2 in front]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prev = [W.fairgrad(toy_gramian(x1, x2 + 1.01 * delta), 2.0) for x1, x2 in front]

            def authors(G: torch.Tensor) -> np.ndarray:
                A = G.numpy()
                f = lambda x: A @ x - np.power(1 / x, 0.5)  # noqa: E731
                return least_squares(f, np.ones(2) / 2, bounds=(0, np.inf)).x

            fns = {
                "cold": lambda Gs=Gs: [W.fairgrad(G, 2.0) for G in Gs],
                "warm": lambda Gs=Gs, prev=prev: [W.fairgrad(G, 2.0, p) for G, p in zip(Gs, prev)],
                "authors": lambda Gs=Gs: [authors(G) for G in Gs],
            }
            t = interleaved(fns, reps)
            theirs = [torch.from_numpy(authors(G)) for G in Gs]
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            ours = [W.fairgrad(G, 2.0) for G in Gs]

        def resid(G: torch.Tensor, w: torch.Tensor) -> float:
            return float((G @ w - w**-0.5).abs().max() / (w**-0.5).abs().max())

        cos = max(float(1 + G[0, 1] / (G[0, 0] * G[1, 1]).sqrt()) for G in Gs)
        r_ours = max(resid(G, w) for G, w in zip(Gs, ours))
        r_theirs = max(resid(G, w) for G, w in zip(Gs, theirs))
        print(
            f"{delta:>7g} {cos:>8.1e} {t['cold'] / 4:>8.2f} {t['warm'] / 4:>8.2f} {t['authors'] / 4:>11.2f} "
            f"{r_ours:>11.1e} {r_theirs:>14.1e} {len(rec):>8}"
        )


if __name__ == "__main__":
    main()
