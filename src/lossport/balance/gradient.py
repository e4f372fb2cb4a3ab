"""Gradient-level balancers: weights as functions of the Gramian ``G`` of the parts' gradients.

Each class wraps a function of :mod:`lossport.balance.weighting` and states the factor between the paper's
weights and lossport's (``b = 1`` is equal weighting, the plain sum of the parts; normalised methods sum to
``T``). All take the engine options of :class:`~lossport.balance.gramian_base.GramianBalancer`
(``gramian="params" | "features"``, ``features=``, ``every=``, ``params=``).

GradDrop and DB-MTL, whose updates are not weighted sums of the current gradients, are in
:mod:`lossport.balance.surgery`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..result_types import Losses
from . import weighting as W
from .base import register
from .gramian_base import GramianBalancer, normalized


def _orders(T: int, generator: torch.Generator) -> list[list[int]]:
    """For each part ``i`` a random order of the others (PCGrad, GradVac), drawn on the host from the seeded
    host generator: the order is a Python list, and a seed gives the same orders on every device."""
    return [[j for j in torch.randperm(T, generator=generator, device="cpu").tolist() if j != i] for i in range(T)]


def _warm_start(warm: list[float] | None, G: Tensor) -> Tensor | None:
    """The previous solution as a start for the Newton solver, on ``G``'s device (``None`` if the parts
    changed in number)."""
    if not warm or len(warm) != G.shape[0]:
        return None
    return torch.tensor(warm, dtype=torch.float64, device=G.device)


@register("mgda")
class MGDA(GramianBalancer):
    """MGDA (Sener & Koltun, NeurIPS 2018): the min-norm point of the convex hull of the (normalised)
    gradients. ``normalization``: ``"none"`` (nash-mtl/FAMO default), ``"l2"`` (``g_i / ||g_i||``), ``"loss"``
    (``g_i / L_i``) or ``"loss+"`` (``g_i / (L_i ||g_i||)``, the official CelebA setting). With ``g_i' = s_i
    g_i`` and ``w'`` the min-norm weights of the ``g_i'``, the update ``sum_i w'_i g_i'`` has part weights
    ``w'_i s_i``, scaled to sum to ``T`` (as nash-mtl/FAMO; the paper's weights sum to 1: factor ``T``)."""

    name = "mgda"

    def __init__(self, normalization: str = "none", **engine: Any) -> None:
        super().__init__(**engine)
        if normalization not in ("none", "l2", "loss", "loss+"):
            raise ValueError(f"normalization must be 'none', 'l2', 'loss' or 'loss+', not {normalization!r}")
        self.normalization = normalization

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        T = G.shape[0]
        norms = G.diagonal().clamp_min(1e-300).sqrt()
        vals = torch.stack([losses.parts[k].detach() for k in losses.names]).to(torch.float64).abs().clamp_min(1e-12)
        s = {
            "none": torch.ones_like(norms),
            "l2": 1 / norms,
            "loss": 1 / vals,
            "loss+": 1 / (vals * norms),
        }[self.normalization]
        w = W.mgda(s[:, None] * G * s[None, :]) * s
        return normalized(w, T)


@register("pcgrad")
class PCGrad(GramianBalancer):
    """PCGrad (Yu et al., NeurIPS 2020) computed from the Gramian, with a seeded random order per step; sum
    reduction, so ``b = 1`` when no two gradients conflict (factor 1 to the paper's sum)."""

    name = "pcgrad"

    def __init__(self, seed: int = 0, **engine: Any) -> None:
        super().__init__(**engine)
        self.generator: torch.Generator
        self.add_state("generator", torch.Generator().manual_seed(seed))

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        return W.pcgrad(G, _orders(G.shape[0], self.generator))


@register("cagrad")
class CAGrad(GramianBalancer):
    """CAGrad (Liu et al., NeurIPS 2021) with radius ``c`` (0.4: nash-mtl/FAMO default). The update ``(g_0 +
    sqrt(phi)/||g_w|| g_w) / (1 + c^2)`` has part weights summing to about 1 (mean scale); lossport multiplies
    by ``T`` to match the sum of losses, as nash-mtl/FAMO do."""

    name = "cagrad"

    def __init__(self, c: float = 0.4, **engine: Any) -> None:
        super().__init__(**engine)
        if c < 0:
            raise ValueError("CAGrad: c must be >= 0")
        self.c = float(c)

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        return G.shape[0] * W.cagrad(G, self.c, names=losses.names)


@register("imtl_g", "imtlg")
class IMTLG(GramianBalancer):
    """IMTL-G (Liu et al., ICLR 2021): equal projections of the update on every unit gradient. Paper weights
    sum to 1; lossport's to ``T`` (factor ``T``)."""

    name = "imtl_g"

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        return G.shape[0] * W.imtl_g(G)


@register("aligned_mtl", "alignedmtl")
class AlignedMTL(GramianBalancer):
    """Aligned-MTL (Senushkin et al., CVPR 2023), ``scale`` in ``"min"`` (paper, LibMTL, TorchJD),
    ``"median"``, ``"rmse"`` (official code). TorchJD's weights (uniform preference ``1/T``) times ``T``, so
    that orthogonal gradients of equal norm give ``b = 1``. ``rtol``: eigenvalues of ``G`` below ``rtol *
    lambda_max`` count as zero (default ``T * 2.2e-16`` as TorchJD; with float32 gradients and more parts than
    independent gradient directions use about ``1e-6``, else roundoff eigenvalues blow the weights up)."""

    name = "aligned_mtl"

    def __init__(self, scale: str = "min", rtol: float | None = None, **engine: Any) -> None:
        super().__init__(**engine)
        if scale not in ("min", "median", "rmse"):
            raise ValueError(f"scale must be 'min', 'median' or 'rmse', not {scale!r}")
        if rtol is not None and not 0 <= rtol < 1:
            raise ValueError(f"AlignedMTL: rtol must be in [0, 1) or None, not {rtol!r}")
        self.scale = scale
        self.rtol = rtol

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        return G.shape[0] * W.aligned_mtl(G, self.scale, self.rtol)


@register("upgrad")
class UPGrad(GramianBalancer):
    """UPGrad (Quinton & Rey 2024): the mean of the gradients projected onto the dual cone; never conflicts
    with any part. TorchJD's weights times ``T`` (``b = 1`` when no gradients conflict). The solver starts
    from the previous step's projections (state ``start``, with the part names ``start_names``; used when the
    parts are the same): the weights equal a cold solve's to the solver's tolerance
    (:func:`weighting.upgrad_warm`), and a resumed run repeats an uninterrupted one exactly."""

    name = "upgrad"

    def __init__(self, **engine: Any) -> None:
        super().__init__(**engine)
        self._start: Tensor | None
        self._start_names: list[str]
        self.add_state("_start", None)
        self.add_state("_start_names", [])

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        start = self._start if self._start_names == list(losses.names) else None
        w, V = W.upgrad_warm(G, start)
        self._start, self._start_names = V, list(losses.names)
        return G.shape[0] * w

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """As :meth:`Balancer.load_state_dict`; a state written before the warm start (no ``start``) loads
        with none (the next step solves cold)."""
        super().load_state_dict(_with_empty_start(state))


@register("dualproj")
class DualProj(GramianBalancer):
    """DualProj (Quinton & Rey 2024): the mean gradient projected onto the dual cone. TorchJD's weights times
    ``T``. Solved cold at every step: one problem, which the pivoting finishes in about one step from its cold
    start (a start from the previous step's weights took more steps on a replayed training run)."""

    name = "dualproj"

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        return G.shape[0] * W.dualproj(G)


def _with_empty_start(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state`` with an empty warm start added when it has none (written before the warm starts existed)."""
    if isinstance(state, Mapping) and "balancer" in state and "start" not in state:
        return {**state, "start": None, "start_names": []}
    return state


@register("nash_mtl", "nashmtl", "nash")
class NashMTL(GramianBalancer):
    """Nash-MTL (Navon et al., ICML 2022): ``b = a`` with ``G a = 1/a`` on the raw Gramian (the authors' code
    solves on ``G / ||G||_F`` with the factor put back in its constraint, so its ``a`` is this one; their
    weights, unscaled: ``a_i ~ 1/||g_i||``), solved exactly by Newton (:func:`weighting.nash_mtl`, which also
    says what happens at exactly opposite gradients: bounded weights and a ``SolverWarning``) and warm-started
    from the previous solution. The authors' ``update_weights_every`` is the engine option
    ``every=K`` (recompute every ``K`` steps, reuse in between).

    ``max_norm``: the authors clip the shared gradient ``J^T a`` to norm 1 (``max_norm=1.0`` in their code and
    TorchJD); here ``max_norm > 0`` scales ``a`` by ``max_norm / ||J^T a||`` when ``||J^T a|| = sqrt(a^T G
    a)`` exceeds it. Because lossport applies the weights in one backward, the heads' gradients are scaled by
    the same factor (the authors clip the shared parameters only), and with ``every=K`` the factor is that of
    the step where ``a`` was computed. Default ``0.0``: no clipping (use the trainer's ``grad_clip`` to clip
    every parameter instead)."""

    name = "nash_mtl"

    def __init__(self, max_norm: float = 0.0, **engine: Any) -> None:
        super().__init__(**engine)
        if not max_norm >= 0:
            raise ValueError(f"NashMTL: max_norm must be >= 0 (0 disables the clipping), not {max_norm!r}")
        self.max_norm = float(max_norm)
        self._warm: list[float] | None
        self.add_state("_warm", None)

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        a = W.nash_mtl(G, x0=_warm_start(self._warm, G), names=losses.names)
        self._warm = a.tolist()
        if self.max_norm > 0:
            norm = float((a @ G.to(torch.float64) @ a).clamp_min(0).sqrt())
            if norm > self.max_norm:
                a = a * (self.max_norm / norm)
        return a


@register("fairgrad")
class FairGrad(GramianBalancer):
    """FairGrad (Ban & Ji, ICML 2024): ``G w = w^(-1/alpha)`` on the raw Gramian, as the authors' code and
    TorchJD; ``alpha = 2`` in every author run (``alpha = 1`` is Nash-MTL). Weights unscaled, as Nash-MTL;
    degenerate Gramians as :func:`weighting.fairgrad`."""

    name = "fairgrad"

    def __init__(self, alpha: float = 2.0, **engine: Any) -> None:
        super().__init__(**engine)
        if alpha <= 0:
            raise ValueError("FairGrad: alpha must be > 0")
        self.alpha = float(alpha)
        self._warm: list[float] | None
        self.add_state("_warm", None)

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        w = W.fairgrad(G, self.alpha, x0=_warm_start(self._warm, G), names=losses.names)
        self._warm = w.tolist()
        return w


@register("config")
class ConFIG(GramianBalancer):
    """ConFIG (Liu et al. 2024): the direction of equal cosine with every gradient, with length the sum of the
    gradients' projections on it; computed from the Gramian (see :func:`weighting.config`). Identical
    gradients give ``b = 1``."""

    name = "config"

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        return W.config(G)


@register("gradvac")
class GradVac(GramianBalancer):
    """GradVac (Wang et al., ICLR 2021) with EMA rate ``beta`` (0.5, LibMTL), whole-model grouping, seeded
    random order; the cosine targets are state. Sum reduction as PCGrad (``b = 1`` without conflict)."""

    name = "gradvac"

    def __init__(self, beta: float = 0.5, seed: int = 0, **engine: Any) -> None:
        super().__init__(**engine)
        self.beta = float(beta)
        self.generator: torch.Generator
        self._targets: dict[str, float]
        self.add_state("generator", torch.Generator().manual_seed(seed))
        self.add_state("_targets", {})

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        names = losses.names
        tgt = torch.tensor(
            [[self._targets.get(f"{a}|{b}", 0.0) for b in names] for a in names], dtype=torch.float64, device=G.device
        )
        w, new = W.gradvac(G, _orders(len(names), self.generator), tgt, self.beta)
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                if i != j:
                    self._targets[f"{a}|{b}"] = float(new[i, j])
        return w


__all__ = [
    "IMTLG",
    "MGDA",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "FairGrad",
    "GradVac",
    "NashMTL",
    "PCGrad",
    "UPGrad",
]
