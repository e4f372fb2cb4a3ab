"""Epoch time of `lossport.train` against a hand-written loop with the same model, DataLoader and optimizer.

Model: trunk Linear 128-256-256 with ReLU and three heads (10-class logits with cross-entropy, two linear
regressions with MSE); 4096 examples in batches of 64 (64 steps per epoch); Adam (lr 1e-3); one thread. The
DataLoader draws shuffled index batches and slices the tensors (cheap, so that the loop's own overhead shows).

The hand-written loop is the bare minimum (forward, the sum of the three losses, zero_grad, backward, step).
``lossport.train(epochs=1)`` does all it does per call: compile the objective, build the optimizer, check
every part for finiteness, record per-part, per-batch and per-round history, evaluate nothing else (no
validation, no progress). The loops are interleaved in one process (the machines are shared and noisy),
rotating which goes first, and the median of the per-run time ratios is printed. A third loop, the
hand-written one with the loss computed by ``lossport.Objective``, splits the ratio into the objective's
share and the trainer's.

    .venv/bin/python benchmarks/train_loop.py [--pairs 20] [--epochs 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from lossport import Objective
from lossport import train as lossport_train


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        self.cls = nn.Linear(256, 10)
        self.r1 = nn.Linear(256, 1)
        self.r2 = nn.Linear(256, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {"cls": self.cls(h), "r1": self.r1(h), "r2": self.r2(h)}


class Sliced(Dataset):
    """``dataset[list_of_indices]`` -> a dict batch (used with ``batch_size=None`` and a BatchSampler)."""

    def __init__(self, d: dict[str, Tensor]) -> None:
        self.d = d

    def __len__(self) -> int:
        return len(self.d["x"])

    def __getitem__(self, idx: list[int]) -> dict[str, Tensor]:
        i = torch.as_tensor(idx)
        return {k: v.index_select(0, i) for k, v in self.d.items()}


def make_loader(n: int, batch: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 128, generator=g)
    d = {
        "x": x,
        "cls": torch.randint(0, 10, (n,), generator=g),
        "r1": x[:, :1] * 2,
        "r2": x[:, 1:4] - 1,
    }
    ds = Sliced(d)
    sampler = BatchSampler(
        RandomSampler(ds, generator=torch.Generator().manual_seed(seed)), batch, drop_last=False
    )
    return DataLoader(ds, batch_size=None, sampler=sampler)


def hand_loop(net: nn.Module, loader: DataLoader, epochs: int) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(epochs):
        for b in loader:
            out = net(b["x"])
            loss = (
                F.cross_entropy(out["cls"], b["cls"])
                + F.mse_loss(out["r1"], b["r1"])
                + F.mse_loss(out["r2"], b["r2"])
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def objective_loop(net: nn.Module, loader: DataLoader, epochs: int) -> None:
    """The hand-written loop with the loss computed by lossport.Objective (separates the trainer's cost from
    the objective's)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    objective = Objective({"cls": "ce", "r1": "mse", "r2": "mse"})
    net.train()
    for _ in range(epochs):
        for b in loader:
            loss = objective(net, b).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def lossport_loop(net: nn.Module, loader: DataLoader, epochs: int) -> None:
    lossport_train(
        net,
        loader,
        {"cls": "ce", "r1": "mse", "r2": "mse"},
        epochs=epochs,
        lr=1e-3,
        progress=False,
        device="cpu",
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--examples", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loader = make_loader(args.examples, args.batch, 0)
    torch.manual_seed(0)
    base = Net()
    # warm-up
    hand_loop(Net(), loader, 1)
    objective_loop(Net(), loader, 1)
    lossport_loop(Net(), loader, 1)
    loops = {"hand": hand_loop, "objective": objective_loop, "lossport": lossport_loop}
    times: dict[str, list[float]] = {k: [] for k in loops}
    for i in range(args.pairs):
        names = list(loops)
        order = names[i % 3 :] + names[: i % 3]  # rotate which goes first
        for which in order:
            net = Net()
            net.load_state_dict(base.state_dict())
            t0 = time.perf_counter()
            loops[which](net, loader, args.epochs)
            times[which].append((time.perf_counter() - t0) / args.epochs)
    ratios = [a / b for a, b in zip(times["lossport"], times["hand"])]
    obj_ratios = [a / b for a, b in zip(times["objective"], times["hand"])]
    trainer_ratios = [a / b for a, b in zip(times["lossport"], times["objective"])]
    t_hand, t_obj, t_lp = times["hand"], times["objective"], times["lossport"]
    steps = (args.examples + args.batch - 1) // args.batch
    print(
        f"model 128-256-256 + 3 heads, {args.examples} examples, batch {args.batch} ({steps} steps/epoch), "
        f"Adam, 1 thread, {args.pairs} interleaved triples of {args.epochs} epoch(s)"
    )
    print(f"hand-written loop       : median {statistics.median(t_hand) * 1e3:8.1f} ms/epoch")
    print(f"hand loop + Objective   : median {statistics.median(t_obj) * 1e3:8.1f} ms/epoch")
    print(f"lossport.train          : median {statistics.median(t_lp) * 1e3:8.1f} ms/epoch")
    for label, rs in (
        ("lossport.train / hand", ratios),
        ("Objective loop / hand", obj_ratios),
        ("lossport.train / Objective loop", trainer_ratios),
    ):
        q = statistics.quantiles(rs, n=4)
        print(f"{label:32s}: median {statistics.median(rs):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})")
    print("target: lossport.train / hand <= 1.10")


if __name__ == "__main__":
    main()
