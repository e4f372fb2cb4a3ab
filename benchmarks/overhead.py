"""Overhead of one training step through `lossport.Objective` against the same step written by hand.

Model: trunk Linear 256-512-512 with ReLU, 4 outputs (softmax 10 classes, sigmoid, two linear regressions) with
automatic losses, batch 64, Adam, one thread. The two steps are interleaved in one process (the machines are
shared and noisy) and the median of the per-pair time ratios is printed.

    .venv/bin/python benchmarks/overhead.py [--pairs 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import lossport


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
        self.cls = nn.Sequential(nn.Linear(512, 10), nn.Softmax(dim=1))
        self.flag = nn.Sequential(nn.Linear(512, 1), nn.Sigmoid())
        self.r1 = nn.Linear(512, 1)
        self.r2 = nn.Linear(512, 3)

    def forward(self, x):
        h = self.trunk(x)
        return {"cls": self.cls(h), "flag": self.flag(h), "r1": self.r1(h), "r2": self.r2(h)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net_a, net_b = Net(), Net()
    net_b.load_state_dict(net_a.state_dict())
    opt_a = torch.optim.Adam(net_a.parameters(), 1e-3)
    opt_b = torch.optim.Adam(net_b.parameters(), 1e-3)
    g = torch.Generator().manual_seed(1)
    batch = {
        "x": torch.randn(64, 256, generator=g),
        "cls": torch.randint(0, 10, (64,), generator=g),
        "flag": torch.randint(0, 2, (64, 1), generator=g).float(),
        "r1": torch.randn(64, 1, generator=g),
        "r2": torch.randn(64, 3, generator=g),
    }
    objective = lossport.Objective()

    def step_lossport() -> float:
        losses = objective(net_a, batch)
        opt_a.zero_grad(set_to_none=True)
        losses.total.backward()
        opt_a.step()
        return losses.total.item()

    def step_hand() -> float:
        h = net_b.trunk(batch["x"])
        logits = net_b.cls[0](h)
        flag_logit = net_b.flag[0](h)
        total = (
            F.cross_entropy(logits, batch["cls"])
            + F.binary_cross_entropy_with_logits(flag_logit, batch["flag"])
            + F.mse_loss(net_b.r1(h), batch["r1"])
            + F.mse_loss(net_b.r2(h), batch["r2"])
        )
        opt_b.zero_grad(set_to_none=True)
        total.backward()
        opt_b.step()
        return total.item()

    for _ in range(20):
        step_lossport()
        step_hand()
    # both compute the same loss (same init, same steps)
    a, b = step_lossport(), step_hand()
    assert abs(a - b) < 1e-3 * max(1.0, abs(b)), (a, b)
    ratios, ta, tb = [], [], []
    for i in range(args.pairs):
        order = (step_lossport, step_hand) if i % 2 == 0 else (step_hand, step_lossport)
        times = {}
        for f in order:
            t0 = time.perf_counter()
            f()
            times[f.__name__] = time.perf_counter() - t0
        ta.append(times["step_lossport"])
        tb.append(times["step_hand"])
        ratios.append(times["step_lossport"] / times["step_hand"])
    print(f"hand-written step  median {statistics.median(tb) * 1e3:.2f} ms")
    print(f"lossport step      median {statistics.median(ta) * 1e3:.2f} ms")
    print(f"median ratio lossport / hand: {statistics.median(ratios):.3f}  (goal <= 1.05, {args.pairs} pairs)")


if __name__ == "__main__":
    main()
