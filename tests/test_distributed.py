"""Two gloo processes with half the batch each reproduce one process with the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lossport


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.a = nn.Sequential(nn.Linear(8, 3), nn.Softmax(dim=1))
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = self.trunk(x)
        return {"a": self.a(h), "b": self.b(h)}


def make_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=g)
    a = torch.randint(0, 3, (8,), generator=g)
    b = torch.randn(8, 2, generator=g)
    # uneven missing labels: rank 0 (first half) has 1 labelled 'a', rank 1 has 3; 'b' missing on rank 1 only
    a[[0, 1, 2]] = -100
    b[4:] = float("nan")
    return {"x": x, "a": a, "b": b}


def one_process():
    net = Net()
    obj = lossport.Objective()
    losses = obj(net, make_batch())
    losses.total.backward()
    return {k: v.item() for k, v in losses.parts.items()}, [p.grad.clone() for p in net.parameters()]


def worker(r, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=r, world_size=2)
    try:
        torch.set_num_threads(1)
        net = DDP(Net())
        batch = {k: v[4 * r : 4 * r + 4] for k, v in make_batch().items()}
        obj = lossport.Objective()
        losses = obj(net, batch)  # global parts under torchrun
        losses.total.backward()
        out[r] = ({k: v.item() for k, v in losses.parts.items()}, [p.grad.clone() for p in net.parameters()])
    finally:
        dist.destroy_process_group()


def test_global_losses_give_the_one_process_gradient_with_uneven_labels():
    parts1, grads1 = one_process()
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(worker, args=(free_port(), out), nprocs=2, join=True)
    for r in (0, 1):
        parts, grads = out[r]
        assert parts.keys() == parts1.keys()
        for k in parts1:
            assert parts[k] == pytest.approx(parts1[k], rel=1e-6)
        for g, g1 in zip(grads, grads1):
            assert torch.allclose(g, g1, atol=1e-6), (g, g1)
    for g0, g1 in zip(out[0][1], out[1][1]):
        assert torch.equal(g0, g1)
