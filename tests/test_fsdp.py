"""FSDP2 (``fully_shard``): two gloo processes with half the batch each train like one process on the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lossport
from lossport.balance import MGDA, UPGrad

pytest.importorskip("torch.distributed.fsdp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.a = nn.Sequential(nn.Linear(8, 3), nn.Softmax(dim=1))
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = self.trunk(x)
        return {"a": self.a(h), "b": self.b(h)}


def train_data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 5, generator=g)
    a = torch.randint(0, 3, (32,), generator=g)
    b = torch.randn(32, 2, generator=g)
    a[::7] = -100  # missing labels, unevenly spread over the ranks' slices
    b[20:24] = float("nan")
    return {"x": x, "a": a, "b": b}


CASES = {
    "ew": lambda net: None,
    "uw": lambda net: "uw",
    "famo": lambda net: "famo",
    "upgrad_params": lambda net: UPGrad(),
    "upgrad_features": lambda net: UPGrad(gramian="features", features=net.trunk),
    "mgda_features": lambda net: MGDA(gramian="features", features=net.trunk),
}


def full(p):
    """The whole tensor of a parameter (gathered from the ranks' shards under FSDP: a collective)."""
    p = p.detach()
    return p.full_tensor().clone() if hasattr(p, "full_tensor") else p.clone()


def run_train(case, batch_size, **kw):
    torch.manual_seed(0)
    net = Net()
    result = lossport.train(
        net, train_data(), balance=CASES[case](net), epochs=2, batch_size=batch_size, seed=3, progress=False,
        lr=1e-2, **kw,
    )  # fmt: skip
    weights = [{k: v for k, v in row.items() if k.startswith("weight/")} for row in result.history.rounds]
    losses = [row["loss"] for row in result.history.rounds]
    return [full(p) for p in net.parameters()], weights, losses


def launch(r, port, extra=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r))
    os.environ.update(extra or {})
    torch.set_num_threads(1)


def train_worker(r, port, out):
    launch(r, port)
    try:
        out[r] = {case: run_train(case, 8, distributed="fsdp") for case in CASES}  # 2 x 8 = the batch of 16
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_runs():
    out = mp.Manager().dict()
    mp.spawn(train_worker, args=(free_port(), out), nprocs=2, join=True)
    return dict(out)


@pytest.mark.parametrize("case", list(CASES))
def test_two_sharded_ranks_train_like_one_process(case, two_rank_runs):
    params1, weights1, losses1 = run_train(case, 16)
    for r in (0, 1):
        params, weights, losses = two_rank_runs[r][case]
        for p, p1 in zip(params, params1, strict=True):
            assert torch.allclose(p, p1, atol=1e-5), (case, r, (p - p1).abs().max())
        for w, w1 in zip(weights, weights1, strict=True):
            assert w.keys() == w1.keys()
            for k in w1:
                assert w[k] == pytest.approx(w1[k], rel=1e-5, abs=1e-6)
        assert losses == pytest.approx(losses1, rel=1e-5)
