"""Cost of the training monitor (:class:`lossport.inspection.Monitor`): step time with and without it.

Demo problem: ``lossport.data.multidigits`` (train split) with ``MultiDigitsNet`` (conv trunk, 3 heads,
automatic losses: two cross-entropies and an MSE), batch 64, Adam, one thread. One step = objective, monitor
(when on), backward, optimizer step. Configurations, each with its own copy of the same initial net, are
interleaved block by block in one process (the machine is shared and noisy); per configuration the median
step time over the blocks is printed, and the overhead is the median over blocks of the ratio to the plain
step of the same block.

* ``plain``: no monitor; ``K=1``, ``K=10``: monitor sampling every step / every 10th step;
* ``upgrad`` and ``upgrad+mon K=1``: with a Gramian balancer the monitor reuses its figures (no extra
  backward), so the pair shows that the monitor is free there.

    .venv/bin/python benchmarks/monitor.py [--blocks 15] [--steps 20]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

import lossport
from lossport.data import MultiDigitsNet, multidigits
from lossport.inspection import Monitor


def make_step(net0: torch.nn.Module, every: int | None, balance: str | None) -> Callable[[dict], None]:
    net = copy.deepcopy(net0)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    objective = lossport.Objective("auto", balance=balance)
    mon = Monitor(every=every) if every is not None else None

    def step(batch: dict) -> None:
        losses = objective(net, batch)
        if mon is not None:
            mon.observe(losses, objective.balancer)
        opt.zero_grad(set_to_none=True)
        losses.total.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20, help="steps per configuration per block (a multiple of 10)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = multidigits("train", size=64 * 40)
    batches = [{k: v[i : i + 64] for k, v in data.items()} for i in range(0, 64 * 40, 64)]
    net0 = MultiDigitsNet()
    configs = {
        "plain": make_step(net0, None, None),
        "K=1": make_step(net0, 1, None),
        "K=10": make_step(net0, 10, None),
        "upgrad": make_step(net0, None, "upgrad"),
        "upgrad+mon K=1": make_step(net0, 1, "upgrad"),
    }
    for step in configs.values():  # warm-up (compilation of the objective, allocator)
        for b in batches[:3]:
            step(b)
    times: dict[str, list[float]] = {k: [] for k in configs}
    k = 0
    for blk in range(args.blocks):
        order = list(configs)[blk % len(configs) :] + list(configs)[: blk % len(configs)]
        for name in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                configs[name](batches[k % len(batches)])
                k += 1
            times[name].append((time.perf_counter() - t0) / args.steps)
    print(f"multidigits, MultiDigitsNet, batch 64, 1 thread; {args.blocks} blocks x {args.steps} steps")
    print(f"{'configuration':<16} {'ms/step':>8} {'overhead':>9}")
    for name, ts in times.items():
        base = "upgrad" if name.startswith("upgrad+") else "plain"
        ratio = statistics.median(t / b for t, b in zip(ts, times[base]))
        over = "-" if name == base else f"{100 * (ratio - 1):+.0f}%"
        print(f"{name:<16} {1000 * statistics.median(ts):>8.2f} {over:>9}")


if __name__ == "__main__":
    main()
