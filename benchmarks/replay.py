"""UPGrad's weighting on warm steps of a training run (issue 16, item 2): lossport against TorchJD 0.18.

Records the Gramians of a real training run, then replays them in order. The run: ``benchmarks/many_tasks.py``'s
model (Linear 256-512-512-512 ReLU trunk, ``m`` one-output heads, one MSE loss each, targets of a shared rank-8
structure, batch 64) trained for ``--steps`` SGD steps (learning rate ``--lr``) with lossport's ``UPGrad``
balancer; every step's Gramian (``--gramian features``: at the trunk's output, or ``params``: exact, on the
trunk's parameters) is kept in memory (nothing is written to disk).

Replay, one thread, step by step in the run's order: lossport's warm step ``weighting.upgrad_warm(G, V)`` (started
from the previous step's projections ``V``, as the ``UPGrad`` balancer does) at every step; on every
``--every``-th step also lossport's cold ``weighting.upgrad(G)`` and TorchJD's ``UPGradWeighting()(G)`` (quadprog,
one QP per row; stateless), right after the warm step, so the three see the same Gramians under the same load.
Printed: median and 90th percentile of wall-clock ms, the median of CPU ms (``time.process_time``: less moved by
other jobs on a shared machine), the ratios TorchJD / lossport warm of the wall-clock and of the CPU medians over
the same steps, and the largest relative difference of lossport's warm weights to TorchJD's and to its cold solve.

Goals (issue 16): warm steps <= 5 ms at m = 64 and <= 20 ms at m = 128, and >= 10x faster than TorchJD at m = 128.

    .venv/bin/python benchmarks/replay.py                     # m = 32, 64, 128; 200 steps each; ~3 min
    .venv/bin/python benchmarks/replay.py --gramian params    # exact Gramians (the recording takes longer)
    .venv/bin/python benchmarks/replay.py --quick             # m = 32, 64; 60 steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from lossport.balance import UPGrad
from lossport.balance import weighting as W
from lossport.result_types import Losses

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/many_tasks.py, also when loaded by path
from many_tasks import Model

try:
    from torchjd.aggregation import UPGradWeighting

    HAVE_TORCHJD = True
except ImportError:  # pragma: no cover
    HAVE_TORCHJD = False


class Recording(UPGrad):
    """lossport's UPGrad balancer that keeps a float64 copy of every Gramian it weighs."""

    def __init__(self, **engine: Any) -> None:
        super().__init__(**engine)
        self.gramians: list[torch.Tensor] = []

    def weigh(self, G: torch.Tensor, losses: Losses) -> torch.Tensor:
        self.gramians.append(G.detach().to(torch.float64).clone())
        return super().weigh(G, losses)


def record(m: int, steps: int, mode: str = "features", lr: float = 0.01, seed: int = 0) -> list[torch.Tensor]:
    """The Gramians of ``steps`` SGD steps of the many-tasks model with ``m`` heads, trained with UPGrad."""
    model = Model(m, seed=seed)
    bal = Recording(gramian=mode, **({"features": "h"} if mode == "features" else {}))
    opt = torch.optim.SGD(model.params, lr=lr)
    for _ in range(steps):
        model.zero()
        bal(model.losses()).total.backward()
        opt.step()
    return bal.gramians


@dataclass
class Times:
    """Wall-clock and CPU seconds of one weighting over the replayed steps."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    def median_ms(self) -> float:
        return statistics.median(self.wall) * 1e3

    def p90_ms(self) -> float:
        return sorted(self.wall)[int(0.9 * (len(self.wall) - 1))] * 1e3

    def cpu_ms(self) -> float:
        return statistics.median(self.cpu) * 1e3


R = TypeVar("R")


def timed(fn: Callable[..., R], *args: Any) -> tuple[R, float, float]:
    """``fn(*args)``, its wall-clock and its CPU seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - t0, time.process_time() - c0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def replay(gramians: list[torch.Tensor], every: int) -> dict[str, Any]:
    """Time the warm steps over the whole sequence and, every ``every`` steps, cold lossport and TorchJD."""
    warm, warm_sub, cold, tj = Times(), Times(), Times(), Times()
    diff_tj = diff_cold = 0.0
    V: torch.Tensor | None = None
    W.upgrad(gramians[0])  # one untimed call (first-call costs of the torch ops)
    for i, G in enumerate(gramians):
        (w, V), t, c = timed(W.upgrad_warm, G, V)
        if i == 0:  # the first step has nothing to start from: cold
            continue
        warm.add(t, c)
        if i % every:
            continue
        warm_sub.add(t, c)
        wc, t, c = timed(W.upgrad, G)
        cold.add(t, c)
        diff_cold = max(diff_cold, rel(w, wc))
        if HAVE_TORCHJD:
            ref, t, c = timed(UPGradWeighting(), G)
            tj.add(t, c)
            diff_tj = max(diff_tj, rel(w, ref))
    return {"warm": warm, "warm_sub": warm_sub, "cold": cold, "torchjd": tj, "diff_tj": diff_tj, "diff_cold": diff_cold}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="numbers of tasks m")
    ap.add_argument("--steps", type=int, default=200, help="training steps recorded and replayed per m")
    ap.add_argument("--every", type=int, default=8, help="time cold lossport and TorchJD on every k-th step")
    ap.add_argument("--gramian", choices=("features", "params"), default="features")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--quick", action="store_true", help="m = 32, 64 and 60 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.steps = [s for s in args.sizes if s <= 64], min(args.steps, 60)
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, 1 thread; UPGrad on {args.steps} recorded training steps per m ({args.gramian} "
        f"Gramians, SGD lr {args.lr}); lossport warm on every step, cold and TorchJD on every {args.every}th\n"
    )
    head = (
        f"{'m':>4} {'warm ms':>8} {'p90':>6} {'cpu':>6} {'cold ms':>8} {'cpu':>6} {'torchjd ms':>11} {'cpu':>7}"
        f" {'torchjd/warm':>13} {'cpu':>5} {'diff torchjd':>13} {'diff cold':>10}"
    )
    print(head)
    for m in args.sizes:
        t0 = time.perf_counter()
        gramians = record(m, args.steps, args.gramian, args.lr)
        rec = time.perf_counter() - t0
        r = replay(gramians, args.every)
        warm, sub, cold, tj = r["warm"], r["warm_sub"], r["cold"], r["torchjd"]
        line = (
            f"{m:>4} {warm.median_ms():>8.2f} {warm.p90_ms():>6.1f} {warm.cpu_ms():>6.2f} {cold.median_ms():>8.2f} "
            f"{cold.cpu_ms():>6.2f}"
        )
        if HAVE_TORCHJD:
            ratio, cpu_ratio = tj.median_ms() / sub.median_ms(), tj.cpu_ms() / sub.cpu_ms()
            line += f" {tj.median_ms():>11.1f} {tj.cpu_ms():>7.1f} {ratio:>13.1f} {cpu_ratio:>5.0f}"
            line += f" {r['diff_tj']:>13.1e}"
        print(f"{line} {r['diff_cold']:>10.1e}   (recording {rec:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
