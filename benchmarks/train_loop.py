"""Epoch time of `lossport.train` against a hand-written loop with the same model, DataLoader and optimizer.

Two models, both with three outputs (a 10-class head with cross-entropy and regressions with MSE), Adam
(lr 1e-3), batches of 64, one thread, the same DataLoader (shuffled index batches slicing in-memory tensors,
cheap, so that the loops' own overhead shows):

* ``mlp``: trunk Linear 128-256-256 ReLU, heads 10 / 1 / 3; 4096 random examples (64 steps of ~3.5 ms). Short
  steps: the fixed Python cost per step is what this one measures.
* ``conv``: the trunk of :class:`lossport.data.MultiDigitsNet` (two 3x3 conv layers of 16 channels, Linear
  1600-64) with logit heads left / right and the ink regression, on 2048 examples of the built-in
  :func:`lossport.data.multidigits` (32 steps).

Loops, interleaved in one process (the machines are shared and noisy), rotating which goes first:

* ``hand``: the bare minimum (forward, the sum of the losses with ``torch.nn.functional``, zero_grad,
  backward, step);
* ``objective``: the same loop with the loss computed by ``lossport.Objective`` (splits the gap into the
  objective's share and the trainer's);
* ``train``: ``lossport.train(epochs=1)``, which per call compiles the objective and builds the optimizer,
  and per batch checks every part for finiteness and records per-part, per-batch and per-round history (no
  validation, no progress).

Both the wall time and the process CPU time of every epoch are measured (with one thread and no DataLoader
workers the CPU time is the work done, without the time other processes on a shared machine take); the
medians of the per-run ratios are printed, and the per-step overhead in microseconds.

    .venv/bin/python benchmarks/train_loop.py [--pairs 40] [--models mlp,conv]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from lossport import Objective
from lossport import train as lossport_train
from lossport.data import multidigits


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        self.cls = nn.Linear(256, 10)
        self.r1 = nn.Linear(256, 1)
        self.r2 = nn.Linear(256, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {"cls": self.cls(h), "r1": self.r1(h), "r2": self.r2(h)}


class Conv(nn.Module):
    """MultiDigitsNet's trunk (width 16) with logit heads."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(1600, 64),
            nn.ReLU(),
        )
        self.left = nn.Linear(64, 10)
        self.right = nn.Linear(64, 10)
        self.ink = nn.Linear(64, 1)

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        h = self.trunk(image)
        return {"left": self.left(h), "right": self.right(h), "ink": self.ink(h)}


class Sliced(Dataset):
    """``dataset[list_of_indices]`` -> a dict batch (used with ``batch_size=None`` and a BatchSampler)."""

    def __init__(self, d: dict[str, Tensor]) -> None:
        self.d = d

    def __len__(self) -> int:
        return len(next(iter(self.d.values())))

    def __getitem__(self, idx: list[int]) -> dict[str, Tensor]:
        i = torch.as_tensor(idx)
        return {k: v.index_select(0, i) for k, v in self.d.items()}


def loader_of(d: dict[str, Tensor], batch: int, seed: int) -> DataLoader:
    ds = Sliced(d)
    sampler = BatchSampler(RandomSampler(ds, generator=torch.Generator().manual_seed(seed)), batch, drop_last=False)
    return DataLoader(ds, batch_size=None, sampler=sampler)


def mlp_data(n: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 128, generator=g)
    return {"x": x, "cls": torch.randint(0, 10, (n,), generator=g), "r1": x[:, :1] * 2, "r2": x[:, 1:4] - 1}


def mlp_loss(out: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(out["cls"], b["cls"]) + F.mse_loss(out["r1"], b["r1"]) + F.mse_loss(out["r2"], b["r2"])


def conv_loss(out: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
    return (
        F.cross_entropy(out["left"], b["left"])
        + F.cross_entropy(out["right"], b["right"])
        + F.mse_loss(out["ink"], b["ink"])
    )


MODELS: dict[str, dict] = {
    "mlp": {
        "net": MLP,
        "data": lambda: mlp_data(4096),
        "input": "x",
        "hand_loss": mlp_loss,
        "spec": {"cls": "ce", "r1": "mse", "r2": "mse"},
        "label": "MLP 128-256-256 + heads 10/1/3, 4096 examples",
    },
    "conv": {
        "net": Conv,
        "data": lambda: multidigits("train", size=2048),
        "input": "image",
        "hand_loss": conv_loss,
        "spec": {"left": "ce", "right": "ce", "ink": "mse"},
        "label": "conv trunk of MultiDigitsNet + heads 10/10/1, 2048 multidigits examples",
    },
}


def make_loops(cfg: dict) -> dict[str, Callable[[nn.Module, DataLoader], None]]:
    inp, hand_loss, spec = cfg["input"], cfg["hand_loss"], cfg["spec"]

    def hand(net: nn.Module, loader: DataLoader) -> None:
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        net.train()
        for b in loader:
            loss = hand_loss(net(b[inp]), b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def objective(net: nn.Module, loader: DataLoader) -> None:
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        obj = Objective(spec)
        net.train()
        for b in loader:
            loss = obj(net, b).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def train(net: nn.Module, loader: DataLoader) -> None:
        lossport_train(net, loader, spec, epochs=1, lr=1e-3, progress=False, device="cpu")

    return {"hand": hand, "objective": objective, "train": train}


def q(xs: list[float]) -> str:
    qs = statistics.quantiles(xs, n=4)
    return f"{statistics.median(xs):.3f} (quartiles {qs[0]:.3f}-{qs[2]:.3f})"


def run(name: str, pairs: int, batch: int) -> None:
    cfg = MODELS[name]
    data = cfg["data"]()
    loader = loader_of(data, batch, 0)
    steps = len(loader)
    loops = make_loops(cfg)
    torch.manual_seed(0)
    base = cfg["net"]()
    for fn in loops.values():  # warm-up
        fn(cfg["net"](), loader)
    wall: dict[str, list[float]] = {k: [] for k in loops}
    cpu: dict[str, list[float]] = {k: [] for k in loops}
    names = list(loops)
    for i in range(pairs):
        for which in names[i % 3 :] + names[: i % 3]:  # rotate which goes first
            net = cfg["net"]()
            net.load_state_dict(base.state_dict())
            t0, c0 = time.perf_counter(), time.process_time()
            loops[which](net, loader)
            cpu[which].append(time.process_time() - c0)
            wall[which].append(time.perf_counter() - t0)
    print(f"\n[{name}] {cfg['label']}, batch {batch} ({steps} steps/epoch), Adam, 1 thread, {pairs} triples")
    for label, times in (("wall", wall), ("cpu", cpu)):
        h, o, t = (statistics.median(times[k]) for k in ("hand", "objective", "train"))
        print(
            f"  {label:4s} ms/epoch: hand {h * 1e3:7.1f}   hand+Objective {o * 1e3:7.1f}   lossport.train "
            f"{t * 1e3:7.1f}   (train - hand: {(t - h) / steps * 1e6:5.0f} us/step, of which Objective "
            f"{(o - h) / steps * 1e6:5.0f})"
        )
        for rl, a, b in (
            ("train / hand", "train", "hand"),
            ("Objective loop / hand", "objective", "hand"),
            ("train / Objective loop", "train", "objective"),
        ):
            print(f"  {label:4s} {rl:24s}: median {q([x / y for x, y in zip(times[a], times[b])])}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--models", default="mlp,conv")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(MODELS)}")
        run(name, args.pairs, args.batch)
    print("\ntarget: lossport.train / hand <= 1.10")


if __name__ == "__main__":
    main()
