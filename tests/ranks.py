"""Helpers of the multi-process tests (DDP and FSDP under gloo): the two-head net, a free port, and a two-rank run
whose rank 1 dies."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

import lossport


class TwoHeads(nn.Module):
    """A trunk of ``layers`` Linear(-, 8) + Tanh on 5 inputs, a softmax head ``a`` (3 classes) and a linear head
    ``b`` (2 values); seeded, so every rank builds the same net."""

    def __init__(self, layers: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(*[m for i in range(layers) for m in (nn.Linear(5 if i == 0 else 8, 8), nn.Tanh())])
        self.a = nn.Sequential(nn.Linear(8, 3), nn.Softmax(dim=1))
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"a": self.a(h), "b": self.b(h)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_with_a_dying_rank(worker: Callable[..., None], tmp_path: str, timeout: float) -> str:
    """Start ``worker(rank, port, tmp_path, queue)`` on ranks 0 and 1 (rank 1 is expected to exit with code 3
    mid-run); assert both processes end within ``timeout`` seconds and return what rank 0 reported (its error
    message, or ``"finished"``)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, tmp_path, q)) for r in (0, 1)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    assert all(not p.is_alive() for p in procs)
    assert procs[1].exitcode == 3
    r, msg = q.get(timeout=5)
    assert r == 0, (r, msg)
    assert time.monotonic() - t0 < timeout
    return msg


def train_and_die(rank: int, q: Any, run: Callable[[list[lossport.callbacks.Callback]], object]) -> None:
    """The body of a :func:`run_with_a_dying_rank` worker: ``run(callbacks)`` trains with a callback that makes
    rank 1 exit with code 3, without a word, at the first batch of round 2; the rank puts ``(rank, "finished")``
    or ``(rank, "<error type>: <message>")`` on ``q``."""

    class Die(lossport.callbacks.Callback):
        def on_batch_end(self, state: Any) -> None:
            if rank == 1 and state.round == 2 and state.batch == 0:
                os._exit(3)  # a rank that dies mid-round, without a word

    try:
        run([Die()])
        q.put((rank, "finished"))
    except Exception as e:
        q.put((rank, f"{type(e).__name__}: {e}"))
