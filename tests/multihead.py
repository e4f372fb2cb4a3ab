"""A small shared-trunk net with one regression head per name (and the trunk's output as ``h``), and its
batches: the fixture of the balancer tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import lossport


class MultiHead(nn.Module):
    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.heads = nn.ModuleDict({k: nn.Linear(8, 1) for k in names})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {**{k: m(h) for k, m in self.heads.items()}, "h": h}


def multihead_batch(names: Sequence[str], seed: int = 0, n: int = 32, spread: float = 5.0) -> dict[str, torch.Tensor]:
    """Targets of part ``i`` on the scale ``1 + spread * i`` (so that the parts' gradients differ in size)."""
    g = torch.Generator().manual_seed(seed)
    out = {"x": torch.randn(n, 4, generator=g)}
    for i, k in enumerate(names):
        out[k] = (1 + spread * i) * torch.randn(n, 1, generator=g) + i
    return out


def unit_losses(names: Sequence[str], missing: Sequence[str] = ()) -> lossport.Losses:
    """Parts of value 1 for ``names`` (static weights 1), ``missing`` absent: the ``losses`` argument of a
    Gramian balancer's ``weigh`` when only the Gramian matters."""
    return lossport.Losses(
        parts={k: torch.tensor(1.0) for k in names}, weights=dict.fromkeys(names, 1.0), missing=tuple(missing)
    )
