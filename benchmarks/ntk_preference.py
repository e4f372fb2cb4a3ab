"""Cost of a step of COSMOS, PBI, NTKMTL and NTKMTL-SR (issue 15) beside the reference implementations' rules.

Model: TorchJD's benchmark model (``benchmarks/gramian.py``: Linear 256-512-512-512 trunk, ``T`` heads
``Linear(512, 1)``, one MSE loss per head, batch 64), one thread, ``T = 8`` and ``32``. One step = gradients
set to None, forward, the weights, one backward (no optimizer step). Reference steps, written here from the
references' rules (their code is not installed here, or, for TorchJD, only its scalarizers are):

* ``torchjd cosmos`` / ``torchjd pbi``: ``torchjd.scalarization.COSMOS(1.0, r)`` / ``PBI(5.0, r)`` on the
  stacked losses, then one backward (TorchJD 0.18, installed);
* ``authors ntkmtl``: the authors' NTKMTL step (github.com/jianke0604/NTKMTL, ``weight_methods.py``): one
  backward per task, each task's shared gradient copied into a ``P x T`` matrix, ``w = (tr(G) / diag G)^0.5``,
  the shared gradient overwritten by ``T G w`` (heads keep their accumulated gradients);
* ``authors ntkmtl_sr``: their NTKMTL-SR step: per-example losses cut into 4 chunks, one ``autograd.grad``
  per task and chunk with respect to ``z``, the largest eigenvalue of each task's ``4 x 4`` kernel, one backward
  of the weighted mean losses.

The median over ``--reps`` interleaved rounds is printed with its ratio to the plain sum and lossport's ratio to
the reference. Rerun: ``.venv/bin/python benchmarks/ntk_preference.py`` (about a minute on the 2-core machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

import torch
from torch import nn
from torchjd import scalarization as S

from lossport.balance import COSMOS, NTKMTL, NTKMTLSR, PBI, Balancer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gramian import Model, balanced_step, interleaved_rounds, sum_step


def scalarizer_step(m: Model, scalarizer: nn.Module) -> Callable[[], None]:
    def step() -> None:
        m.zero()
        _, ls = m.forward()
        scalarizer(torch.stack(ls)).backward()

    return step


def authors_ntkmtl_step(m: Model) -> Callable[[], None]:
    shared = list(m.trunk.parameters())
    dims = [p.numel() for p in shared]

    def step() -> None:
        m.zero()
        _, ls = m.forward()
        grads = torch.zeros(sum(dims), m.T)
        for i, loss in enumerate(ls):
            loss.backward(retain_graph=i < m.T - 1)
            grads[:, i] = torch.cat([p.grad.flatten() for p in shared])
            for p in shared:
                p.grad = None
        GTG = grads.T @ grads
        w = (torch.trace(GTG) / GTG.diagonal()) ** 0.5
        g = m.T * (grads @ w)
        for p, chunk in zip(shared, torch.split(g, dims)):
            p.grad = chunk.view_as(p).clone()

    return step


def authors_sr_step(m: Model, n: int = 4) -> Callable[[], None]:
    def step() -> None:
        m.zero()
        z = m.trunk(m.x)
        per = torch.stack([(m.heads[t](z).squeeze(1) - m.y[:, t]) ** 2 for t in range(m.T)], dim=1)  # B x T
        chunks = torch.stack([c.mean(0) for c in torch.chunk(per, n, dim=0)])  # n x T
        lam = torch.zeros(m.T, dtype=torch.float64)
        for i in range(m.T):
            J = torch.stack([torch.autograd.grad(chunks[j, i], z, retain_graph=True)[0].flatten() for j in range(n)])
            lam[i] = torch.linalg.eigvalsh((J @ J.T).double())[-1]
        w = ((lam.sum() / lam) ** 0.5).to(per.dtype)
        (chunks.mean(0) * w).sum().backward()

    return step


def variants(m: Model) -> dict[str, Callable[[], None]]:
    r = torch.full((m.T,), 1.0 / m.T)
    bals: dict[str, Balancer] = {
        "cosmos": COSMOS(lambda_=1.0),
        "pbi": PBI(theta=5.0),
        "ntkmtl": NTKMTL(),
        "ntkmtl features": NTKMTL(gramian="features", features="h"),
        "ntkmtl_sr": NTKMTLSR(n=4),
    }
    out = {"sum": sum_step(m)}
    out.update({k: balanced_step(m, b) for k, b in bals.items()})
    out["torchjd cosmos"] = scalarizer_step(m, S.COSMOS(1.0, r))
    out["torchjd pbi"] = scalarizer_step(m, S.PBI(5.0, r))
    out["authors ntkmtl"] = authors_ntkmtl_step(m)
    out["authors ntkmtl_sr"] = authors_sr_step(m)
    return out


REFERENCE = {
    "cosmos": "torchjd cosmos",
    "pbi": "torchjd pbi",
    "ntkmtl": "authors ntkmtl",
    "ntkmtl_sr": "authors ntkmtl_sr",
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tasks", type=int, nargs="*", default=[8, 32])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for T in args.tasks:
        times = interleaved_rounds(variants(Model(T)), args.reps)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"T = {T}: median step (ms), x the plain sum; lossport / reference")
        for k, v in med.items():
            ref = REFERENCE.get(k)
            vs = f"   lossport / reference {v / med[ref]:.2f}" if ref else ""
            print(f"  {k:20s} {1e3 * v:8.1f} ms  x{v / med['sum']:5.2f}{vs}")


if __name__ == "__main__":
    main()
