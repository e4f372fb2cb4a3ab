"""LDC-MTL: loss discrepancy control by a learned router, from a penalised bilevel problem.

Xiao, Dong, Zou, Ji, "LDC-MTL: Balancing Multi-Task Learning through Scalable Loss Discrepancy Control" (arXiv
2502.08585, 2025). The rule below is that of the authors' code (github.com/OptMN-Lab/LDC-MTL,
``experiments/*/trainer.py``), read for this module: the router weights ``sigma`` and the net minimise together
(one backward, one step each) the penalised single-level objective::

    F = sum_i sigma_i Lt_i / sg(sum_i sigma_i)  +  lambda * sum_{i=1}^{T-1} |sigma_i Lt_i - sigma_{i+1} Lt_{i+1}|

where ``Lt_i`` are the pre-normalised losses: the upper level (the router) reduces the discrepancies between
consecutive weighted losses, the lower level (the net) the weighted sum. Each step costs one backward, like the
plain sum (``O(1)`` in the number of parts).
"""

from __future__ import annotations

import itertools
import math
from typing import ClassVar

import torch
from torch import Tensor

from ..result_types import Losses
from .base import register
from .learned import LearnedBalancer
from .loss_level import _training

_NORMALIZATIONS = ("initial", "log", "none")


def discrepancy_objective(sigma: Tensor, lt: Tensor, lam: float) -> Tensor:
    """``F = sum_i sigma_i Lt_i / sg(sum sigma) + lam sum_i |sigma_i Lt_i - sigma_{i+1} Lt_{i+1}|`` (the chain over
    consecutive parts, in the given order)."""
    wl = sigma * lt
    return wl.sum() / sigma.sum().detach() + lam * (wl[:-1] - wl[1:]).abs().sum()


