"""Agreement sweeps for the methods added from TorchJD 0.18 (issue 15): how often lossport and TorchJD differ.

* Krum: the paper's score (sum of squared distances to the nearest neighbours) against TorchJD's (sum of
  distances): the fraction of random draws where they select different parts.
* PCD: lossport's weights against TorchJD's ``PCDWeighting`` over three steps, on random, rank-deficient (rank
  2), ill-conditioned (singular values of ``J`` from 1 to 1e-6) and infeasible (two anti-parallel secondary
  gradients) inputs: the number of draws per kind whose update ``J^T w`` differs by more than 1e-5 (relative).

    .venv/bin/python benchmarks/torchjd_extra.py    # ~30 s
"""

from __future__ import annotations

import torch
from torchjd.aggregation import PCDWeighting

from lossport.balance.priority import pcd
from lossport.balance.robust import krum


def krum_disagreement(draws: int = 1000, T: int = 7, f: int = 1, P: int = 5) -> int:
    count = 0
    for seed in range(draws):
        J = torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        count += not torch.equal(krum(J @ J.T, f), krum(J @ J.T, f, distance="euclidean"))
    return count


def jacobian(kind: str, T: int, g: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.randn(T, 20, generator=g, dtype=torch.float64)
    if kind == "rank_deficient":
        return torch.randn(T, 2, generator=g, dtype=torch.float64) @ torch.randn(
            2, 20, generator=g, dtype=torch.float64
        )
    if kind == "ill_conditioned":
        U, _, V = torch.linalg.svd(torch.randn(T, 20, generator=g, dtype=torch.float64), full_matrices=False)
        return U @ torch.diag(torch.logspace(0, -6, T, dtype=torch.float64)) @ V
    J = torch.randn(T, 20, generator=g, dtype=torch.float64)
    J[2] = -J[1]
    return J


def pcd_mismatches(draws: int = 200, beta: float = 0.9) -> dict[str, int]:
    out = {}
    for kind in ("random", "rank_deficient", "ill_conditioned", "infeasible"):
        bad = 0
        for seed in range(draws):
            g = torch.Generator().manual_seed(seed)
            T = 3 + seed % 4
            tau = 0.3 if seed % 3 else 0.02
            J = jacobian(kind, T, g)
            ref = PCDWeighting(tau=tau, beta=beta)
            ema, differs = torch.zeros(T, dtype=torch.float64), False
            for step in range(1, 4):
                Js = J * (1 + 0.3 * step) + 0.1 * step * torch.randn(T, 20, generator=g, dtype=torch.float64)
                G = Js @ Js.T
                ema = beta * ema + (1 - beta) * G.diagonal()
                scales = 1 / (ema / (1 - beta**step) + 1e-8).sqrt()
                mine = pcd(G, torch.full((T - 1,), tau, dtype=torch.float64), scales)
                theirs = ref(G)
                differs |= float((mine @ Js - theirs @ Js).norm()) > 1e-5 * max(float((theirs @ Js).norm()), 1e-12)
            bad += differs
        out[kind] = bad
    return out


def main() -> None:
    print(f"Krum: squared vs euclidean scores select different parts in {krum_disagreement()} of 1000 draws")
    print(f"PCD: draws (of 200 per kind) where lossport's update differs from TorchJD's: {pcd_mismatches()}")


if __name__ == "__main__":
    main()
