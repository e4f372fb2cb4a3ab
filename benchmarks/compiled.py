"""Step time on a torch.compile'd net against the same net run eagerly, for ``sum``, ``uw`` and ``upgrad``
(``gramian="params"`` and ``"features"``).

Model: trunk Linear 64-256-256 with GELU, three linear heads (3 MSE parts), batch 128, SGD, one thread, the
default backend (inductor). For each method an eager and a compiled copy of the same net are built and warmed
up (the compilation is not timed), then their steps are interleaved in one process (the machines are shared
and noisy) and the median of the per-pair ratios compiled / eager is printed with the median eager step time.

    .venv/bin/python benchmarks/compiled.py [--pairs 100] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import lossport
from lossport.balance import resolve


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, 1) for k in ("a", "b", "c")})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {k: head(h) for k, head in self.heads.items()}


METHODS: list[tuple[str, str, dict]] = [
    ("sum", "sum", {}),
    ("uw", "uw", {}),
    ("upgrad params", "upgrad", {}),
    ("upgrad features", "upgrad", {"gramian": "features"}),
]


def stepper(name: str, kw: dict, compiled: bool, batch: dict, device: str) -> Callable[[], None]:
    torch.manual_seed(0)
    net = Net().to(device)
    balance = None if name == "sum" else resolve(name, **({**kw, "features": net.trunk} if kw else {}))
    objective = lossport.Objective({"a": "mse", "b": "mse", "c": "mse"}, balance=balance)
    model: nn.Module = torch.compile(net) if compiled else net
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)

    def step() -> None:
        losses = objective(model, batch)
        opt.zero_grad(set_to_none=True)
        losses.total.backward()
        opt.step()
        objective.step(model, batch)

    return step


def timed(step: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 64, generator=g)
    batch = {"x": x, "a": x[:, :1], "b": x[:, 1:2].sin(), "c": x[:, 2:3] * x[:, 3:4]}
    batch = {k: v.to(args.device) for k, v in batch.items()}
    print(f"torch {torch.__version__}, {args.device}, {args.pairs} interleaved pairs per method")
    print(f"{'method':<18}{'eager ms/step':>15}{'compiled ms/step':>18}{'compiled / eager':>18}")
    for label, name, kw in METHODS:
        torch._dynamo.reset()
        eager = stepper(name, kw, False, batch, args.device)
        comp = stepper(name, kw, True, batch, args.device)
        for _ in range(5):  # compilation and warm-up, not timed
            eager()
            comp()
        te, tc, ratios = [], [], []
        for _ in range(args.pairs):
            a, b = timed(eager, args.device), timed(comp, args.device)
            te.append(a)
            tc.append(b)
            ratios.append(b / a)
        med_e, med_c = statistics.median(te), statistics.median(tc)
        print(f"{label:<18}{1e3 * med_e:>15.3f}{1e3 * med_c:>18.3f}{statistics.median(ratios):>18.2f}")


if __name__ == "__main__":
    main()