@register("ldc_mtl", "ldcmtl")
class LDCMTL(LearnedBalancer):
    """LDC-MTL (Xiao et al. 2025; module docstring): a router with one logit ``r_i`` per part gives ``sigma =
    softmax(r)`` over the parts present (the authors' NYUv2 router ends in a softmax; its input, the batch's
    pooled features, has no counterpart outside the net, so lossport's router is input-free, as the authors'
    QM9 and CelebA routers, which are plain parameter vectors).

    With ``s_j = sign(sigma_j Lt_j - sigma_{j+1} Lt_{j+1})`` (``s_0 = s_T = 0``), the net's gradient of ``F`` is
    ``sum_i c_i dLt_i/dL_i grad L_i`` with ``c_i = sigma_i (1 + lambda (s_i - s_{i-1}))``; lossport returns
    ``b_i = T c_i dLt_i/dL_i`` (detached; factor ``T``: ``sigma`` sums to 1) and the extra term ``ldc_mtl/router``
    (value 0, gradient ``dF/dr``), so ``losses.total.backward()`` gives the router the authors' gradient and
    :meth:`step` takes one Adam step on it. The net descends the penalty too (the authors' single-level form): a
    part whose weighted loss lies below both neighbours gets ``c_i = sigma_i (1 - 2 lambda)``, negative for
    ``lambda > 1/2`` (the authors use at most 0.1): the net is then pushed to raise that loss.

    :param lamb: the penalty ``lambda`` (the authors' ``--lamb``: 0.05 on NYUv2 and QM9, 0.1 Cityscapes, 0.01
        CelebA).
    :param normalization: the pre-normalisation ``Lt``: ``"initial"`` (NYUv2: ``Lt_i = L_i / (L_i(0) / min_j
        L_j(0))``, ``L(0)`` the values at the first training call), ``"log"`` (QM9: ``Lt_i = log(L_i / L_i(0))``)
        or ``"none"`` (CelebA: ``Lt_i = L_i``).
    :param lr: the router's Adam learning rate (the authors train it with the net's optimizer: 1e-3 on QM9).
    :param init: the initial logits (0: uniform ``sigma``).

    The chain runs over the parts present in the spec's order (the authors' task order). A part's ``L(0)`` is its
    value in the first training batch where it is present (``min_j L_j(0)`` is taken over that first batch's
    parts). Losses must be ``> 0`` for ``"initial"`` and ``"log"``. The NYUv2 router also clamps ``sigma`` to
    ``[0.2, 0.8]`` (a 3-task setting); lossport does not clamp.
    """

    name = "ldc_mtl"
    kind: ClassVar[str] = "loss"

    def __init__(self, lamb: float = 0.05, normalization: str = "initial", lr: float = 1e-3, init: float = 0.0) -> None:
        super().__init__(lr=lr, init=init)
        if not lamb >= 0:
            raise ValueError(f"LDCMTL: lamb must be >= 0, not {lamb!r}")
        if normalization not in _NORMALIZATIONS:
            raise ValueError(f"LDCMTL: normalization must be one of {_NORMALIZATIONS}, not {normalization!r}")
        self.lamb = float(lamb)
        self.normalization = normalization
        self._initial: dict[str, float]
        self._min0: float | None
        self.add_state("_initial", {})  # L_i(0) per part name
        self.add_state("_min0", None)  # min_j L_j(0) over the first training batch

    def _normalized(self, vals: dict[str, float], names: list[str]) -> tuple[list[float], list[float]]:
        """``Lt_i`` and ``dLt_i/dL_i`` of the parts present."""
        if self.normalization == "none":
            return [vals[k] for k in names], [1.0] * len(names)
        for k in names:
            if not vals[k] > 0 or math.isinf(vals[k]):
                raise ValueError(
                    f"LDCMTL(normalization={self.normalization!r}) needs finite losses > 0 (it divides by them), but "
                    f"part {k!r} is {vals[k]}; shift the loss so that it is > 0 or use normalization='none'"
                )
        if _training():
            if self._min0 is None:
                self._min0 = min(vals[k] for k in names)
            for k in names:
                self._initial.setdefault(k, vals[k])
        init = {k: self._initial.get(k, vals[k]) for k in names}
        if self.normalization == "log":
            return [math.log(vals[k] / init[k]) for k in names], [1 / vals[k] for k in names]
        m0 = self._min0 if self._min0 is not None else min(vals.values())
        factors = [m0 / init[k] for k in names]
        return [vals[k] * f for k, f in zip(names, factors)], factors

    def balance(self, losses: Losses) -> tuple[dict[str, float], dict[str, Tensor]]:
        self._ensure(losses)
        names = losses.names
        if not names:
            return {}, {}
        vals = {k: float(v.detach()) for k, v in losses.parts.items()}
        lt, dlt = self._normalized(vals, names)
        logits = torch.stack([self._params[k] for k in names])
        sigma = torch.softmax(logits, dim=0)
        lt_t = torch.tensor(lt, dtype=sigma.dtype, device=sigma.device)
        F = discrepancy_objective(sigma, lt_t, self.lamb)
        sg = sigma.detach().tolist()
        wl = [s * v for s, v in zip(sg, lt)]
        signs = [0.0] + [float((a > b) - (a < b)) for a, b in itertools.pairwise(wl)] + [0.0]
        T = len(names)
        total_sigma = sum(sg)
        b = {
            k: T * (sg[i] / total_sigma + self.lamb * sg[i] * (signs[i + 1] - signs[i])) * dlt[i]
            for i, k in enumerate(names)
        }
        self.info["ldc_mtl/discrepancy"] = sum(abs(x - y) for x, y in itertools.pairwise(wl))
        for k, s in zip(names, sg):
            self.info[f"ldc_mtl/sigma/{k}"] = s
        return b, {"ldc_mtl/router": F - F.detach()}

    def __repr__(self) -> str:
        return f"LDCMTL(lamb={self.lamb}, normalization={self.normalization!r}, lr={self.lr})"


__all__ = ["LDCMTL", "discrepancy_objective"]
